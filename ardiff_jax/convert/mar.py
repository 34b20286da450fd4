"""MAR's released `checkpoint-last.pth` (MAR-B / L / H: "model" and "model_ema") -> the parameters
of a `configs/mar_imagenet256.py:model=...` run (`models/mar.py`, `models/diffloss.py`).

Our modules keep MAR's names where they are plain attributes (`z_proj`, `encoder_blocks_3`,
`attn/qkv`, `fake_latent`, the learned position embeddings, ...); the rest map as
  <blocks>_i/fc1, fc2                   <- <blocks>.i.mlp.fc1, mlp.fc2 (timm's Mlp)
  diffloss/time_mlp_in, time_mlp_out    <- diffloss.net.time_embed.mlp.0, .mlp.2
  diffloss/res_block_i/mlp_in, mlp_out  <- diffloss.net.res_blocks.i.mlp.0, .mlp.2
  diffloss/res_block_i/adaLN_modulation <- diffloss.net.res_blocks.i.adaLN_modulation.1
  diffloss/final_adaLN, final_linear    <- diffloss.net.final_layer.adaLN_modulation.1, .linear
  (other diffloss/* <- diffloss.net.*)
Linear weights are transposed ([out, in] -> [in, out]; the fused qkv keeps timm's q | k | v
order), LayerNorm `weight` is our `scale`, the class embedding's table is unchanged. `params`
come from the file's "model", `ema_params` from its "model_ema" (MAR evaluates the EMA).
"""
from __future__ import annotations

import re

from ardiff_jax.convert import common
from ardiff_jax.methods import condref

_RENAMES = {
    "time_mlp_in": "time_embed.mlp.0", "time_mlp_out": "time_embed.mlp.2",
    "mlp_in": "mlp.0", "mlp_out": "mlp.2", "adaLN_modulation": "adaLN_modulation.1",
    "final_adaLN": "final_layer.adaLN_modulation.1", "final_linear": "final_layer.linear",
    "fc1": "mlp.fc1", "fc2": "mlp.fc2",
}
_LIST_CHILD = re.compile(r"^(encoder_blocks|decoder_blocks|res_block)_(\d+)$")


def torch_name(path: tuple[str, ...]) -> tuple[str, str]:
  """('decoder_blocks_2', 'fc1', 'kernel') -> ('decoder_blocks.2.mlp.fc1.weight', 'dense')."""
  *modules, leaf = path
  parts = []
  for m in modules:
    hit = _LIST_CHILD.match(m)
    if hit:
      parts.append(("res_blocks" if hit.group(1) == "res_block" else hit.group(1)) + "." + hit.group(2))
    else:
      parts.append(_RENAMES.get(m, m))
  if parts and parts[0] == "diffloss":
    parts.insert(1, "net")
  base = ".".join(parts)
  if not modules:                                   # a bare parameter (fake_latent, mask_token...)
    return leaf, "same"
  if leaf == "kernel":
    return f"{base}.weight", "dense"
  if leaf in ("scale", "embedding"):
    return f"{base}.weight", "same"
  return f"{base}.{leaf}", "same"


def convert(state_dict, target) -> dict:
  """MAR state dict -> our MAR params shaped as `target`."""
  return common.convert_tree(state_dict, target, torch_name,
                             "a MAR state dict (checkpoint-last.pth's model / model_ema)")


def params_from_file(source: str, key: str, abstract_params) -> dict:
  """The run's parameters from the file's `key` entry (default "model")."""
  own = condref.generator_params(abstract_params)       # condition refinement's E_φ starts fresh
  return convert(common.read_state_dict(source, key or "model"), own)


def ema_params_from_file(source: str, key: str, abstract_params) -> dict | None:
  """The EMA weights ("model_ema"), unless `key` picked one entry for both."""
  if key:
    return None
  own = condref.generator_params(abstract_params)
  return convert(common.read_state_dict(source, "model_ema"), own)
