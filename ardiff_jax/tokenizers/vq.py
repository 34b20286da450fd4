"""Vector-quantised image tokenizers: LlamaGen's VQ-16 (reference/llamagen_star.md §1.1), NHWC.

Shape letters: B batch, H/W image height/width, h/w code grid (H/f, W/f), Z z_channels, C the
codebook vectors' dimension, K the codebook size.

    x [B,H,W,3] -> Encoder -> [B,h,w,Z] -> quant_conv (1×1) -> f [B,h,w,C]
      -> nearest codebook entry (l2-normalised f and codebook) -> ids [B,h,w], z_q [B,h,w,C]
      -> straight-through z_q' = f + sg(z_q − f) -> post_quant_conv (1×1) -> Decoder -> x̂

The convolutional encoder and decoder are the taming/LDM ones of `tokenizers/kl.py` (GroupNorm
eps 1e-6, swish, single-head 1×1-conv attention, asymmetric (0,1,0,1) padding before each stride-2
conv, nearest ×2 upsampling then a conv); LlamaGen's VQ-16 differs from MAR's KL-16 only in where
attention sits (only the lowest resolution, in both encoder and decoder, plus the mid blocks), in
z_channels 256 without the doubled channels of a Gaussian posterior, and in its quantizer.

Quantizer (LlamaGen `VectorQuantizer`): K entries of dimension C, initialised uniform(±1/K) then
l2-normalised; with `l2_norm` both f and the codebook are normalised before the search and the
normalised codebook is what decoding looks up. Losses (`codebook_losses`): ‖z_q − sg(f)‖² (the
codebook term) + β‖sg(z_q) − f‖² (the commitment term, β 0.25), means over every element, with f
the normalised encoder output; the optional entropy loss (`entropy_loss`, ratio 0 in LlamaGen).
Codebook usage: the fraction of the K entries among the last `usage_window` indices (a FIFO in the
train state, `push_usage`, `codebook_usage`).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ardiff_jax.tokenizers.kl import Decoder, Encoder, conv

Dtype = Any


# ---------------------------------------------------------------------------------------------
# The quantizer, as pure functions of the codebook.


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / max(‖x‖, eps) along the last axis (torch's F.normalize), fp32."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def codebook_init(l2_norm: bool):
  """Initialiser of the [K, C] codebook: uniform(±1/K), then l2-normalised when `l2_norm`."""

  def init(rng, shape, dtype=jnp.float32):
    k = shape[0]
    table = jax.random.uniform(rng, shape, dtype, -1.0 / k, 1.0 / k)
    return l2_normalize(table).astype(dtype) if l2_norm else table

  return init


def lookup_table(codebook: jax.Array, l2_norm: bool) -> jax.Array:
  """The vectors codes decode to: the (normalised) codebook [K, C], fp32."""
  return l2_normalize(codebook) if l2_norm else codebook.astype(jnp.float32)


def nearest_codes(f: jax.Array, codebook: jax.Array, l2_norm: bool
                  ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Nearest codebook entries of f [..., C] under the squared l2 distance.

  Returns (ids int32 [...], the searched f (normalised when `l2_norm`) [..., C], z_q [..., C],
  negative squared distances [..., K] (the affinities of the entropy loss)), all fp32.
  """
  f = l2_normalize(f) if l2_norm else f.astype(jnp.float32)
  table = lookup_table(codebook, l2_norm)
  dist = (jnp.sum(jnp.square(f), -1, keepdims=True) + jnp.sum(jnp.square(table), -1)
          - 2.0 * jnp.einsum("...c,kc->...k", f, table, precision=jax.lax.Precision.HIGHEST))
  ids = jnp.argmin(dist, axis=-1).astype(jnp.int32)
  return ids, f, table[ids], -dist


def straight_through(f: jax.Array, z_q: jax.Array) -> jax.Array:
  """z_q in the forward pass, the identity's gradient to f in the backward pass."""
  return f + jax.lax.stop_gradient(z_q - f)


def codebook_losses(f: jax.Array, z_q: jax.Array, beta: float) -> tuple[jax.Array, jax.Array]:
  """(codebook loss mean(z_q − sg(f))², commitment loss β·mean(sg(z_q) − f)²), fp32 scalars."""
  f, z_q = f.astype(jnp.float32), z_q.astype(jnp.float32)
  codebook = jnp.mean(jnp.square(z_q - jax.lax.stop_gradient(f)))
  commit = beta * jnp.mean(jnp.square(jax.lax.stop_gradient(z_q) - f))
  return codebook, commit


def entropy_loss(affinity: jax.Array, temperature: float = 0.01) -> jax.Array:
  """LlamaGen's (maskgit's) entropy penalty on affinities [..., K]: the mean per-sample entropy of
  softmax(affinity / T) minus the entropy of its batch average (low when each vector is sure of its
  code and the codes are used evenly). fp32 scalar."""
  logits = affinity.reshape(-1, affinity.shape[-1]).astype(jnp.float32) / temperature
  probs = jax.nn.softmax(logits, axis=-1)
  log_probs = jax.nn.log_softmax(logits + 1e-5, axis=-1)
  avg = jnp.mean(probs, axis=0)
  avg_entropy = -jnp.sum(avg * jnp.log(avg + 1e-5))
  sample_entropy = -jnp.mean(jnp.sum(probs * log_probs, axis=-1))
  return sample_entropy - avg_entropy


def init_usage(window: int) -> jax.Array:
  """An empty FIFO of the last `window` code indices (−1 = no index yet). int32 [window].

  LlamaGen starts its buffer at zeros, so code 0 counts as used until the buffer has turned over;
  −1 keeps the metric exact from the first step.
  """
  return jnp.full((window,), -1, jnp.int32)


def push_usage(buffer: jax.Array, ids: jax.Array) -> jax.Array:
  """Appends the flattened ids [...] to the FIFO [N] (oldest dropped). [N] -> [N]."""
  ids = ids.reshape(-1).astype(jnp.int32)
  if ids.shape[0] >= buffer.shape[0]:
    return ids[-buffer.shape[0]:]
  return jnp.concatenate([buffer[ids.shape[0]:], ids])


def codebook_usage(buffer: jax.Array, codebook_size: int) -> jax.Array:
  """Fraction of the K codes present in the FIFO [N] (−1 entries ignored). fp32 scalar."""
  seen = jnp.zeros((codebook_size,), bool).at[jnp.where(buffer < 0, codebook_size, buffer)].set(
      True, mode="drop")
  return jnp.mean(seen.astype(jnp.float32))


# ---------------------------------------------------------------------------------------------
# The model.


class VQModel(nn.Module):
  """Encoder -> quant_conv -> quantizer -> post_quant_conv -> decoder (LlamaGen `VQModel`).

  Images [B,H,W,3] in [-1, 1]; codes int32 [B,h,w] with h = H / 2**(len(ch_mult) − 1).
  `attn_resolutions` (nominal sizes, relative to `resolution`) select the levels with attention
  on both sides, as LDM's rule; VQ-16 puts it at the lowest level only. Params fp32; the
  quantizer, its losses and the outputs of `encode` and `decode` are fp32.
  """
  ch: int
  ch_mult: Sequence[int]
  enc_num_res_blocks: int
  dec_num_res_blocks: int        # the decoder has dec_num_res_blocks + 1 blocks per level (LDM)
  attn_resolutions: Sequence[int]
  resolution: int
  z_channels: int
  codebook_size: int
  embed_dim: int
  l2_norm: bool = True
  norm_groups: int = 32
  dtype: Dtype = jnp.float32

  def setup(self):
    mult = tuple(self.ch_mult)
    attn = tuple(self.attn_resolutions)
    self.encoder = Encoder(self.ch, mult, self.enc_num_res_blocks, attn, self.resolution,
                           self.z_channels, double_z=False, norm_groups=self.norm_groups,
                           dtype=self.dtype)
    self.decoder = Decoder(self.ch, mult, self.dec_num_res_blocks, attn, self.resolution,
                           self.z_channels, norm_groups=self.norm_groups, dtype=self.dtype)
    self.quant_conv = conv(self.embed_dim, 1, self.dtype, "quant_conv")
    self.post_quant_conv = conv(self.z_channels, 1, self.dtype, "post_quant_conv")
    self.codebook = self.param(
        "codebook", nn.with_logical_partitioning(codebook_init(self.l2_norm), ("vocab", None)),
        (self.codebook_size, self.embed_dim), jnp.float32)

  @property
  def stride(self) -> int:
    return 2**(len(self.ch_mult) - 1)

  def encode(self, x: jax.Array) -> jax.Array:
    """x [B,H,W,3] -> f [B,h,w,C], the unquantised encoder output (fp32)."""
    return self.quant_conv(self.encoder(x)).astype(jnp.float32)

  def quantize(self, f: jax.Array) -> dict[str, jax.Array]:
    """f [B,h,w,C] -> {"ids" [B,h,w], "f" (searched, normalised), "z_q", "z_st" (straight-through),
    "affinity" [B,h,w,K]}."""
    ids, f, z_q, affinity = nearest_codes(f, self.codebook, self.l2_norm)
    return {"ids": ids, "f": f, "z_q": z_q, "z_st": straight_through(f, z_q), "affinity": affinity}

  def encode_codes(self, x: jax.Array) -> jax.Array:
    """x [B,H,W,3] -> codes int32 [B,h,w]."""
    return self.quantize(self.encode(x))["ids"]

  def decode(self, z_q: jax.Array) -> jax.Array:
    """Code vectors [B,h,w,C] -> images [B,H,W,3] (fp32, not clipped)."""
    return self.decoder(self.post_quant_conv(z_q.astype(self.dtype))).astype(jnp.float32)

  def embed_codes(self, ids: jax.Array) -> jax.Array:
    """codes int [B,h,w] -> their code vectors [B,h,w,C] (the normalised codebook), fp32."""
    return lookup_table(self.codebook, self.l2_norm)[ids]

  def decode_codes(self, ids: jax.Array) -> jax.Array:
    """codes int [B,h,w] -> images [B,H,W,3]."""
    return self.decode(self.embed_codes(ids))

  def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """x [B,H,W,3] -> (reconstruction [B,H,W,3] through the straight-through code vectors,
    the quantizer's outputs as in `quantize`)."""
    q = self.quantize(self.encode(x))
    return self.decode(q["z_st"]), q


PRESETS: dict[str, dict[str, Any]] = {
    # LlamaGen VQ-16 (vq_ds16_c2i.pt): f = 16, attention at the lowest level (16×16 at 256 px).
    "vq16": dict(ch=128, ch_mult=(1, 1, 2, 2, 4), enc_num_res_blocks=2, dec_num_res_blocks=2,
                 attn_resolutions=(16,), resolution=256, z_channels=256, codebook_size=16384,
                 embed_dim=8, l2_norm=True, norm_groups=32),
    # LlamaGen VQ-8: one level fewer (f = 8).
    "vq8": dict(ch=128, ch_mult=(1, 2, 2, 4), enc_num_res_blocks=2, dec_num_res_blocks=2,
                attn_resolutions=(32,), resolution=256, z_channels=256, codebook_size=16384,
                embed_dim=8, l2_norm=True, norm_groups=32),
    # CPU presets (ours): f = 4, 32 px -> 8×8 codes. CIFAR-10: K 4096; digits: K 1024.
    "vq_small": dict(ch=64, ch_mult=(1, 2, 2), enc_num_res_blocks=2, dec_num_res_blocks=2,
                     attn_resolutions=(8,), resolution=32, z_channels=64, codebook_size=4096,
                     embed_dim=8, l2_norm=True, norm_groups=32),
    "vq_tiny": dict(ch=32, ch_mult=(1, 2, 2), enc_num_res_blocks=1, dec_num_res_blocks=1,
                    attn_resolutions=(8,), resolution=32, z_channels=32, codebook_size=1024,
                    embed_dim=8, l2_norm=True, norm_groups=8),
}


def make_vq(preset: str, **overrides: Any) -> VQModel:
  """VQModel from a named preset, with any field overridden (e.g. codebook_size=512)."""
  if preset not in PRESETS:
    raise ValueError(f"unknown VQ preset {preset!r}; valid presets: {sorted(PRESETS)}")
  return VQModel(**{**PRESETS[preset], **overrides})
