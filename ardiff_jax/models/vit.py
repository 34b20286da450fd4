"""Pre-LN ViT block (timm `Block` as MAR uses it) with a key mask, and logical axis names.

x += Drop(Proj(Attn(LN(x))));  x += Drop(FC2(Drop(GELU(FC1(LN(x))))))
LayerNorm eps 1e-6, qkv bias, MLP ratio 4, exact (erf) GELU as torch's nn.GELU, dropout on the
attention probabilities and after each projection. Linear layers: xavier-uniform, zero bias.
`key_mask` [B, L] (True = may be attended to) lets a padded sequence behave exactly as the
sequence without its padding.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

XAVIER = nn.initializers.xavier_uniform()


def dense(features: int, axes: tuple, name: str, dtype=jnp.float32, use_bias: bool = True,
          init=XAVIER):
  """Linear (xavier-uniform kernel and zero bias by default), parameters carrying logical axis names."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, name=name,
                  kernel_init=nn.with_logical_partitioning(init, axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)))


def layer_norm(name: str, dtype=jnp.float32):
  return nn.LayerNorm(epsilon=1e-6, dtype=dtype, name=name,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)))


def attention_weights(q: jax.Array, k: jax.Array, allowed: jax.Array | None) -> jax.Array:
  """Softmax attention probabilities [B, H, Q, K] in float32 from q [B, Q, H, hd], k [B, K, H, hd];
  `allowed` (broadcastable to [B, H, Q, K], True = may attend) masks the rest out. The logits
  accumulate in float32 even for bf16 q and k (a bf16 dot product loses ~3 significant digits)."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k,
                      preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
  if allowed is not None:
    logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(logits, axis=-1)


class Attention(nn.Module):
  dim: int
  num_heads: int
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, key_mask=None, deterministic: bool = True):
    b, n, _ = x.shape
    hd = self.dim // self.num_heads
    qkv = dense(3 * self.dim, ("embed", "heads"), "qkv", self.dtype)(x)
    q, k, v = jnp.split(qkv.reshape(b, n, 3, self.num_heads, hd), 3, axis=2)
    q, k, v = (a[:, :, 0] for a in (q, k, v))                      # [B, N, H, hd]
    probs = attention_weights(q, k, None if key_mask is None else key_mask[:, None, None, :])
    probs = nn.Dropout(self.dropout)(probs, deterministic=deterministic).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, self.dim)
    out = dense(self.dim, ("heads", "embed"), "proj", self.dtype)(out)
    return nn.Dropout(self.dropout)(out, deterministic=deterministic)


class Block(nn.Module):
  dim: int
  num_heads: int
  mlp_ratio: float = 4.0
  dropout: float = 0.0          # MAR: attn_dropout = proj_dropout = 0.1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, key_mask=None, deterministic: bool = True):
    drop = lambda h: nn.Dropout(self.dropout)(h, deterministic=deterministic)
    x = x + Attention(self.dim, self.num_heads, self.dropout, self.dtype, name="attn")(
        layer_norm("norm1", self.dtype)(x), key_mask, deterministic)
    h = dense(int(self.dim * self.mlp_ratio), ("embed", "mlp"), "fc1", self.dtype)(
        layer_norm("norm2", self.dtype)(x))
    h = drop(nn.gelu(h, approximate=False))
    h = drop(dense(self.dim, ("mlp", "embed"), "fc2", self.dtype)(h))
    x = x + h
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))
