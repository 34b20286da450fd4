"""A local Hugging Face checkpoint folder -> float32 NumPy params for one of our modules, torch-free.

What `save_pretrained` (or a Hub snapshot) writes: `config.json` plus the weights as
`model.safetensors`, a sharded `model.safetensors.index.json`, `pytorch_model.bin` (read by
`data.torch_pickle`, no torch needed) or `pytorch_model.bin.index.json`, tried in that order.
Nothing is downloaded. `models/t5_checkpoint.py` and `models/clip_checkpoint.py` name the tensors;
this module reads the folder and checks every tensor against the module's abstract shapes.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Iterable

import numpy as np
from flax import traverse_util

from ardiff_jax.data import safetensors, torch_pickle

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# hf_name(our path) -> (HF name or alternative names, axis permutation of the HF tensor or None)
NameFn = Callable[[tuple[str, ...]], tuple["str | tuple[str, ...]", "tuple[int, ...] | None"]]


def read_config(path: str, expected: str) -> dict:
  """The folder's config.json; `expected` says what the folder should be, for the errors."""
  if not os.path.isdir(path):
    raise ValueError(f"{path!r} is not a directory: expected {expected}")
  config_file = os.path.join(path, "config.json")
  if not os.path.isfile(config_file):
    raise ValueError(f"{config_file!r} does not exist: expected {expected}")
  with open(config_file) as fh:
    return json.load(fh)


def read_tensors(path: str, keep: Callable[[str], bool], expected: str) -> dict[str, np.ndarray]:
  """The tensors named `keep(name)` of the first weight file found in `path` (shards that hold none
  of them are not opened)."""
  found = [f for f in WEIGHT_FILES if os.path.isfile(os.path.join(path, f))]
  if not found:
    raise ValueError(f"{path!r} holds none of {list(WEIGHT_FILES)}: expected {expected}")
  weights = os.path.join(path, found[0])
  if weights.endswith(".index.json"):
    with open(weights) as fh:
      weight_map = json.load(fh).get("weight_map", {})
    shards = sorted({f for k, f in weight_map.items() if keep(k)})
  else:
    shards = [found[0]]
  tensors = {}
  for shard in shards:
    file = os.path.join(path, shard)
    if not os.path.isfile(file):
      raise ValueError(f"{file!r} (listed in {weights!r}) does not exist: expected {expected}")
    if shard.endswith(".safetensors"):
      names = safetensors.read_header(file)[0].keys()
      tensors.update(safetensors.read_safetensors(file, [n for n in names if keep(n)]))
    else:
      tensors.update({k: v for k, v in torch_pickle.load_state_dict(file).items() if keep(k)})
  return tensors


def convert(expected: dict[tuple[str, ...], tuple[int, ...]], state_dict: dict[str, np.ndarray],
            hf_name: NameFn, owned: Callable[[str], bool], what: str,
            ignored: Iterable[str] = ()) -> dict:
  """HF state dict -> our nested float32 params with the flat `expected` {path: shape}.

  `owned(name)`: the HF tensors this module should consume; one of them left unused (other than
  `ignored`) means another architecture. A missing, mis-shaped or unexpected tensor is a
  ValueError naming it, prefixed by `what` (the module and its sizes)."""
  flat, used, problems = {}, set(ignored), []
  for path, shape in expected.items():
    names, perm = hf_name(path)
    names = (names,) if isinstance(names, str) else names
    name = next((n for n in names if n in state_dict), None)
    if name is None:
      problems.append(f"missing tensor {' or '.join(names)}")
      continue
    value = np.asarray(state_dict[name], np.float32)
    if perm is not None and value.ndim == len(perm):
      value = value.transpose(perm)
    if value.shape != tuple(shape):
      hf_shape = list(shape)
      for axis, source in enumerate(perm or ()):
        hf_shape[source] = shape[axis]
      problems.append(f"tensor {name} has shape {list(np.shape(state_dict[name]))}, expected "
                      f"{hf_shape}")
    flat[path] = value
    used.update(names)
  unexpected = sorted(k for k in state_dict if owned(k) and k not in used)
  if unexpected:
    problems.append(f"unexpected tensors {unexpected[:8]}")
  if problems:
    raise ValueError(f"this state dict does not match {what}: " + "; ".join(problems[:10]))
  return traverse_util.unflatten_dict(flat)
