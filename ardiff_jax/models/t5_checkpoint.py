"""A local Hugging Face T5 / ByT5 checkpoint directory -> (`models.t5.T5Encoder`, params), torch-free.

    model, params = load_hf_t5_encoder("/data/byt5-xl")
    hidden = model.apply({"params": params}, byte_ids(captions, 768), mask=ids != 0)   # [B, T, 2560]

The directory is what `save_pretrained` (or a Hub snapshot) holds (`models/hf_checkpoint.py` reads
it: safetensors, sharded or not, or pytorch_model.bin). Nothing is downloaded. Only the encoder is read (the decoder and `lm_head` are ignored); params
come back as float32 NumPy arrays, ready for `jax.device_put` with the model's shardings.

Names (HF Linear weights are [out, in]; our kernels [in, out]):
  shared.weight | encoder.embed_tokens.weight           -> shared/embedding
  encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight -> relative_attention_bias
  encoder.block.{i}.layer.0.layer_norm.weight           -> block_{i}/attention_norm/weight
  encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight ᵀ -> block_{i}/attention/{q,k,v,o}/kernel
  encoder.block.{i}.layer.1.layer_norm.weight           -> block_{i}/ffn_norm/weight
  encoder.block.{i}.layer.1.DenseReluDense.{wi_0,wi_1,wi,wo}.weight ᵀ -> block_{i}/ffn/{...}/kernel
  encoder.final_layer_norm.weight                       -> final_layer_norm/weight

ByT5 ids: UTF-8 byte + 3, then </s> = 1, padded with 0 (`models.byte_text.byte_ids` is exactly
ByT5's tokenizer); pass mask = ids != 0 as HF's attention_mask.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ardiff_jax.models import hf_checkpoint, t5

_EXPECTED = ("a local Hugging Face T5/ByT5 checkpoint directory with config.json and "
             "model.safetensors or pytorch_model.bin (nothing is downloaded)")
_EMBED_NAMES = ("shared.weight", "encoder.embed_tokens.weight")


def hf_name(path: tuple[str, ...]) -> tuple[str | tuple[str, ...], tuple[int, ...] | None]:
  """Our parameter path, e.g. ('block_3', 'attention', 'q', 'kernel') -> (HF name(s), permutation)."""
  if path[0] == "shared":
    return _EMBED_NAMES, None
  if path[0] == "relative_attention_bias":
    return "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", None
  if path[0] == "final_layer_norm":
    return "encoder.final_layer_norm.weight", None
  block = f"encoder.block.{int(path[0].removeprefix('block_'))}"
  sub = path[1]
  if sub == "attention_norm":
    return f"{block}.layer.0.layer_norm.weight", None
  if sub == "ffn_norm":
    return f"{block}.layer.1.layer_norm.weight", None
  if sub == "attention":
    return f"{block}.layer.0.SelfAttention.{path[2]}.weight", (1, 0)
  if sub == "ffn":
    return f"{block}.layer.1.DenseReluDense.{path[2]}.weight", (1, 0)
  raise ValueError(f"no Hugging Face name for parameter {'/'.join(path)}")


def _is_encoder(name: str) -> bool:
  return name.startswith("encoder.") or name == "shared.weight"


def convert_state_dict(model: t5.T5Encoder, state_dict: dict[str, np.ndarray]) -> dict:
  """HF T5 state dict (any dtype; decoder entries ignored) -> our float32 params for `model`.
  A missing, mis-shaped or unexpected encoder tensor is a ValueError naming it."""
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
  expected = {k: v.shape for k, v in traverse_util.flatten_dict(nn.unbox(abstract["params"])).items()}
  what = (f"the T5 encoder of its config (d_model {model.d_model}, {model.num_layers} layers, "
          f"{model.num_heads} heads, d_ff {model.d_ff}, {model.feed_forward_proj}; "
          "a T5 v1.1 / ByT5 / T5 encoder?)")
  return hf_checkpoint.convert(expected, state_dict, hf_name, _is_encoder, what)


def load_hf_t5_encoder(path: str, dtype: Any = jnp.float32) -> tuple[t5.T5Encoder, dict]:
  """(T5Encoder with compute `dtype`, float32 params) from a local HF T5 / ByT5 directory;
  apply as `model.apply({"params": params}, ids, mask)`."""
  model = t5.encoder_from_config(hf_checkpoint.read_config(path, _EXPECTED), dtype)
  return model, convert_state_dict(model, hf_checkpoint.read_tensors(path, _is_encoder, _EXPECTED))
