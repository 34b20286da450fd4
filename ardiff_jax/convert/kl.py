"""MAR's released KL-16 (`kl16.ckpt`, LDM's AutoencoderKL under "model") -> the `ae` parameters of
a `configs/kl16_imagenet256.py` run (`tokenizers/kl.py`, whose module names mirror LDM's).

Names map mechanically: a Flax path joins with dots, a ModuleList child `down_0` / `block_1` /
`attn_0` / `up_2` becomes `down.0` / `block.1` / ... (LDM's `mid.block_1`, `mid.attn_1` are
attribute names and keep their underscore), and the leaf `kernel` is `weight` (conv OIHW -> HWIO),
a norm's `scale` is `weight`. The file's training-only tensors (`loss.*`: LPIPS and the
discriminator of LDM's training loss) are not part of the autoencoder and are dropped; the run's
discriminator and log-variance start fresh.
"""
from __future__ import annotations

import re

from ardiff_jax.convert import common

IGNORED = ("loss.",)
_LIST_CHILD = re.compile(r"^(down|up|block|attn)_(\d+)$")


def torch_name(path: tuple[str, ...]) -> tuple[str, str]:
  """('encoder', 'down_0', 'block_1', 'norm1', 'scale') -> ('encoder.down.0.block.1.norm1.weight',
  'same'); conv kernels -> layout 'conv'."""
  *modules, leaf = path
  parts = []
  for i, m in enumerate(modules):
    hit = _LIST_CHILD.match(m)
    parts.append(f"{hit.group(1)}.{hit.group(2)}" if hit and (i == 0 or modules[i - 1] != "mid")
                 else m)
  base = ".".join(parts)
  if leaf == "kernel":
    return f"{base}.weight", "conv"
  if leaf == "scale":
    return f"{base}.weight", "same"
  return f"{base}.{leaf}", "same"


def convert(state_dict, target_ae) -> dict:
  """LDM AutoencoderKL state dict -> `ae` params shaped as `target_ae`."""
  return common.convert_tree(state_dict, target_ae, torch_name,
                             "an LDM AutoencoderKL state dict (MAR's kl16.ckpt)", IGNORED)


def params_from_file(source: str, key: str, abstract_params) -> dict:
  """{"ae": converted} for the run's parameter tree (`key`: the file's entry, default "model")."""
  state_dict = common.read_state_dict(source, key or "model")
  return {"ae": convert(state_dict, abstract_params["ae"])}
