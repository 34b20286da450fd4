"""T5's encoder (T5 v1.1 / ByT5 architecture, as Hugging Face's `T5EncoderModel`): the text
encoder of Paella v2, which conditions on ByT5-XL's `last_hidden_state` (reference/dd2_paella.md §3).

Shape letters: B batch, T tokens (ByT5: UTF-8 bytes + 3, then </s> = 1, padded with 0; see
`byte_text.byte_ids`), D d_model, H num_heads, K d_kv, F d_ff, V vocab_size, N relative buckets.

    ids [B, T] -> shared[ids] -> Drop -> num_layers × block -> final_layer_norm -> Drop -> [B, T, D]
    block:  h += Drop(O · Attn(RMSNorm(h)))       q, k, v [D, H·K], o [H·K, D], no biases
            h += Drop(FFN(RMSNorm(h)))            gated-gelu: wo(Drop(gelu_tanh(wi_0 x) ⊙ wi_1 x))
                                                  relu:       wo(Drop(relu(wi x)))

Facts of HF T5 this follows (and where it departs from the ViT/GPT blocks of this package):
  - T5LayerNorm is RMS-only: x · rsqrt(mean(x²) + eps) · weight, no mean, no bias, in float32.
  - Attention logits are q·kᵀ WITHOUT the 1/√K scale (T5 folds it into the q initialisation),
    plus a position bias [H, T, T] = relative_attention_bias[bucket(key − query)], computed once
    from block 0's table and reused by every block; padded keys get finfo(float32).min added
    (added, as HF does, not substituted). Softmax in float32, dropout on its probabilities.
  - Buckets (bidirectional): half of the N buckets for keys after the query; |distance| below N/4
    gets its own bucket, larger ones share log-spaced buckets up to `max_distance`.
  - No embedding scale, no absolute positions; the embedding is the (tied) `shared` table.
  - Dropout (`dropout_rate`, off when `deterministic`): after the embedding, on the attention
    probabilities, inside the FFN before `wo`, after each sublayer and after the final norm.
Dtypes: parameters float32; the projections compute in `dtype`; the residual stream, norms,
position bias, logits and softmax stay float32; the output is float32.

Parameters and their HF names (`models/t5_checkpoint.py` maps them; HF Linear weights are [out, in]):
  shared/embedding [V, D]                   shared.weight (= encoder.embed_tokens.weight)
  relative_attention_bias [N, H]            encoder.block.0.layer.0.SelfAttention
                                              .relative_attention_bias.weight
  block_{i}/attention_norm/weight [D]       encoder.block.{i}.layer.0.layer_norm.weight
  block_{i}/attention/{q,k,v}/kernel [D, H·K], o/kernel [H·K, D]
                                            encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight
  block_{i}/ffn_norm/weight [D]             encoder.block.{i}.layer.1.layer_norm.weight
  block_{i}/ffn/{wi_0,wi_1}/kernel [D, F], wo/kernel [F, D]  (relu: wi instead of wi_0, wi_1)
                                            encoder.block.{i}.layer.1.DenseReluDense.{...}.weight
  final_layer_norm/weight [D]               encoder.final_layer_norm.weight
Initialisation (when not loaded) follows HF's `T5PreTrainedModel._init_weights`.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ardiff_jax.models import vit

FEED_FORWARD_PROJ = ("gated-gelu", "relu")
_REQUIRED_KEYS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")
# HF T5Config defaults for the keys a config.json may omit (older ByT5 files lack max_distance).
_CONFIG_DEFAULTS = dict(relative_attention_num_buckets=32, relative_attention_max_distance=128,
                        layer_norm_epsilon=1e-6, feed_forward_proj="relu", dropout_rate=0.1)


def relative_position_buckets(q_len: int, k_len: int, num_buckets: int = 32,
                              max_distance: int = 128) -> np.ndarray:
  """Bidirectional T5 bucket of (key position − query position) -> int32 [q_len, k_len].

  A constant of the static shapes, so it is computed in NumPy; the log branch runs in float32 as
  HF's torch code (and Mesh TensorFlow's) does.
  """
  relative = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
  half = num_buckets // 2
  bucket = (relative > 0).astype(np.int64) * half
  n = np.abs(relative)
  max_exact = half // 2
  # The small branch's n < max_exact is clipped up only to keep the unused log finite.
  log_ratio = np.log(np.maximum(n, max_exact).astype(np.float32) / np.float32(max_exact))
  large = max_exact + (log_ratio / np.float32(math.log(max_distance / max_exact))
                       * np.float32(half - max_exact)).astype(np.int64)
  large = np.minimum(large, half - 1)
  return (bucket + np.where(n < max_exact, n, large)).astype(np.int32)


def gelu_tanh(x: jax.Array) -> jax.Array:
  """HF's "gelu_new": 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))."""
  return jax.nn.gelu(x, approximate=True)


class T5LayerNorm(nn.Module):
  """RMS norm without mean or bias; x [..., D] -> same dtype, computed in float32."""
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    w = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                   (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (y * w).astype(x.dtype)


def _dense(features: int, axes: tuple, name: str, dtype, std: float) -> nn.Dense:
  return vit.dense(features, axes, name, dtype, use_bias=False, init=nn.initializers.normal(std))


class T5Attention(nn.Module):
  """x [B, T, D], bias [B or 1, H, T, T] float32 (position bias + key mask) -> [B, T, D]."""
  d_model: int
  d_kv: int
  num_heads: int
  dropout_rate: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array, deterministic: bool = True) -> jax.Array:
    b, t, _ = x.shape
    inner = self.num_heads * self.d_kv
    split = lambda a: a.reshape(b, t, self.num_heads, self.d_kv)
    q = split(_dense(inner, ("embed", "heads"), "q", self.dtype, (self.d_model * self.d_kv) ** -0.5)(x))
    k = split(_dense(inner, ("embed", "heads"), "k", self.dtype, self.d_model ** -0.5)(x))
    v = split(_dense(inner, ("embed", "heads"), "v", self.dtype, self.d_model ** -0.5)(x))
    # No 1/√K: T5 scales q at initialisation instead.
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + bias
    probs = jax.nn.softmax(logits, axis=-1)
    probs = nn.Dropout(self.dropout_rate)(probs, deterministic=deterministic)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), v).reshape(b, t, inner)
    return _dense(self.d_model, ("heads", "embed"), "o", self.dtype, inner ** -0.5)(out)


class T5FeedForward(nn.Module):
  """x [B, T, D] -> [B, T, D]: gated-gelu wo(gelu_tanh(wi_0 x) ⊙ wi_1 x) or relu wo(relu(wi x))."""
  d_model: int
  d_ff: int
  feed_forward_proj: str = "gated-gelu"
  dropout_rate: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    std_in = self.d_model ** -0.5
    if self.feed_forward_proj == "gated-gelu":
      h = (gelu_tanh(_dense(self.d_ff, ("embed", "mlp"), "wi_0", self.dtype, std_in)(x))
           * _dense(self.d_ff, ("embed", "mlp"), "wi_1", self.dtype, std_in)(x))
    elif self.feed_forward_proj == "relu":
      h = nn.relu(_dense(self.d_ff, ("embed", "mlp"), "wi", self.dtype, std_in)(x))
    else:
      raise ValueError(f"feed_forward_proj={self.feed_forward_proj!r}: expected one of {FEED_FORWARD_PROJ}")
    h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    return _dense(self.d_model, ("mlp", "embed"), "wo", self.dtype, self.d_ff ** -0.5)(h)


class T5Block(nn.Module):
  """x [B, T, D] float32 (residual stream), bias [B or 1, H, T, T] float32 -> [B, T, D] float32."""
  d_model: int
  d_kv: int
  d_ff: int
  num_heads: int
  feed_forward_proj: str = "gated-gelu"
  layer_norm_epsilon: float = 1e-6
  dropout_rate: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array, deterministic: bool = True) -> jax.Array:
    drop = nn.Dropout(self.dropout_rate)
    h = T5LayerNorm(self.layer_norm_epsilon, name="attention_norm")(x).astype(self.dtype)
    h = T5Attention(self.d_model, self.d_kv, self.num_heads, self.dropout_rate, self.dtype,
                    name="attention")(h, bias, deterministic)
    x = x + drop(h.astype(jnp.float32), deterministic=deterministic)
    h = T5LayerNorm(self.layer_norm_epsilon, name="ffn_norm")(x).astype(self.dtype)
    h = T5FeedForward(self.d_model, self.d_ff, self.feed_forward_proj, self.dropout_rate,
                      self.dtype, name="ffn")(h, deterministic)
    x = x + drop(h.astype(jnp.float32), deterministic=deterministic)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class T5Encoder(nn.Module):
  """ids int32 [B, T], mask bool [B, T] (True = real token; None = all) -> float32 [B, T, D],
  HF `T5EncoderModel(...).last_hidden_state`. Fields are HF T5Config's (see `encoder_from_config`)."""
  vocab_size: int
  d_model: int
  d_kv: int
  d_ff: int
  num_layers: int
  num_heads: int
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "gated-gelu"
  dropout_rate: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, ids: jax.Array, mask: jax.Array | None = None,
               deterministic: bool = True) -> jax.Array:
    if self.feed_forward_proj not in FEED_FORWARD_PROJ:
      raise ValueError(f"feed_forward_proj={self.feed_forward_proj!r}: expected one of {FEED_FORWARD_PROJ}")
    t = ids.shape[-1]
    embed = nn.Embed(self.vocab_size, self.d_model, dtype=jnp.float32, name="shared",
                     embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                                 ("vocab", "embed")))
    table = self.param("relative_attention_bias", nn.with_logical_partitioning(
        nn.initializers.normal(self.d_model ** -0.5), (None, None)),
        (self.relative_attention_num_buckets, self.num_heads), jnp.float32)
    buckets = relative_position_buckets(t, t, self.relative_attention_num_buckets,
                                        self.relative_attention_max_distance)
    bias = jnp.transpose(table[buckets], (2, 0, 1))[None]                       # [1, H, T, T]
    if mask is not None:
      bias = bias + jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]
    drop = nn.Dropout(self.dropout_rate)
    x = drop(embed(ids), deterministic=deterministic)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    for i in range(self.num_layers):
      x = T5Block(self.d_model, self.d_kv, self.d_ff, self.num_heads, self.feed_forward_proj,
                  self.layer_norm_epsilon, self.dropout_rate, self.dtype, name=f"block_{i}")(
                      x, bias, deterministic)
    x = T5LayerNorm(self.layer_norm_epsilon, name="final_layer_norm")(x)
    return drop(x, deterministic=deterministic).astype(jnp.float32)


def encoder_from_config(cfg: dict, dtype: Any = jnp.float32) -> T5Encoder:
  """A T5Encoder from a Hugging Face T5 config.json dict (T5 v1.1, mT5, ByT5). The sizes must be
  present; the other fields default as in HF's T5Config."""
  model_type = cfg.get("model_type", "t5")
  if model_type not in ("t5", "mt5"):
    raise ValueError(f"config model_type={model_type!r}: only T5 / mT5 / ByT5 encoders (model_type "
                     "'t5' or 'mt5') are supported")
  missing = [k for k in _REQUIRED_KEYS if k not in cfg]
  if missing:
    raise ValueError(f"T5 config lacks {missing}: a Hugging Face T5 config.json has {list(_REQUIRED_KEYS)}")
  get = lambda k: cfg.get(k, _CONFIG_DEFAULTS[k])
  proj = get("feed_forward_proj")
  if proj not in FEED_FORWARD_PROJ:
    raise ValueError(f"feed_forward_proj={proj!r} is not supported: expected one of {FEED_FORWARD_PROJ} "
                     "('gated-gelu' for T5 v1.1 / mT5 / ByT5, 'relu' for the original T5)")
  return T5Encoder(
      vocab_size=int(cfg["vocab_size"]), d_model=int(cfg["d_model"]), d_kv=int(cfg["d_kv"]),
      d_ff=int(cfg["d_ff"]), num_layers=int(cfg["num_layers"]), num_heads=int(cfg["num_heads"]),
      relative_attention_num_buckets=int(get("relative_attention_num_buckets")),
      relative_attention_max_distance=int(get("relative_attention_max_distance")),
      layer_norm_epsilon=float(get("layer_norm_epsilon")), feed_forward_proj=proj,
      dropout_rate=float(get("dropout_rate")), dtype=dtype)
