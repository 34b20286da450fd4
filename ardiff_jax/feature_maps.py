"""Operations on NHWC feature maps shared by the networks of both network layers (`models/`,
`tokenizers/`, which may not import each other): Paella's VQGAN and token predictor use them all.

`pixel_unshuffle(x, r)` is torch's PixelUnshuffle(r) and `pixel_shuffle(x, r)` its PixelShuffle(r),
for NHWC arrays: channel c·r² + i·r + j holds sub-pixel (i, j) of channel c, so weights converted
from torch need no channel permutation. `layer_norm` is torch's LayerNorm over channels without
affine (LayerNorm2d in NCHW code), in float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def pixel_unshuffle(x: jax.Array, r: int) -> jax.Array:
  """torch's PixelUnshuffle(r) in NHWC: [B,H·r,W·r,C] -> [B,H,W,C·r²], output channel c·r² + i·r + j
  holding x[:, h·r + i, w·r + j, c]."""
  b, hr, wr, c = x.shape
  if hr % r or wr % r:
    raise ValueError(f"pixel_unshuffle({r}): spatial size {hr}×{wr} is not a multiple of {r}")
  x = x.reshape(b, hr // r, r, wr // r, r, c)              # [B, h, i, w, j, C]
  return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, hr // r, wr // r, c * r * r)


def pixel_shuffle(x: jax.Array, r: int) -> jax.Array:
  """torch's PixelShuffle(r) in NHWC, the inverse of `pixel_unshuffle`: [B,H,W,C·r²] -> [B,H·r,W·r,C]."""
  b, h, w, crr = x.shape
  if crr % (r * r):
    raise ValueError(f"pixel_shuffle({r}): {crr} channels are not a multiple of {r * r}")
  x = x.reshape(b, h, w, crr // (r * r), r, r)             # [B, h, w, C, i, j]
  return x.transpose(0, 1, 4, 2, 5, 3).reshape(b, h * r, w * r, crr // (r * r))


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """LayerNorm over the last (channel) axis without affine, in float32 (two-pass variance)."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, -1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)
