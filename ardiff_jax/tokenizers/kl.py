"""LDM AutoencoderKL (the KL-16 VAE of MAR, reference/mar.md §4) in flax.linen, NHWC.

Shape letters: B batch, H/W image height/width, C channels, h/w latent grid (H/stride, W/stride),
E embed_dim (latent channels).

Faithful to LDM's `ldm/modules/diffusionmodules/model.py` as copied into MAR's `models/vae.py`:
GroupNorm(eps 1e-6) + swish pre-activation ResNet blocks, single-head 1x1-conv attention, asymmetric
(0, 1) padding before each stride-2 conv, nearest x2 upsampling. Submodule names mirror LDM's
state dict (`encoder.down.0.block.1.norm1.weight` -> `encoder/down_0/block_1/norm1/scale`), so
`convert/kl.py` maps MAR's kl16.ckpt mechanically (conv weights OIHW -> HWIO; `--mode convert`).

`num_res_blocks` keeps LDM's meaning on both sides: the encoder has `num_res_blocks` blocks per
level, the decoder `num_res_blocks + 1`. MAR's "2 ResBlocks per level in the encoder and 3 in the
decoder" is therefore `enc_num_res_blocks = dec_num_res_blocks = 2`.

Deviations, by choice: dropout (0 in every LDM config) is omitted; the PyTorch temb path (unused by
the VAE) is omitted; initialisation is flax's lecun-normal for conv kernels and zeros for biases,
not PyTorch's kaiming-uniform(a=sqrt 5), which matters only when training from scratch.
"""
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# Posterior log-variance clamp of LDM's DiagonalGaussianDistribution.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0

_KERNEL_INIT = nn.with_logical_partitioning(
    nn.initializers.lecun_normal(), (None, None, "conv_in", "conv_out"))
_BIAS_INIT = nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",))
_SCALE_INIT = nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",))
_SHIFT_INIT = nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",))


def conv(features: int, kernel: int, dtype: Dtype, name: str, *, strides: int = 1,
         padding: Any = "SAME", use_bias: bool = True, kernel_init=_KERNEL_INIT) -> nn.Conv:
  """A square conv with fp32 params, `dtype` compute and logical axis names on its params."""
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding=padding,
                 use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                 kernel_init=kernel_init, bias_init=_BIAS_INIT, name=name)


def group_norm(x: jax.Array, num_groups: int, name: str) -> jax.Array:
  """GroupNorm(eps 1e-6) computed in fp32 whatever the compute dtype (bf16 statistics are too coarse).

  Must be called inside a compact method. Two-pass variance, as PyTorch computes it.
  """
  norm = nn.GroupNorm(num_groups=num_groups, epsilon=1e-6, dtype=jnp.float32,
                      param_dtype=jnp.float32, use_fast_variance=False,
                      scale_init=_SCALE_INIT, bias_init=_SHIFT_INIT, name=name)
  return norm(x.astype(jnp.float32))


def swish(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(x)


def _batch_constraint(x: jax.Array) -> jax.Array:
  """Shard feature maps [B,H,W,C] over the batch only; a no-op outside a rules context."""
  return nn.with_logical_constraint(x, ("batch", None, None, None))


class ResnetBlock(nn.Module):
  """norm1, swish, conv1 (3x3), norm2, swish, conv2 (3x3), plus a 1x1 `nin_shortcut` if C changes.

  [B,H,W,C_in] -> [B,H,W,out_channels].
  """
  out_channels: int
  norm_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = swish(group_norm(x, self.norm_groups, "norm1"))
    h = conv(self.out_channels, 3, self.dtype, "conv1")(h)
    h = swish(group_norm(h, self.norm_groups, "norm2"))
    h = conv(self.out_channels, 3, self.dtype, "conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 1, self.dtype, "nin_shortcut")(x)
    return x.astype(self.dtype) + h


class AttnBlock(nn.Module):
  """Single-head self-attention over the H*W positions, q/k/v/proj_out as 1x1 convs, residual.

  [B,H,W,C] -> [B,H,W,C]. Logits and softmax are fp32.
  """
  norm_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, hgt, wid, c = x.shape
    h = group_norm(x, self.norm_groups, "norm")
    q, k, v = (conv(c, 1, self.dtype, n)(h).reshape(b, hgt * wid, c) for n in ("q", "k", "v"))
    logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) * c**-0.5
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bqk,bkc->bqc", weights, v).reshape(b, hgt, wid, c)
    return x.astype(self.dtype) + conv(c, 1, self.dtype, "proj_out")(out)


class Downsample(nn.Module):
  """Zero-pad one row/column at the bottom/right, then a stride-2 VALID conv3x3 (LDM's padding).

  [B,H,W,C] -> [B,H/2,W/2,C].
  """
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return conv(x.shape[-1], 3, self.dtype, "conv", strides=2, padding="VALID")(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2, then conv3x3. [B,H,W,C] -> [B,2H,2W,C]."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return conv(x.shape[-1], 3, self.dtype, "conv")(x)


class Level(nn.Module):
  """One resolution level: `num_blocks` ResnetBlocks (`block_j`), each followed by an AttnBlock
  (`attn_j`) if `use_attn`, then an optional `downsample` or `upsample`.

  [B,H,W,C] -> [B,H',W',C'].
  """
  out_channels: int
  num_blocks: int
  use_attn: bool
  resample: str | None  # "down", "up" or None
  norm_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for j in range(self.num_blocks):
      x = ResnetBlock(self.out_channels, self.norm_groups, self.dtype, name=f"block_{j}")(x)
      if self.use_attn:
        x = AttnBlock(self.norm_groups, self.dtype, name=f"attn_{j}")(x)
    if self.resample == "down":
      x = Downsample(self.dtype, name="downsample")(x)
    elif self.resample == "up":
      x = Upsample(self.dtype, name="upsample")(x)
    return x


class MidBlock(nn.Module):
  """block_1, attn_1, block_2 at the lowest resolution. [B,h,w,C] -> [B,h,w,C]."""
  norm_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    x = ResnetBlock(c, self.norm_groups, self.dtype, name="block_1")(x)
    x = AttnBlock(self.norm_groups, self.dtype, name="attn_1")(x)
    return ResnetBlock(c, self.norm_groups, self.dtype, name="block_2")(x)


class Encoder(nn.Module):
  """LDM Encoder. [B,H,W,C_in] -> [B,h,w,2*z_channels] (or z_channels without double_z).

  `resolution` is the nominal input size used only to decide which levels get attention
  (a level gets it when its nominal size is in `attn_resolutions`), exactly as LDM does.
  """
  ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  attn_resolutions: Sequence[int]
  resolution: int
  z_channels: int
  double_z: bool = True
  norm_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = _batch_constraint(conv(self.ch, 3, self.dtype, "conv_in")(x.astype(self.dtype)))
    num_levels = len(self.ch_mult)
    for i, mult in enumerate(self.ch_mult):
      res = self.resolution // 2**i
      h = Level(self.ch * mult, self.num_res_blocks, res in self.attn_resolutions,
                "down" if i < num_levels - 1 else None, self.norm_groups, self.dtype,
                name=f"down_{i}")(h)
    h = MidBlock(self.norm_groups, self.dtype, name="mid")(h)
    h = swish(group_norm(h, self.norm_groups, "norm_out"))
    out_ch = 2 * self.z_channels if self.double_z else self.z_channels
    return conv(out_ch, 3, self.dtype, "conv_out")(h)


class Decoder(nn.Module):
  """LDM Decoder. [B,h,w,z_channels] -> [B,H,W,out_ch].

  Level i (`up_i`, i = 0 the highest resolution) has `num_res_blocks + 1` ResnetBlocks (LDM);
  levels run from the lowest resolution up, each but `up_0` ending in an Upsample.
  """
  ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  attn_resolutions: Sequence[int]
  resolution: int
  z_channels: int
  out_ch: int = 3
  norm_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    block_in = self.ch * self.ch_mult[-1]
    h = _batch_constraint(conv(block_in, 3, self.dtype, "conv_in")(z.astype(self.dtype)))
    h = MidBlock(self.norm_groups, self.dtype, name="mid")(h)
    for i in reversed(range(len(self.ch_mult))):
      res = self.resolution // 2**i
      h = Level(self.ch * self.ch_mult[i], self.num_res_blocks + 1, res in self.attn_resolutions,
                "up" if i > 0 else None, self.norm_groups, self.dtype, name=f"up_{i}")(h)
    h = swish(group_norm(h, self.norm_groups, "norm_out"))
    return conv(self.out_ch, 3, self.dtype, "conv_out")(h)


# ---------------------------------------------------------------------------------------------
# Diagonal Gaussian posterior (LDM's DiagonalGaussianDistribution), pure fp32 functions.


def split_moments(moments: jax.Array) -> tuple[jax.Array, jax.Array]:
  """moments [B,h,w,2E] -> (mean [B,h,w,E], logvar [B,h,w,E] clipped to [-30, 20]), fp32."""
  mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
  return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)


def posterior_sample(moments: jax.Array, rng: jax.Array) -> jax.Array:
  """z = mean + std * eps. [B,h,w,2E] -> [B,h,w,E]."""
  mean, logvar = split_moments(moments)
  return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, jnp.float32)


def posterior_mode(moments: jax.Array) -> jax.Array:
  """The posterior mean. [B,h,w,2E] -> [B,h,w,E]."""
  return split_moments(moments)[0]


def kl_to_standard_normal(moments: jax.Array) -> jax.Array:
  """KL(N(mean, var) || N(0, 1)) summed over h, w, E. [B,h,w,2E] -> [B]."""
  mean, logvar = split_moments(moments)
  kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
  return jnp.sum(kl, axis=(1, 2, 3))


# ---------------------------------------------------------------------------------------------
# The autoencoder.


class AutoencoderKL(nn.Module):
  """LDM AutoencoderKL: encoder -> quant_conv -> Gaussian posterior -> post_quant_conv -> decoder.

  Images [B,H,W,in_channels] in [-1, 1]; moments [B,h,w,2E]; latents [B,h,w,E] with
  h = H / 2**(len(enc_ch_mult) - 1). `dtype` is the compute dtype; params are fp32, GroupNorm,
  softmax and everything after quant_conv (moments) and conv_out (reconstructions) are fp32.
  """
  enc_ch: int
  enc_ch_mult: Sequence[int]
  enc_num_res_blocks: int
  enc_attn_resolutions: Sequence[int]
  dec_ch: int
  dec_ch_mult: Sequence[int]
  dec_num_res_blocks: int
  dec_attn_resolutions: Sequence[int]
  embed_dim: int
  z_channels: int
  resolution: int
  double_z: bool = True
  in_channels: int = 3
  out_ch: int = 3
  norm_groups: int = 32
  dtype: Dtype = jnp.float32

  def setup(self):
    if len(self.enc_ch_mult) != len(self.dec_ch_mult):
      raise ValueError(
          f"enc_ch_mult {tuple(self.enc_ch_mult)} and dec_ch_mult {tuple(self.dec_ch_mult)} "
          "must have the same length (the decoder must undo the encoder's stride)")
    self.encoder = Encoder(self.enc_ch, tuple(self.enc_ch_mult), self.enc_num_res_blocks,
                           tuple(self.enc_attn_resolutions), self.resolution, self.z_channels,
                           self.double_z, self.norm_groups, self.dtype)
    self.decoder = Decoder(self.dec_ch, tuple(self.dec_ch_mult), self.dec_num_res_blocks,
                           tuple(self.dec_attn_resolutions), self.resolution, self.z_channels,
                           self.out_ch, self.norm_groups, self.dtype)
    # LDM's quant_conv maps 2*z_channels -> 2*embed_dim even without double_z.
    self.quant_conv = conv(2 * self.embed_dim, 1, self.dtype, "quant_conv")
    self.post_quant_conv = conv(self.z_channels, 1, self.dtype, "post_quant_conv")

  @property
  def stride(self) -> int:
    return 2**(len(self.enc_ch_mult) - 1)

  def encode(self, x: jax.Array) -> jax.Array:
    """x [B,H,W,in_channels] in [-1, 1] -> moments [B,h,w,2E] (mean, logvar), fp32."""
    return self.quant_conv(self.encoder(x)).astype(jnp.float32)

  def decode(self, z: jax.Array) -> jax.Array:
    """z [B,h,w,E] (unscaled latents) -> x [B,H,W,out_ch], fp32."""
    h = self.post_quant_conv(z.astype(self.dtype))
    return _batch_constraint(self.decoder(h).astype(jnp.float32))

  def __call__(self, x: jax.Array, rng: jax.Array,
               sample_posterior: bool = True) -> tuple[jax.Array, jax.Array]:
    """x [B,H,W,in_channels] -> (reconstruction [B,H,W,out_ch], moments [B,h,w,2E])."""
    moments = self.encode(x)
    z = posterior_sample(moments, rng) if sample_posterior else posterior_mode(moments)
    return self.decode(z), moments


# ---------------------------------------------------------------------------------------------
# Presets and the tokenizer.

PRESETS: dict[str, dict[str, Any]] = {
    # MAR's released KL-16 (reference/mar.md §4): attention at 16x16 in the encoder only;
    # decoder attention only in mid (the authors "forgot" it, the weights match).
    # 66,456,019 params: x 4 bytes is the ~254 MB of the released kl16.ckpt.
    "kl16": dict(
        enc_ch=128, enc_ch_mult=(1, 1, 2, 2, 4), enc_num_res_blocks=2, enc_attn_resolutions=(16,),
        dec_ch=128, dec_ch_mult=(1, 1, 2, 2, 4), dec_num_res_blocks=2, dec_attn_resolutions=(),
        embed_dim=16, z_channels=16, double_z=True, resolution=256, norm_groups=32),
    # CIFAR-10 32 px -> 8x8x4; with patch 2 a token has 4*2*2 = 16 dims, like MAR's KL-16 tokens.
    "kl_small": dict(
        enc_ch=64, enc_ch_mult=(1, 2, 2), enc_num_res_blocks=2, enc_attn_resolutions=(8,),
        dec_ch=64, dec_ch_mult=(1, 2, 2), dec_num_res_blocks=2, dec_attn_resolutions=(),
        embed_dim=4, z_channels=4, double_z=True, resolution=32, norm_groups=32),
    # Digits and tests: 32 px -> 8x8x4, 1 block per encoder level (2 per decoder level, LDM's +1).
    "kl_tiny": dict(
        enc_ch=32, enc_ch_mult=(1, 2, 2), enc_num_res_blocks=1, enc_attn_resolutions=(8,),
        dec_ch=32, dec_ch_mult=(1, 2, 2), dec_num_res_blocks=1, dec_attn_resolutions=(),
        embed_dim=4, z_channels=4, double_z=True, resolution=32, norm_groups=8),
}

# Fixed latent scale that makes the latent std about 1 (MAR's code comment); not learned.
LATENT_SCALE: dict[str, float] = {"kl16": 0.2325}


def make_autoencoder(preset: str, **overrides: Any) -> AutoencoderKL:
  """AutoencoderKL from a named preset, with any field overridden (e.g. dtype=jnp.bfloat16)."""
  if preset not in PRESETS:
    raise ValueError(f"unknown AutoencoderKL preset {preset!r}; valid presets: {sorted(PRESETS)}")
  return AutoencoderKL(**{**PRESETS[preset], **overrides})


class KLTokenizer:
  """The continuous tokenizer contract (DESIGN.md): images [B,H,W,3] in [-1,1] <-> tokens [B,h,w,E].

  Tokens are posterior latents multiplied by `scale` (0.2325 for KL-16), so generators see
  roughly unit-variance tokens. Methods are pure functions of (params, inputs) and jit-able.
  """
  kind = "continuous"

  def __init__(self, model: AutoencoderKL, scale: float = 1.0):
    self.model = model
    self.scale = float(scale)
    self.stride = model.stride
    self.token_channels = model.embed_dim

  @classmethod
  def from_preset(cls, preset: str, **overrides: Any) -> "KLTokenizer":
    """Preset model with its LATENT_SCALE (1.0 where none is known)."""
    return cls(make_autoencoder(preset, **overrides), LATENT_SCALE.get(preset, 1.0))

  def encode(self, params: Any, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """images [B,H,W,3] -> tokens [B,h,w,E]: a posterior sample if `rng` is given, else the mean."""
    moments = self.model.apply(params, images, method=self.model.encode)
    z = posterior_mode(moments) if rng is None else posterior_sample(moments, rng)
    return z * self.scale

  def decode(self, params: Any, tokens: jax.Array) -> jax.Array:
    """tokens [B,h,w,E] (scaled) -> images [B,H,W,3], roughly in [-1, 1] (not clipped)."""
    return self.model.apply(params, tokens / self.scale, method=self.model.decode)
