"""What every weight converter shares: reading a released file torch-free, the layout changes
PyTorch -> Flax, and an all-or-nothing check of the result against the model's own tree.

A converter maps each leaf of the target tree (a path such as ('encoder', 'down_0', 'block_1',
'norm1', 'scale')) to one tensor name of the source state dict and a layout; `convert_tree` takes
every tensor, changes its layout, and refuses with the full list of problems (missing, unexpected
or mis-shaped tensors) rather than ever returning a partial tree.
"""
from __future__ import annotations

import os
from typing import Callable, Iterable

import numpy as np
from flax import traverse_util

from ardiff_jax.data import safetensors, torch_pickle

# Layouts: "conv" OIHW -> HWIO, "dense" [out, in] -> [in, out], "same" unchanged.
LAYOUTS = {
    "conv": lambda a: a.transpose(2, 3, 1, 0),
    "dense": lambda a: a.T,
    "same": lambda a: a,
}


# The inverse layouts: our tree -> the released file's (for round trips and exports).
INVERSE_LAYOUTS = {
    "conv": lambda a: a.transpose(3, 2, 0, 1),
    "dense": lambda a: a.T,
    "same": lambda a: a,
}


def export_state_dict(params, name_of: Callable[[tuple[str, ...]], tuple[str, str]]
                      ) -> dict[str, np.ndarray]:
  """Our parameter tree in the released file's names and layouts (`name_of` as in
  `convert_tree`): {name: float32 array}."""
  out = {}
  for path, value in traverse_util.flatten_dict(params).items():
    name, layout = name_of(path)
    out[name] = INVERSE_LAYOUTS[layout](np.asarray(value, np.float32))
  return out


def read_state_dict(path: str, key: str = "") -> dict[str, np.ndarray]:
  """{name: array} of a released file: a torch.save file (zip or legacy; `key` picks the entry
  holding the state dict, e.g. "model") or a .safetensors file."""
  if not path:
    raise ValueError("convert.source is empty: pass the released file, "
                     "--config.convert.source=PATH")
  if not os.path.exists(path):
    raise FileNotFoundError(f"convert.source={path!r} does not exist")
  if path.endswith(".safetensors"):
    return safetensors.read_safetensors(path)
  return torch_pickle.load_state_dict(path, key)


def convert_tree(state_dict: dict[str, np.ndarray], target, name_of: Callable[[tuple[str, ...]],
                 tuple[str, str]], what: str, ignored: Iterable[str] = ()) -> dict:
  """The target tree (arrays or ShapeDtypeStructs) filled from `state_dict`: `name_of(path)` ->
  (source name, layout). Source names starting with an `ignored` prefix (training-only parts of a
  released file) are dropped; any other unused name is an error, as is a missing or mis-shaped
  tensor. `what` names the expected file in the error. -> nested dict of float32 arrays."""
  flat_target = traverse_util.flatten_dict(target)
  out, used, problems = {}, set(), []
  for path, leaf in flat_target.items():
    name, layout = name_of(path)
    if name not in state_dict:
      problems.append(f"missing {name} (for {'/'.join(path)})")
      continue
    value = LAYOUTS[layout](np.asarray(state_dict[name], np.float32))
    if tuple(value.shape) != tuple(leaf.shape):
      problems.append(f"{name}: shape {tuple(state_dict[name].shape)} gives {tuple(value.shape)}, "
                      f"the model needs {tuple(leaf.shape)}")
    out[path] = value
    used.add(name)
  ignored = tuple(ignored)
  unexpected = sorted(k for k in state_dict if k not in used and not k.startswith(ignored)
                      and not k.endswith("num_batches_tracked"))
  if unexpected:
    problems.append(f"{len(unexpected)} unexpected tensors: {', '.join(unexpected[:10])}")
  if problems:
    raise ValueError(f"the file is not {what} for this config ({len(problems)} problems): "
                     + "; ".join(problems[:12]))
  return traverse_util.unflatten_dict(out)
