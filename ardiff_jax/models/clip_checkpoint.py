"""A local Hugging Face CLIP checkpoint folder -> (`models.clip.CLIP`, params), torch-free.

    model, params = load_hf_clip("/data/CLIP-ViT-H-14-laion2B-s32B-b79K")
    text = model.apply({"params": params}, ids, method=CLIP.text)                        # [B, 1024]
    image = model.apply({"params": params}, clip_pixels(images), method=CLIP.image)      # [B, 1024]

The folder is a `CLIPModel` as `save_pretrained` writes it (laion's CLIP-H repository ships one
next to its OpenCLIP file): config.json, model.safetensors or pytorch_model.bin (sharded or not;
`models/hf_checkpoint.py`), and the tokenizer's vocab.json and merges.txt (`data/clip_bpe.py`).
Nothing is downloaded.

Names (HF Linear weights are [out, in], our kernels [in, out]; the patch conv [D, 3, p, p] becomes
[p, p, 3, D]); {tower} is text_model or vision_model:
  {tower}.embeddings.{token,position}_embedding.weight -> {tower}/embeddings_{...}_embedding
  vision_model.embeddings.class_embedding            -> vision_model/embeddings_class_embedding
  vision_model.embeddings.patch_embedding.weight     -> vision_model/embeddings_patch_embedding/kernel
  {tower}.encoder.layers.{i}.{rest}.{weight,bias}    -> {tower}/layers_{i}/{rest}/{kernel|scale,bias}
  {tower}.{final_layer_norm,pre_layrnorm,post_layernorm}.{weight,bias} -> {tower}/{...}/{scale,bias}
  text_projection.weight, visual_projection.weight   -> {tower}/{text,visual}_projection/kernel
`logit_scale` and the `position_ids` buffers of older files are not read.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ardiff_jax.models import clip, hf_checkpoint

_EXPECTED = ("a local Hugging Face CLIP checkpoint directory (a CLIPModel: config.json, "
             "model.safetensors or pytorch_model.bin, vocab.json and merges.txt; nothing is downloaded)")
_PROJECTIONS = ("text_projection", "visual_projection")
_IGNORED = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def hf_name(path: tuple[str, ...]) -> tuple[str, tuple[int, ...] | None]:
  """Our parameter path, e.g. ('vision_model', 'layers_3', 'mlp', 'fc1', 'kernel') ->
  (HF name, permutation of the HF tensor)."""
  tower, head, rest = path[0], path[1], path[2:]
  if head in _PROJECTIONS:
    return f"{head}.weight", (1, 0)
  if head.startswith("embeddings_"):
    field = head.removeprefix("embeddings_")
    if field == "class_embedding":
      return f"{tower}.embeddings.class_embedding", None
    return f"{tower}.embeddings.{field}.weight", ((2, 3, 1, 0) if field == "patch_embedding" else None)
  if head.startswith("layers_"):
    prefix = f"{tower}.encoder.layers.{int(head.removeprefix('layers_'))}"
  else:
    prefix = f"{tower}.{head}"
  *modules, leaf = rest
  name = ".".join([prefix, *modules, _LEAF[leaf]])
  return name, ((1, 0) if leaf == "kernel" else None)


def _owned(name: str) -> bool:
  return name.startswith(("text_model.", "vision_model.")) or name.split(".")[0] in _PROJECTIONS


def convert_state_dict(model: clip.CLIP, state_dict: dict[str, np.ndarray]) -> dict:
  """HF CLIPModel state dict (any float dtype) -> our float32 params for `model`. A missing,
  mis-shaped or unexpected tensor is a ValueError naming it."""
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), *model.init_inputs()))
  expected = {k: v.shape for k, v in traverse_util.flatten_dict(nn.unbox(abstract["params"])).items()}
  t, v = model.text_tower, model.image_tower
  what = (f"the CLIP of its config (text {t.width} wide, {t.num_layers} layers; image {v.width} "
          f"wide, {v.num_layers} layers, {v.patch_size}-px patches; projection {t.projection_dim})")
  return hf_checkpoint.convert(expected, state_dict, hf_name, _owned, what, ignored=_IGNORED)


def load_hf_clip(path: str, dtype: Any = jnp.float32) -> tuple[clip.CLIP, dict]:
  """(CLIP with compute `dtype`, float32 params) from a local HF CLIPModel directory."""
  model = clip.clip_from_config(hf_checkpoint.read_config(path, _EXPECTED), dtype)
  return model, convert_state_dict(model, hf_checkpoint.read_tensors(path, _owned, _EXPECTED))


def clip_config(path: str) -> dict:
  """config.json of the CLIP folder (the model's sizes, without reading the weights)."""
  return hf_checkpoint.read_config(path, _EXPECTED)
