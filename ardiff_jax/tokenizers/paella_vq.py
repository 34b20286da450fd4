"""Paella's f = 4 VQGAN (reference/dd2_paella.md §3.2; `src_distributed/vqgan.py`), NHWC.

Shape letters: B batch, H/W image height/width, h/w code grid (H/4, W/4 for two levels), D a
feature width, C the code vectors' dimension (c_latent, 4), K the codebook size.

    x [B,H,W,3] -> pixel_unshuffle(2) [B,H/2,W/2,12] -> 1×1 conv -> ResBlock(D/2)
      -> 4×4 stride-2 conv (padding 1) -> ResBlock(D) -> 1×1 conv (no bias) -> BatchNorm
      = f [B,h,w,C] -> nearest codebook entry (plain squared l2) -> ids [B,h,w], z_q [B,h,w,C]
    z_q -> 1×1 conv -> bottleneck_blocks × ResBlock(D) -> 4×4 stride-2 transposed conv (2× the
      size) -> ResBlock(D/2) -> 1×1 conv to 12 -> pixel_shuffle(2) -> x̂ [B,H,W,3]

with D = c_hidden and, for `levels` > 2, one more stride-2 conv / ResBlock per level (widths
c_hidden / 2**(levels − 1 − i)). Paella's sizes (`paella_f4`): levels 2, c_hidden 384 (widths 192
and 384), 12 bottleneck blocks, c_latent 4, K 8192: 256 px -> 64×64 codes.

ResBlock(c) (Paella's): six scalar gammas g, zero at init, so the block is the identity then:
    x_t = LN(x)·(1 + g0) + g1;  x = x + dwconv(x_t)·g2
    x_t = LN(x)·(1 + g3) + g4;  x = x + MLP(x_t)·g5
LN over channels without affine, eps 1e-6; dwconv = edge (replication) padding 1 then a depthwise
3×3 conv with bias; MLP = Linear c→4c, exact (erf) GELU, Linear 4c→c. Its Linear and conv weights
are xavier-uniform with zero biases, as Paella initialises them.

Quantizer (pytorch-tools `VectorQuantize`): the quantizer functions of `tokenizers/vq.py` with
`l2_norm=False`: nearest entry under the plain squared l2 distance, codebook uniform(±1/K) at init,
losses mean(z_q − sg f)² + 0.25·mean(sg z_q − f)² (`vq.codebook_losses`), straight-through z_q.
`codebook_init="normal"` (ours) draws the codebook from N(0, 1) instead, the distribution of the
BatchNorm'd latent it quantizes: from uniform(±1/K), every code starts next to the origin and the
few that the first batches pull out win every later search (on the 32 px CPU runs 12–25 of 1,024
codes stay in use). Paella ships no VQGAN training script, so how its codebook is trained is
not on record.

BatchNorm on the latent (torch `BatchNorm2d(4)` defaults: eps 1e-5, running = 0.9·running + 0.1·batch,
affine): flax `nn.BatchNorm`, batch statistics when `train` and the running ones otherwise, which
live in the `batch_stats` collection. Only the encoder has a BatchNorm, so decoding codes
(`decode_codes`) needs `params` alone.

`scale_factor` (0.3764): Paella's `encode` returns z_q / scale_factor and its `decode` multiplies it
back, while `decode_indices` feeds the codebook vectors straight to the decoder. Codes therefore
decode as codebook lookup -> decoder, which is what this module does; the field is kept for a
consumer of continuous latents (z_q / scale_factor) and nothing here reads it.

pixel_unshuffle / pixel_shuffle give torch's channel order in NHWC (channel c·r² + i·r + j holds
sub-pixel (i, j) of channel c), so converted weights need no channel permutation. Submodule names
follow Paella's state dict (`down_blocks.1.weight` -> `encoder/down_blocks_1/kernel`, OIHW -> HWIO;
a ConvTranspose2d weight [in, out, kh, kw] -> kernel[::-1, ::-1] laid out [kh, kw, in, out]).

Our choices: the convs outside the ResBlocks (in/out, stride-2, latent, transposed) use flax's
lecun-normal init with zero biases (torch's kaiming-uniform(a=√5) is not reproduced; it matters
only from scratch). BatchNorm's running variance averages the biased batch variance (flax) where
torch averages the unbiased one (a factor n/(n − 1), n = B·h·w, negligible at n ≥ 1000); under
jit its batch statistics are those of the global batch (torch DDP without SyncBatchNorm uses each
device's). Params fp32; compute dtype is a field; norms, the quantizer and the encoder and
decoder outputs are fp32.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ardiff_jax.feature_maps import layer_norm, pixel_shuffle, pixel_unshuffle
from ardiff_jax.tokenizers.kl import conv
from ardiff_jax.tokenizers.vq import codebook_init, lookup_table, nearest_codes, straight_through

Dtype = Any

_XAVIER = nn.initializers.xavier_uniform()
_ZEROS = nn.initializers.zeros_init()
_CONV_KERNEL = (None, None, "conv_in", "conv_out")


# ---------------------------------------------------------------------------------------------
# Pure functions.


def replication_pad(x: jax.Array, pad: int) -> jax.Array:
  """torch's ReplicationPad2d(pad) in NHWC: [B,H,W,C] -> [B,H+2p,W+2p,C], edges repeated."""
  return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")


def _batch_constraint(x: jax.Array) -> jax.Array:
  """Shard feature maps [B,H,W,D] over the batch only; a no-op outside a rules context."""
  return nn.with_logical_constraint(x, ("batch", None, None, None))


# ---------------------------------------------------------------------------------------------
# Modules.


class ResBlock(nn.Module):
  """Paella's gated ResBlock (module docstring). [B,H,W,c] -> [B,H,W,c]; identity at init."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    g = self.param("gammas", nn.with_logical_partitioning(_ZEROS, (None,)), (6,), jnp.float32)
    depthwise = nn.Conv(c, (3, 3), padding="VALID", feature_group_count=c, dtype=self.dtype,
                        param_dtype=jnp.float32,
                        kernel_init=nn.with_logical_partitioning(_XAVIER, (None, None, None, "conv_out")),
                        bias_init=nn.with_logical_partitioning(_ZEROS, ("conv_out",)),
                        name="depthwise_1")
    dense = lambda features, axes, name: nn.Dense(
        features, dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(_XAVIER, axes),
        bias_init=nn.with_logical_partitioning(_ZEROS, axes[1:]), name=name)

    x_t = (layer_norm(x) * (1 + g[0]) + g[1]).astype(self.dtype)
    x = x + depthwise(replication_pad(x_t, 1)) * g[2].astype(self.dtype)
    x_t = (layer_norm(x) * (1 + g[3]) + g[4]).astype(self.dtype)
    h = dense(4 * c, ("embed", "mlp"), "channelwise_0")(x_t)
    h = dense(c, ("mlp", "embed"), "channelwise_2")(nn.gelu(h, approximate=False))
    return _batch_constraint(x + h * g[5].astype(self.dtype))


def level_widths(c_hidden: int, levels: int) -> tuple[int, ...]:
  """Paella's c_levels: the widths of the levels, finest first ([192, 384] for 384, 2 levels)."""
  return tuple(c_hidden // 2**i for i in reversed(range(levels)))


class Encoder(nn.Module):
  """x [B,H,W,3] -> the batch-normalised latent f [B,H/f,W/f,c_latent] (fp32), f = 2**levels."""
  levels: int
  c_hidden: int
  c_latent: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    widths = level_widths(self.c_hidden, self.levels)
    x = conv(widths[0], 1, self.dtype, "in_block_1")(pixel_unshuffle(x, 2).astype(self.dtype))
    i = 0                                        # index in Paella's `down_blocks` Sequential
    for level, width in enumerate(widths):
      if level > 0:
        x = conv(width, 4, self.dtype, f"down_blocks_{i}", strides=2, padding=((1, 1), (1, 1)))(x)
        i += 1
      x = ResBlock(self.dtype, name=f"down_blocks_{i}")(x)
      i += 1
    x = conv(self.c_latent, 1, self.dtype, f"down_blocks_{i}_0", use_bias=False)(x)
    norm = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                        dtype=jnp.float32, use_fast_variance=False,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                        bias_init=nn.with_logical_partitioning(_ZEROS, ("norm",)),
                        name=f"down_blocks_{i}_1")
    return norm(x.astype(jnp.float32))


def upsample_conv(features: int, dtype: Dtype, name: str) -> nn.ConvTranspose:
  """torch's ConvTranspose2d(kernel 4, stride 2, padding 1): [B,H,W,D] -> [B,2H,2W,features].

  That is a conv over the 2×-dilated input padded by kernel − 1 − padding = 2 on each side, so
  exactly twice the input size; its kernel is torch's weight [in, out, 4, 4] flipped spatially and
  laid out [4, 4, in, out].
  """
  return nn.ConvTranspose(features, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)), dtype=dtype,
                          param_dtype=jnp.float32,
                          kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                                   _CONV_KERNEL),
                          bias_init=nn.with_logical_partitioning(_ZEROS, ("conv_out",)), name=name)


class Decoder(nn.Module):
  """Code vectors [B,h,w,c_latent] -> images [B,h·f,w·f,3] (fp32, not clipped)."""
  levels: int
  c_hidden: int
  bottleneck_blocks: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    widths = level_widths(self.c_hidden, self.levels)[::-1]       # coarsest first
    x = conv(widths[0], 1, self.dtype, "up_blocks_0_0")(z.astype(self.dtype))
    i = 1                                        # index in Paella's `up_blocks` Sequential
    for level, width in enumerate(widths):
      for _ in range(self.bottleneck_blocks if level == 0 else 1):
        x = ResBlock(self.dtype, name=f"up_blocks_{i}")(x)
        i += 1
      if level < self.levels - 1:
        x = _batch_constraint(upsample_conv(widths[level + 1], self.dtype, f"up_blocks_{i}")(x))
        i += 1
    x = conv(12, 1, self.dtype, "out_block_0")(x)
    return pixel_shuffle(x, 2).astype(jnp.float32)


CODEBOOK_INITS = ("uniform", "normal")


class PaellaVQModel(nn.Module):
  """Encoder -> BatchNorm'd latent -> quantizer -> decoder (Paella `VQModel`), the public interface
  of `vq.VQModel` plus a `train` switch for the encoder's BatchNorm.

  Images [B,H,W,3] in [-1, 1]; codes int32 [B,h,w] with h = H / stride. `encode` and `__call__`
  read the `batch_stats` collection (running statistics) unless `train`, where they update it
  (apply with `mutable=["batch_stats"]`); `decode`, `embed_codes` and `decode_codes` read params only.
  """
  levels: int = 2
  bottleneck_blocks: int = 12
  c_hidden: int = 384
  c_latent: int = 4
  codebook_size: int = 8192
  scale_factor: float = 0.3764    # for continuous-latent consumers only; the code path ignores it
  codebook_init: str = "uniform"  # uniform(±1/K) (pytorch-tools) | normal: N(0, 1) (ours)
  dtype: Dtype = jnp.float32

  def setup(self):
    if self.codebook_init not in CODEBOOK_INITS:
      raise ValueError(f"codebook_init={self.codebook_init!r}: expected one of {CODEBOOK_INITS}")
    self.encoder = Encoder(self.levels, self.c_hidden, self.c_latent, self.dtype)
    self.decoder = Decoder(self.levels, self.c_hidden, self.bottleneck_blocks, self.dtype)
    init = (codebook_init(False) if self.codebook_init == "uniform"
            else nn.initializers.normal(1.0))
    self.codebook = self.param("codebook", nn.with_logical_partitioning(init, ("vocab", None)),
                               (self.codebook_size, self.c_latent), jnp.float32)

  @property
  def stride(self) -> int:
    """Pixels per code side: pixel_unshuffle(2) × one stride-2 conv per level after the first."""
    return 2**self.levels

  def encode(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x [B,H,W,3] -> f [B,h,w,C], the unquantised, batch-normalised latent (fp32)."""
    return self.encoder(x, train)

  def quantize(self, f: jax.Array) -> dict[str, jax.Array]:
    """f [B,h,w,C] -> {"ids" [B,h,w], "f" (fp32), "z_q", "z_st" (straight-through),
    "affinity" [B,h,w,K]}."""
    ids, f, z_q, affinity = nearest_codes(f, self.codebook, False)
    return {"ids": ids, "f": f, "z_q": z_q, "z_st": straight_through(f, z_q), "affinity": affinity}

  def encode_codes(self, x: jax.Array) -> jax.Array:
    """x [B,H,W,3] -> codes int32 [B,h,w] (BatchNorm on its running statistics)."""
    return self.quantize(self.encode(x))["ids"]

  def decode(self, z_q: jax.Array) -> jax.Array:
    """Code vectors [B,h,w,C] (unscaled codebook vectors) -> images [B,H,W,3] (fp32, not clipped)."""
    return self.decoder(z_q)

  def embed_codes(self, ids: jax.Array) -> jax.Array:
    """codes int [B,h,w] -> their code vectors [B,h,w,C], fp32."""
    return lookup_table(self.codebook, False)[ids]

  def decode_codes(self, ids: jax.Array) -> jax.Array:
    """codes int [B,h,w] -> images [B,H,W,3] (Paella's `decode_indices`)."""
    return self.decode(self.embed_codes(ids))

  def __call__(self, x: jax.Array, train: bool = False
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """x [B,H,W,3] -> (reconstruction [B,H,W,3] through the straight-through code vectors,
    the quantizer's outputs as in `quantize`)."""
    q = self.quantize(self.encode(x, train))
    return self.decode(q["z_st"]), q


PRESETS: dict[str, dict[str, Any]] = {
    # Paella's VQGAN (HF dome272/Paella): f = 4, 256 px -> 64×64 codes, K 8192 of 4 dims.
    "paella_f4": dict(levels=2, bottleneck_blocks=12, c_hidden=384, c_latent=4,
                      codebook_size=8192, scale_factor=0.3764),
    # CPU presets (ours): f = 4, 32 px -> 8×8 codes. CIFAR-10: width 128, K 4096; digits: 64, 1024.
    "paella_small": dict(levels=2, bottleneck_blocks=4, c_hidden=128, c_latent=4,
                         codebook_size=4096, scale_factor=0.3764),
    "paella_tiny": dict(levels=2, bottleneck_blocks=2, c_hidden=64, c_latent=4,
                        codebook_size=1024, scale_factor=0.3764),
}


def make_paella_vq(preset: str, **overrides: Any) -> PaellaVQModel:
  """PaellaVQModel from a named preset, with any field overridden (e.g. codebook_size=512)."""
  if preset not in PRESETS:
    raise ValueError(f"unknown Paella VQ preset {preset!r}; valid presets: {sorted(PRESETS)}")
  return PaellaVQModel(**{**PRESETS[preset], **overrides})
