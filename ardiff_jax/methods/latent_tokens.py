"""What every generator over continuous tokenizer latents shares (MAR, causal AR with DiffLoss).

Tokens come from cached posterior moments: tokens = patchify(scale · (μ + σ ⊙ ε)) (the posterior is
sampled, as MAR trains); samples go back through unpatchify, ÷ scale and the tokenizer's decoder.
A generator's config section (`mar`, `ar`) holds `patch_size` and `tokenizer_workdir`.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from ardiff_jax.models.mar import patchify, unpatchify
from ardiff_jax.tokenizers import kl as kl_lib
from ardiff_jax.train import optim


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
  from ardiff_jax import configlib  # pylint: disable=g-import-not-at-top
  from ardiff_jax.methods.condref import condref_config  # pylint: disable=g-import-not-at-top
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


def overrides(section) -> dict:
  return {k: tuple(v) if isinstance(v, list) else v for k, v in section.overrides.to_dict().items()}


def build_autoencoder(config: ml_collections.ConfigDict) -> kl_lib.AutoencoderKL:
  return kl_lib.make_autoencoder(config.tokenizer.preset, **overrides(config.tokenizer))


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
  from ardiff_jax.data.cache import latent_scale_from_cache  # pylint: disable=g-import-not-at-top
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
    return jnp.clip(jnp.round((jnp.clip(images, -1, 1) + 1) * 127.5), 0, 255).astype(jnp.uint8)

  return decode


def tokenizer_init(config: ml_collections.ConfigDict):
  """rng -> freshly initialised autoencoder params (the structure `tokenizer_loader` restores)."""
  ae = build_autoencoder(config)
  size = config.data.image_size
  return lambda rng: nn.meta.unbox(ae.init(rng, jnp.zeros((1, size, size, 3)), rng)["params"])


def tokenizer_loader(tokenizer_workdir: str):
  """() -> the tokenizer run's autoencoder params, restored from its own config and checkpoint."""

  def load():
    from ardiff_jax.sampling.run import restore_run_params  # pylint: disable=g-import-not-at-top
    if not tokenizer_workdir:
      raise ValueError("tokenizer_workdir is empty: point it at the tokenizer run whose decoder "
                       "turns tokens into images (e.g. workdirs/demo/kl)")
    return restore_run_params(tokenizer_workdir)["ae"]

  return load


def no_decay_in_head(params):
  """AdamW decays ≥2-D tensors (kernels, embeddings, positional embeddings, mask token, fake latent),
  never biases, norms or anything in the DiffLoss head (MAR's `add_weight_decay`)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, p: optim.matrix_like(path, p) and
      not any(getattr(k, "key", None) == "diffloss" for k in path), params)


def use_cpu_run(c: ml_collections.ConfigDict, section: ml_collections.ConfigDict, steps: int,
                tiny: bool) -> None:
  """Training and sampling sizes for a short CPU run (the digits demo, CIFAR-10 budget runs):
  lr 1e-3 rather than 1e-4·B/256; samples from the raw weights, since an EMA of a run this short
  still holds much of its initialisation (MAR's author: EMA needs ~100k steps); 50 DDPM steps, CFG 2;
  x̂_0 clipped to ±5 while sampling (tokens have unit std and |x| < 3.1 in the cache): a head
  trained for minutes is not exact enough at t ≈ T, where x̂_0 amplifies its error (MAR: no clip)."""
  section.num_sampling_steps = "50"
  section.clip_denoised = 5.0
  c.train.num_steps = steps
  c.train.log_every = 100
  c.train.ckpt_every = 1000
  c.train.ema_decay = 0.999
  c.sample.use_ema = False
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 200
  c.sample.num_samples = c.sample.batch_size = 100
  c.sample.cfg_scale = 2.0
  c.eval.num_samples, c.eval.batch_size = 1000, 100
  if tiny:
    section.num_sampling_steps = "5"
    c.train.num_steps, c.train.batch_size, c.train.log_every, c.train.ckpt_every = 3, 16, 1, 3
    c.sample.num_samples, c.sample.batch_size = 20, 16
    c.eval.num_samples, c.eval.batch_size = 40, 16


def _use_cached_latents(c: ml_collections.ConfigDict, section: ml_collections.ConfigDict,
                        tokenizer_workdir: str, eval_source: str) -> None:
  """What the dataset helpers below share: 32 px images, tokens from the cache of the tokenizer
  run at `tokenizer_workdir` at 1/std of the cache, 2×2 patches, and evaluation against the real
  images of `eval_source` (a fresh `eval.data` for the caller to complete)."""
  from ardiff_jax import configlib  # pylint: disable=g-import-not-at-top
  c.tokenizer.latent_scale = 0.0
  section.tokenizer_workdir = tokenizer_workdir
  section.patch_size = 2
  c.data.source = "cached"
  c.data.path = tokenizer_workdir + "/cache"
  c.data.image_size = 32
  c.eval.data = ml_collections.ConfigDict(configlib.base_config().data.to_dict())
  c.eval.data.source = eval_source
  c.eval.data.image_size = 32


def use_digits_latents(c: ml_collections.ConfigDict, section: ml_collections.ConfigDict,
                       tokenizer_workdir: str, tiny: bool) -> None:
  """Points a generator config at the digits demo tokenizer (`configs/kl_digits.py`) and its cache.

  32 px digits -> 8×8×4 latents -> 2×2 patches: 16 tokens of 16 dims (tiny: the 16 px two-level
  tokenizer, 8×8×4 latents, patch 1: 64 tokens of 4 dims). The scale is 1/std of the cache.
  Evaluation reads the digits images themselves (`eval.data`).
  """
  from ardiff_jax.tokenizers.train import tokenizer_config  # pylint: disable=g-import-not-at-top
  c.tokenizer = tokenizer_config("kl_tiny")
  c.tokenizer.overrides = dict(enc_ch=16, dec_ch=16, resolution=32)
  _use_cached_latents(c, section, tokenizer_workdir, eval_source="digits")
  c.data.random_flip = False               # digits are not mirror-symmetric
  c.eval.data.random_flip = False
  if tiny:
    c.tokenizer.overrides = dict(enc_ch=16, dec_ch=16, enc_ch_mult=(1, 2), dec_ch_mult=(1, 2),
                                 enc_attn_resolutions=(), resolution=16)
    c.data.image_size = c.eval.data.image_size = 16
    section.patch_size = 1


CIFAR10_TRAIN_IMAGES = 50_000


def use_cifar10_latents(c: ml_collections.ConfigDict, section: ml_collections.ConfigDict, *,
                        kl: str, path: str, preset: str) -> None:
  """Points a generator config at a `configs/kl_cifar10.py` run (`preset` must be that run's) and
  its cache; evaluation reads the CIFAR-10 image folder at `path` with the CIFAR-10 feature net.

  32 px -> 8×8×4 latents -> 2×2 patches: 16 tokens of 16 dims (KL-16's token width); the scale
  is 1/std of the cache (kl_cifar10 has no published scale).
  """
  from ardiff_jax.evals.features import use_cifar_feature_net  # pylint: disable=g-import-not-at-top
  from ardiff_jax.tokenizers.train import tokenizer_config  # pylint: disable=g-import-not-at-top
  c.tokenizer = tokenizer_config(preset)
  _use_cached_latents(c, section, kl, eval_source="folder")
  c.eval.data.path = path
  use_cifar_feature_net(c.eval.feature_net)


def use_cifar10_run(c: ml_collections.ConfigDict, section: ml_collections.ConfigDict, *,
                    steps: int, batch: int, cpu: bool) -> None:
  """`steps` steps of MAR's recipe with a 5-epoch warmup (MAR: 100 epochs of a 400-epoch run),
  EMA 0.9999, 100 DDPM steps, CFG 3; or, with `cpu`, the short-run settings of `use_cpu_run`
  (lr 1e-3, raw weights, 50 DDPM steps, CFG 2). Both evaluate 10,000 samples against the 10,000
  test images, as the real-train row of the evaluator check does."""
  if cpu:
    use_cpu_run(c, section, steps, tiny=False)
  else:
    c.train.num_steps = steps
    c.optim.warmup_steps = 5 * CIFAR10_TRAIN_IMAGES // batch
    c.train.log_every = 200
    c.train.ckpt_every = 5000
    c.sample.cfg_scale = 3.0
    c.sample.num_samples = c.sample.batch_size = 100
  c.eval.num_samples, c.eval.batch_size = 10000, 250


def use_digits_condref(c: ml_collections.ConfigDict, mode: str) -> None:
  """Condition refinement sized for a digits batch (64 images × 16 tokens = 1,024 conditions, of
  which MAR's mask leaves ≥ 70% loss-bearing): fit on 512 of them against 1,024 of a 4,096-entry
  queue that 256 conditions join per step (full after 16 steps)."""
  c.condref.mode = mode
  c.condref.update(num_points=512, num_reference=1024, queue_size=4096, push_per_step=256)


IMAGENET_TRAIN_IMAGES = 1_281_167


def use_imagenet_kl16(c: ml_collections.ConfigDict, section: ml_collections.ConfigDict, *,
                      kl: str, cache: str, batch: int, epochs: int) -> None:
  """ImageNet 256 through MAR's KL-16 (×0.2325, patch 1: 256 tokens × 16) from cached moments,
  `epochs` epochs with MAR's 100-epoch warmup, bf16 compute, 50k-sample evaluation."""
  from ardiff_jax.tokenizers.train import tokenizer_config  # pylint: disable=g-import-not-at-top
  c.tokenizer = tokenizer_config("kl16")
  c.tokenizer.latent_scale = 0.2325
  section.tokenizer_workdir = kl
  c.data.source = "cached"
  c.data.path = cache
  c.data.image_size = 256
  c.data.num_classes = 1000
  c.data.eval_split = "validation"
  c.data.num_workers = 8
  steps_per_epoch = IMAGENET_TRAIN_IMAGES // batch
  c.train.num_steps = epochs * steps_per_epoch
  c.optim.warmup_steps = 100 * steps_per_epoch
  c.train.compute_dtype = "bfloat16"
  c.train.log_every = 100
  c.train.ckpt_every = 5000
  c.sample.batch_size = 256
  c.eval.num_samples = 50000
  c.eval.batch_size = 256
