"""Training objective of the VQ tokenizer (LlamaGen `VQLoss`, reference/llamagen_star.md §1.1).

For images x [B,H,W,3] in [-1, 1] and their reconstruction x̂ through the straight-through codes:
  L = w_rec·mean(x − x̂)² + w_p·LPIPS(x, x̂) + ‖z_q − sg(f)‖² + β‖sg(z_q) − f‖² + w_ent·H
      + 1[step ≥ disc_start]·w_d·( −mean D(x̂) + hinge_D(D(x), D(sg x̂)) )
with f the l2-normalised encoder output, z_q its nearest (normalised) codebook vector, β 0.25,
w_ent 0 and w_d 0.5 (LlamaGen scales the discriminator's own loss by w_d too). The discriminator
and the tokenizer share one optimizer update, each term seeing only its own parameters'
gradient (`reconstruction.adversarial_terms`). LlamaGen trains with plain Adam(0.9, 0.95), no
weight decay, lr 1e-4 at batch 128, constant (the paper says AdamW 0.05; the code does not).

The perceptual term reads the user's LPIPS weights (`tokenizer.lpips_vgg16`: torchvision's
vgg16-397923af.pth; `tokenizer.lpips_lin`: LPIPS's vgg.pth; `tokenizers/lpips.py`); without them the
perceptual weight is 0 and the log says so once (`reconstruction.perceptual_loss`).
Codebook usage (the share of the K codes among the last `usage_window` indices) is kept in the
train state's extras and logged as `codebook_usage`.

A Paella preset (`tokenizer.preset` in `tokenizers/paella_vq.PRESETS`) trains Paella's f = 4 VQGAN
with the same losses; f is then its batch-normalised latent, searched without l2 normalisation.
Its BatchNorm runs on batch statistics inside `loss_fn`, whose running averages are method-owned
state (`extras["vq_batch_stats"]`, the `batch_stats` collection). `sampling_params` adds them to
the weights, so `encode` (what `--mode cache` stores), `reconstruct`, sample and eval use the
running averages; decoding codes reads `params["vq"]` alone (the decoder has no BatchNorm), which
is what a generator's frozen tokenizer loads.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ardiff_jax import configlib
from ardiff_jax.methods import Method
from ardiff_jax.methods import reconstruction as rec_lib
from ardiff_jax.tokenizers import losses
from ardiff_jax.tokenizers import paella_vq
from ardiff_jax.tokenizers import vq as vq_lib

USAGE_KEY = "code_usage"
BATCH_STATS_KEY = "vq_batch_stats"   # a Paella encoder's BatchNorm running statistics


def build_vq(tcfg: ml_collections.ConfigDict, compute_dtype: str = "float32"
             ) -> vq_lib.VQModel | paella_vq.PaellaVQModel:
  """The VQ model of a `tokenizer` config section (its preset and overrides): LlamaGen's VQModel,
  or Paella's VQGAN for a Paella preset."""
  kwargs = dict(dtype=jnp.dtype(compute_dtype), **configlib.overrides(tcfg))
  if tcfg.preset in paella_vq.PRESETS:
    return paella_vq.make_paella_vq(tcfg.preset, **kwargs)
  if tcfg.preset not in vq_lib.PRESETS:
    raise ValueError(f"unknown VQ preset tokenizer.preset={tcfg.preset!r}; valid presets: "
                     f"{sorted(vq_lib.PRESETS)} (LlamaGen) and {sorted(paella_vq.PRESETS)} (Paella)")
  return vq_lib.make_vq(tcfg.preset, **kwargs)


def uses_batch_norm(vq) -> bool:
  """Whether the VQ model's encoder carries BatchNorm statistics (Paella's VQGAN)."""
  return isinstance(vq, paella_vq.PaellaVQModel)


def code_geometry(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(codes per side h, sequence length L = h², vocabulary V) of the configured VQ tokenizer."""
  vq = build_vq(config.tokenizer)
  if config.data.image_size % vq.stride:
    raise ValueError(f"data.image_size={config.data.image_size} is not a multiple of the VQ "
                     f"tokenizer's stride {vq.stride}")
  side = config.data.image_size // vq.stride
  return side, side * side, vq.codebook_size


def init_vq_params(vq, rng: jax.Array, image_size: int):
  """Freshly initialised, unboxed VQ parameters (what a generator's `init_frozen` gives bench)."""
  return nn.meta.unbox(vq.init(rng, jnp.zeros((1, image_size, image_size, 3)))["params"])


def codes_to_images(vq, vq_params, codes: jax.Array, side: int) -> jax.Array:
  """Codes int [B, side²] or [B, side, side] -> uint8 images [B, H, W, 3] (decoded, clipped)."""
  images = vq.apply({"params": vq_params}, codes.reshape(-1, side, side), method=vq.decode_codes)
  return rec_lib.to_uint8(jnp.clip(images, -1, 1))


def code_vectors(vq, vq_params) -> jax.Array:
  """The codebook vectors [V, C] the decoder reads for each code (LlamaGen's: l2-normalised)."""
  return vq.apply({"params": vq_params}, jnp.arange(vq.codebook_size), method=vq.embed_codes)


def check_code_batch(batch, side: int, vocab: int, config: ml_collections.ConfigDict,
                     field: str) -> None:
  """Host-side check of a first batch of cached codes: integer codes of the configured VQ
  tokenizer's grid (side × side) and vocabulary, or a ValueError naming the fix (`field` is the
  config field that names the tokenizer run)."""
  codes = np.asarray(batch["codes"])
  if codes.dtype.kind not in "iu":
    raise ValueError(f"{config.method} reads integer codes; the cache holds {codes.dtype} values")
  if codes.shape[1:] != (side, side):
    raise ValueError(f"the cached codes are {codes.shape[1:]} grids, but the VQ tokenizer at "
                     f"data.image_size={config.data.image_size} gives {side}×{side}: cache with "
                     f"the tokenizer run named in {field}")
  if codes.min() < 0 or codes.max() >= vocab:
    raise ValueError(f"cached codes span [{codes.min()}, {codes.max()}] but the VQ tokenizer has "
                     f"{vocab} codes (tokenizer.preset={config.tokenizer.preset!r}): cache with "
                     f"the tokenizer run named in {field}")


def make_method(config: ml_collections.ConfigDict) -> Method:
  tcfg = config.tokenizer
  vq = build_vq(tcfg, config.train.compute_dtype)
  disc = (losses.PatchDiscriminator(ndf=tcfg.disc_ndf, n_layers=tcfg.disc_layers)
          if tcfg.disc_enabled else None)
  size = config.data.image_size
  perceptual_loss = rec_lib.lazy_perceptual_loss(tcfg, size)
  batch_norm = uses_batch_norm(vq)

  def init_params(rng):
    x = jnp.zeros((1, size, size, 3), jnp.float32)
    r_vq, r_disc = jax.random.split(rng)
    params = {"vq": vq.init(r_vq, x)["params"]}
    if disc is not None:
      params["disc"] = disc.init(r_disc, x)["params"]
    return params

  def init_extras(rng):
    extras = {USAGE_KEY: vq_lib.init_usage(tcfg.usage_window)}
    if batch_norm:   # mean 0, variance 1 (not rng-dependent); the smallest image the model takes
      x = jnp.zeros((1, vq.stride, vq.stride, 3), jnp.float32)
      extras[BATCH_STATS_KEY] = vq.init(rng, x)["batch_stats"]
    return extras

  def sampling_params(params, extras):
    """The weights, plus a Paella encoder's running BatchNorm statistics."""
    return {**params, BATCH_STATS_KEY: extras[BATCH_STATS_KEY]} if batch_norm else params

  def encoder_variables(params):
    """What `vq.encode` reads: the weights (and the running statistics of `sampling_params`)."""
    if not batch_norm:
      return {"params": params["vq"]}
    if BATCH_STATS_KEY not in params:
      raise ValueError(f"Paella's VQ encoder needs its BatchNorm running statistics: pass the "
                       f"params through Method.sampling_params (they hold {sorted(params)})")
    return {"params": params["vq"], "batch_stats": params[BATCH_STATS_KEY]}

  def loss_fn(params, batch, rng, step, extras):
    del rng
    x = batch["image"].astype(jnp.float32)
    if batch_norm:   # batch statistics; their running averages are carried in extras
      (x_rec, q), updated = vq.apply({"params": params["vq"], "batch_stats": extras[BATCH_STATS_KEY]},
                                     x, train=True, mutable=["batch_stats"])
      extras = {**extras, BATCH_STATS_KEY: updated["batch_stats"]}
    else:
      x_rec, q = vq.apply({"params": params["vq"]}, x)
    rec = jnp.mean(jnp.square(x - x_rec))
    codebook, commit = vq_lib.codebook_losses(q["f"], q["z_q"], tcfg.codebook_beta)
    loss = tcfg.rec_weight * rec + codebook + commit
    metrics = {"rec_loss": rec, "codebook_loss": codebook, "commit_loss": commit,
               "psnr": jnp.mean(rec_lib.psnr(x, x_rec))}
    perceptual = perceptual_loss()
    if perceptual is not None:
      metrics["perceptual_loss"] = jnp.mean(perceptual(x, x_rec))
      loss = loss + tcfg.perceptual_weight * metrics["perceptual_loss"]
    if tcfg.entropy_weight:
      loss = loss + tcfg.entropy_weight * vq_lib.entropy_loss(q["affinity"], tcfg.entropy_temperature)
    usage = vq_lib.push_usage(extras[USAGE_KEY], q["ids"])
    metrics["codebook_usage"] = vq_lib.codebook_usage(usage, vq.codebook_size)
    if disc is not None:
      on = (step >= tcfg.disc_start).astype(jnp.float32)
      g_loss, d_loss = rec_lib.adversarial_terms(disc, params["disc"], x, x_rec)
      loss = loss + on * tcfg.disc_weight * (g_loss + d_loss)
      metrics.update(g_loss=g_loss, d_loss=d_loss)
    return loss, metrics, {**extras, USAGE_KEY: usage}

  def encode(params, images):
    """What `--mode cache` stores: codes int32 [B,h,w]."""
    return vq.apply(encoder_variables(params), images, method=vq.encode_codes)

  def reconstruct(params, x):
    """[B,H,W,3] in [-1, 1] -> decode(codes(x)), clipped to [-1, 1]."""
    ids = encode(params, x)
    return jnp.clip(vq.apply({"params": params["vq"]}, ids, method=vq.decode_codes), -1, 1)

  generate, visualize = rec_lib.reconstruction_views(reconstruct)
  return Method(name="vq_tokenizer", model=vq, init_params=init_params, init_extras=init_extras,
                loss_fn=loss_fn, batch_keys=("image",), visualize=visualize, generate=generate,
                generate_from="images", encode=encode, codebook_size=vq.codebook_size,
                sampling_params=sampling_params)


def tokenizer_config(preset: str = "vq_tiny") -> ml_collections.ConfigDict:
  """Defaults of a VQ `tokenizer` config section (LlamaGen's VQ-16 training unless noted)."""
  t = ml_collections.ConfigDict()
  t.preset = preset                           # vq.PRESETS (LlamaGen) or paella_vq.PRESETS
  t.overrides = ml_collections.ConfigDict()   # model fields to change in the preset
  t.rec_weight = 1.0                           # l2 pixel loss
  t.perceptual_weight = 1.0                    # LPIPS; 0 (logged) while the files below are unset
  t.lpips_vgg16 = ""                           # torchvision's vgg16-397923af.pth (user-supplied)
  t.lpips_lin = ""                             # LPIPS's vgg.pth: the linear layers (user-supplied)
  t.codebook_beta = 0.25                       # commitment β
  t.entropy_weight = 0.0                       # LlamaGen's entropy_loss_ratio
  t.entropy_temperature = 0.01
  t.usage_window = 65536                       # indices behind the codebook-usage metric
  t.disc_enabled = True
  t.disc_start = 20000
  t.disc_weight = 0.5
  t.disc_ndf = 64
  t.disc_layers = 3
  return t


def tokenizer_base_config(preset: str) -> ml_collections.ConfigDict:
  """A full config for training a VQ tokenizer with LlamaGen's optimisation: Adam(0.9, 0.95), no
  weight decay, constant lr 1e-4 at batch 128, no EMA (reconstructions and codes from the raw
  weights). Dataset configs fill in data, steps and lr."""
  c = configlib.base_config()
  c.method = "vq_tokenizer"
  c.tokenizer = tokenizer_config(preset)
  c.train.batch_size = 128
  c.optim.lr = 1e-4
  c.optim.b1, c.optim.b2 = 0.9, 0.95
  c.optim.weight_decay = 0.0
  c.optim.schedule = "constant"
  c.sample.use_ema = False
  c.cache.use_ema = False
  return c
