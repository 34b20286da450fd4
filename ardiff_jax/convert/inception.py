"""pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` -> the `.npz` that `evals.inception` loads.

    python -m ardiff_jax.convert.inception pt_inception-2015-12-05-6726825d.pth inception_fid.npz

Then evaluate with `--config.eval.inception_weights=inception_fid.npz`. The .pth is the standard
FID network's weights (TensorFlow's 2015-12-05 Inception graph, ported by pytorch-fid); ardiff_jax
never downloads it: the user supplies the file. Names map one to one:
  <block>.conv.weight [O,I,kh,kw] -> params/<block>/conv/kernel [kh,kw,I,O]
  <block>.bn.{weight,bias}        -> params/<block>/bn/{scale,bias}
  <block>.bn.running_{mean,var}   -> batch_stats/<block>/bn/{mean,var}
  fc.weight [1008,2048], fc.bias  -> params/fc/kernel [2048,1008], params/fc/bias
(`num_batches_tracked` counters are dropped.)
"""
from __future__ import annotations

import sys

import jax
import numpy as np
from flax import traverse_util

from ardiff_jax.data import torch_pickle
from ardiff_jax.evals import inception


def torch_name(flax_key: tuple[str, ...]) -> tuple[str, str]:
  """Flax variable path ('params', 'Mixed_5b', 'branch1x1', 'conv', 'kernel') -> (torch key, layout)."""
  collection, *modules, leaf = flax_key
  base = ".".join(modules)
  if collection == "batch_stats":
    return f"{base}.running_{leaf}", "same"
  if leaf == "kernel":
    return f"{base}.weight", ("conv" if modules[-1] == "conv" else "dense")
  if leaf == "scale":
    return f"{base}.weight", "same"
  return f"{base}.{leaf}", "same"


def convert_state_dict(state_dict: dict[str, np.ndarray]) -> dict:
  """Torch state dict of the FID Inception -> Flax {"params", "batch_stats"} (float32)."""
  expected = traverse_util.flatten_dict(jax.eval_shape(inception.init_variables))
  flat, used = {}, set()
  problems = []
  for key, shape_struct in expected.items():
    name, layout = torch_name(key)
    if name not in state_dict:
      problems.append(f"missing {name}")
      continue
    value = np.asarray(state_dict[name], np.float32)
    if layout == "conv":
      value = value.transpose(2, 3, 1, 0)
    elif layout == "dense":
      value = value.T
    if value.shape != shape_struct.shape:
      problems.append(f"{name}: {state_dict[name].shape} does not give {shape_struct.shape}")
    flat[key] = value
    used.add(name)
  unexpected = sorted(k for k in state_dict if k not in used and not k.endswith("num_batches_tracked"))
  if unexpected:
    problems.append(f"unexpected keys {unexpected[:8]}")
  if problems:
    raise ValueError("this state dict is not the FID InceptionV3 (pt_inception-2015-12-05): "
                     + "; ".join(problems[:10]))
  return traverse_util.unflatten_dict(flat)


def convert_file(src: str, dst: str) -> dict:
  variables = convert_state_dict(torch_pickle.load_state_dict(src))
  inception.save_variables(dst, variables)
  return variables


def main(argv: list[str]) -> int:
  if len(argv) != 3:
    print(__doc__)
    return 2
  convert_file(argv[1], argv[2])
  print(f"wrote {argv[2]}; use it with --config.eval.inception_weights={argv[2]}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
