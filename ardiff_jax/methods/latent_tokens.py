"""What every generator over continuous tokenizer latents shares (MAR, causal AR with DiffLoss).

Tokens come from cached posterior moments: tokens = patchify(scale · (μ + σ ⊙ ε)) (the posterior is
sampled, as MAR trains); samples go back through unpatchify, ÷ scale and the tokenizer's decoder.
A generator's config section (`mar`, `ar`) holds `patch_size` and `tokenizer_workdir`. The dataset
and run-size helpers that configs use (`use_cpu_run`, `use_digits_latents`, ...) are in
`ardiff_jax/presets.py`.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from ardiff_jax import configlib
from ardiff_jax.data.cache import latent_scale_from_cache
from ardiff_jax.methods import frozen_run_loader, kl_tokenizer, reconstruction
from ardiff_jax.methods.condref import condref_config
from ardiff_jax.models.layers import matrix_like
from ardiff_jax.models.mar import patchify, unpatchify
from ardiff_jax.tokenizers import kl as kl_lib


def generator_section(preset: str) -> ml_collections.ConfigDict:
  """The config fields every DiffLoss generator section (`mar`, `ar`) has, at MAR's defaults."""
  g = ml_collections.ConfigDict()
  g.preset = preset
  g.overrides = ml_collections.ConfigDict()   # model fields to change in the preset
  g.patch_size = 1
  g.label_drop = 0.1
  g.diffusion_batch_mul = 4
  g.num_sampling_steps = "100"    # DDPM steps of the DiffLoss sampler (respaced from T = 1000)
  g.cfg_schedule = "linear"
  g.temperature = 1.0
  g.clip_denoised = 0.0           # >0 clips the head's x̂_0 while sampling (MAR: no clipping)
  g.tokenizer_workdir = ""        # the trained tokenizer run whose decoder turns tokens into images
  g.remat = "none"                # backbone blocks: models.layers.REMAT_POLICIES (large models)
  g.scan_layers = False           # backbone blocks as one nn.scan (large models; other checkpoint tree)
  return g


def generator_base_config(method: str, section_name: str, section: ml_collections.ConfigDict,
                          batch_size: int) -> ml_collections.ConfigDict:
  """A full training config with MAR's optimisation (reference/mar.md §2.6), shared by the
  causal AR variant: AdamW(0.9, 0.95), weight decay 0.02 (not on biases, norms or the DiffLoss
  head), lr = 1e-4·B/256, linear warmup then constant, clip 3.0, EMA 0.9999, cached tokens.
  Dataset configs set the tokenizer, the data paths, the steps and the warmup (100 epochs in MAR).
  """
  c = configlib.base_config()
  c.method = method
  c[section_name] = section
  c.condref = condref_config()   # condition refinement (methods/condref.py), off by default
  c.train.batch_size = batch_size
  c.train.ema_decay = 0.9999
  c.optim.lr = 1e-4 * batch_size / 256
  c.optim.b1, c.optim.b2 = 0.9, 0.95
  c.optim.weight_decay = 0.02
  c.optim.grad_clip_norm = 3.0
  c.optim.schedule = "constant"
  c.data.source = "cached"
  return c


def build_autoencoder(config: ml_collections.ConfigDict) -> kl_lib.AutoencoderKL:
  """The tokenizer whose latents a generator models (float32: only its decoder runs here)."""
  return kl_tokenizer.build_autoencoder(config.tokenizer)


def token_geometry(config: ml_collections.ConfigDict, patch_size: int) -> tuple[int, int]:
  """(tokens L, token dim C) from the tokenizer's stride and latent width, image size and patch."""
  ae = build_autoencoder(config)
  side = config.data.image_size // 2 ** (len(ae.enc_ch_mult) - 1)
  if side % patch_size:
    raise ValueError(f"latent side {side} is not divisible by patch_size={patch_size}")
  return (side // patch_size) ** 2, ae.embed_dim * patch_size * patch_size


def token_scale(config: ml_collections.ConfigDict) -> float:
  """`tokenizer.latent_scale` (0.2325 for KL-16); 0 means 1/std of the cached latents, which
  `--mode cache` measured (our choice for tokenizers without a published scale, e.g. digits)."""
  if config.tokenizer.latent_scale > 0:
    return float(config.tokenizer.latent_scale)
  return latent_scale_from_cache(config.data.path)


def tokens_from_moments(moments: jax.Array, rng: jax.Array, scale: float, patch_size: int) -> jax.Array:
  """Cached moments [B, h, w, 2E] -> tokens [B, L, C] from a posterior sample."""
  return patchify(kl_lib.posterior_sample(moments.astype(jnp.float32), rng) * scale, patch_size)


def make_decoder(config: ml_collections.ConfigDict, scale: float, patch_size: int):
  """(frozen tokenizer params, tokens [B, L, C]) -> uint8 images [B, H, W, 3]."""
  ae = build_autoencoder(config)

  def decode(frozen, tokens):
    latents = unpatchify(tokens, patch_size, ae.embed_dim) / scale
    images = ae.apply({"params": frozen}, latents, method=ae.decode).astype(jnp.float32)
    return reconstruction.to_uint8(jnp.clip(images, -1, 1))

  return decode


def tokenizer_init(config: ml_collections.ConfigDict):
  """rng -> freshly initialised autoencoder params (the structure `tokenizer_loader` restores)."""
  ae = build_autoencoder(config)
  size = config.data.image_size
  return lambda rng: nn.meta.unbox(ae.init(rng, jnp.zeros((1, size, size, 3)), rng)["params"])


def tokenizer_loader(tokenizer_workdir: str):
  """`Method.load_frozen`: the KL tokenizer run's autoencoder params, restored from that run's own
  config and checkpoint (a VQ run is refused: its codes feed method=llamagen)."""
  return frozen_run_loader(tokenizer_workdir, "ae", "tokenizer_workdir",
                           "KL tokenizer (configs/kl_*.py)")


def no_decay_in_head(params):
  """AdamW decays ≥2-D tensors (kernels, embeddings, positional embeddings, mask token, fake latent),
  never biases, norms or anything in the DiffLoss head (MAR's `add_weight_decay`)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, p: matrix_like(path, p) and
      not any(getattr(k, "key", None) == "diffloss" for k in path), params)
