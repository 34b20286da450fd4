"""A local Hugging Face T5 / ByT5 checkpoint directory -> (`models.t5.T5Encoder`, params), torch-free.

    model, params = load_hf_t5_encoder("/data/byt5-xl")
    hidden = model.apply({"params": params}, byte_ids(captions, 768), mask=ids != 0)   # [B, T, 2560]

The directory is what `save_pretrained` (or a Hub snapshot) holds: `config.json` plus the weights
as `model.safetensors`, a sharded `model.safetensors.index.json`, `pytorch_model.bin` (read by
`data.torch_pickle`, no torch needed) or `pytorch_model.bin.index.json`, tried in that order.
Nothing is downloaded. Only the encoder is read (the decoder and `lm_head` are ignored); params
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

import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ardiff_jax.data import safetensors, torch_pickle
from ardiff_jax.models import t5

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
_EXPECTED = ("a local Hugging Face T5/ByT5 checkpoint directory with config.json and "
             "model.safetensors or pytorch_model.bin (nothing is downloaded)")
_EMBED_NAMES = ("shared.weight", "encoder.embed_tokens.weight")


def hf_name(path: tuple[str, ...]) -> tuple[str | tuple[str, ...], bool]:
  """Our parameter path, e.g. ('block_3', 'attention', 'q', 'kernel') -> (HF name(s), transpose?)."""
  if path[0] == "shared":
    return _EMBED_NAMES, False
  if path[0] == "relative_attention_bias":
    return "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", False
  if path[0] == "final_layer_norm":
    return "encoder.final_layer_norm.weight", False
  block = f"encoder.block.{int(path[0].removeprefix('block_'))}"
  sub = path[1]
  if sub == "attention_norm":
    return f"{block}.layer.0.layer_norm.weight", False
  if sub == "ffn_norm":
    return f"{block}.layer.1.layer_norm.weight", False
  if sub == "attention":
    return f"{block}.layer.0.SelfAttention.{path[2]}.weight", True
  if sub == "ffn":
    return f"{block}.layer.1.DenseReluDense.{path[2]}.weight", True
  raise ValueError(f"no Hugging Face name for parameter {'/'.join(path)}")


def convert_state_dict(model: t5.T5Encoder, state_dict: dict[str, np.ndarray]) -> dict:
  """HF T5 state dict (any dtype; decoder entries ignored) -> our float32 params for `model`.
  A missing, mis-shaped or unexpected encoder tensor is a ValueError naming it."""
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
  expected = traverse_util.flatten_dict(nn.unbox(abstract["params"]))
  flat, used, problems = {}, set(), []
  for path, leaf in expected.items():
    shape = leaf.shape
    names, transpose = hf_name(path)
    names = (names,) if isinstance(names, str) else names
    name = next((n for n in names if n in state_dict), None)
    if name is None:
      problems.append(f"missing tensor {' or '.join(names)}")
      continue
    value = np.asarray(state_dict[name], np.float32)
    value = value.T if transpose and value.ndim == 2 else value
    if value.shape != shape:
      problems.append(f"tensor {name} has shape {list(np.shape(state_dict[name]))}, expected "
                      f"{list(shape[::-1] if transpose else shape)}")
    flat[path] = value
    used.update(names)
  unexpected = sorted(k for k in state_dict if k.startswith("encoder.") and k not in used)
  if unexpected:
    problems.append(f"unexpected encoder tensors {unexpected[:8]} (not a T5 v1.1 / ByT5 / T5 encoder?)")
  if problems:
    raise ValueError(f"this state dict does not match the T5 encoder of its config "
                     f"(d_model {model.d_model}, {model.num_layers} layers, {model.num_heads} heads, "
                     f"d_ff {model.d_ff}, {model.feed_forward_proj}): " + "; ".join(problems[:10]))
  return traverse_util.unflatten_dict(flat)


def _is_encoder(name: str) -> bool:
  return name.startswith("encoder.") or name == "shared.weight"


def read_encoder_tensors(path: str) -> dict[str, np.ndarray]:
  """The encoder's tensors (and `shared.weight`) of the first weight file found in `path`."""
  found = [f for f in WEIGHT_FILES if os.path.isfile(os.path.join(path, f))]
  if not found:
    raise ValueError(f"{path!r} holds none of {list(WEIGHT_FILES)}: expected {_EXPECTED}")
  weights = os.path.join(path, found[0])
  if weights.endswith(".index.json"):
    with open(weights) as fh:
      weight_map = json.load(fh).get("weight_map", {})
    shards = sorted({f for k, f in weight_map.items() if _is_encoder(k)})
  else:
    shards = [found[0]]
  tensors = {}
  for shard in shards:
    file = os.path.join(path, shard)
    if not os.path.isfile(file):
      raise ValueError(f"{file!r} (listed in {weights!r}) does not exist: expected {_EXPECTED}")
    if shard.endswith(".safetensors"):
      names = safetensors.read_header(file)[0].keys()
      tensors.update(safetensors.read_safetensors(file, [n for n in names if _is_encoder(n)]))
    else:
      tensors.update({k: v for k, v in torch_pickle.load_state_dict(file).items() if _is_encoder(k)})
  return tensors


def load_hf_t5_encoder(path: str, dtype: Any = jnp.float32) -> tuple[t5.T5Encoder, dict]:
  """(T5Encoder with compute `dtype`, float32 params) from a local HF T5 / ByT5 directory;
  apply as `model.apply({"params": params}, ids, mask)`."""
  if not os.path.isdir(path):
    raise ValueError(f"{path!r} is not a directory: expected {_EXPECTED}")
  config_file = os.path.join(path, "config.json")
  if not os.path.isfile(config_file):
    raise ValueError(f"{config_file!r} does not exist: expected {_EXPECTED}")
  with open(config_file) as fh:
    model = t5.encoder_from_config(json.load(fh), dtype)
  return model, convert_state_dict(model, read_encoder_tensors(path))
