"""MAR's training objective (Li et al. 2024, §3.2–3.3, reference/mar.md §2.3–2.6) as a `Method`.

For a batch of cached posterior moments (MAR's `main_cache.py` layout, flip variant already chosen):
  tokens  = patchify(scale · (μ + σ ⊙ ε))                  (the posterior is sampled, ×0.2325 for KL-16)
  order   ~ a random permutation per image;  r ~ N(1, 0.25²) truncated to [mask_ratio_min, 1], once per batch
  mask    = the first ⌈L·r⌉ positions of each order
  class   = class embedding, replaced by the learned fake latent with probability label_drop (CFG)
  z       = MAR(tokens, mask, class)                         (dropout 0.1 in training)
  L       = Σ_masked copies [ mean_c (ε − ε̂)² + L_vlb ] / #masked copies, each token repeated
            `diffusion_batch_mul` times with its own t ~ U{0..999}          (DiffLoss, §3.2 eq. 2)
Weight decay applies to ≥2-D tensors outside the DiffLoss head (biases, norms and the head are exempt).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections

from ardiff_jax.diffusion.gaussian import create_diffusion
from ardiff_jax.methods import Method
from ardiff_jax.models import mar as mar_lib
from ardiff_jax.models.diffloss import diffloss_loss
from ardiff_jax.sampling.mar import sample_tokens
from ardiff_jax.tokenizers import kl as kl_lib


def mar_config(preset: str = "mar_base") -> ml_collections.ConfigDict:
  """Defaults of the `mar` config section: MAR's released recipe (reference/mar.md §2, §3)."""
  m = ml_collections.ConfigDict()
  m.preset = preset
  m.overrides = ml_collections.ConfigDict()   # MAR module fields to change in the preset
  m.patch_size = 1
  m.mask_ratio_min = 0.7
  m.label_drop = 0.1
  m.diffusion_batch_mul = 4
  m.num_sampling_steps = "100"    # DDPM steps of the DiffLoss sampler (respaced from T = 1000)
  m.num_ar_steps = 64
  m.cfg_schedule = "linear"
  m.temperature = 1.0
  m.tokenizer_workdir = ""        # the trained tokenizer run whose decoder turns tokens into images
  return m


def mar_base_config(preset: str, batch_size: int) -> ml_collections.ConfigDict:
  """A full MAR training config with the paper's optimisation (reference/mar.md §2.6).

  AdamW(0.9, 0.95), weight decay 0.02 (not on biases, norms or the head), lr = 1e-4·B/256,
  linear warmup then constant, clip 3.0, EMA 0.9999; tokens from cached tokenizer moments.
  Dataset configs set the tokenizer, the data paths, the steps and the warmup (100 epochs in MAR).
  """
  from ardiff_jax import configlib  # pylint: disable=g-import-not-at-top
  c = configlib.base_config()
  c.method = "mar"
  c.mar = mar_config(preset)
  c.train.batch_size = batch_size
  c.train.ema_decay = 0.9999
  c.optim.lr = 1e-4 * batch_size / 256
  c.optim.b1, c.optim.b2 = 0.9, 0.95
  c.optim.weight_decay = 0.02
  c.optim.grad_clip_norm = 3.0
  c.optim.schedule = "constant"
  c.data.source = "cached"
  return c


def token_geometry(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(latent side h, tokens L, token dim C) from the tokenizer preset, image size and patch size."""
  ae = kl_lib.make_autoencoder(config.tokenizer.preset, **_overrides(config.tokenizer))
  stride = 2 ** (len(ae.enc_ch_mult) - 1)
  side = config.data.image_size // stride
  p = config.mar.patch_size
  if side % p:
    raise ValueError(f"latent side {side} is not divisible by mar.patch_size={p}")
  return side, (side // p) ** 2, ae.embed_dim * p * p


def _overrides(tcfg) -> dict:
  return {k: tuple(v) if isinstance(v, list) else v for k, v in tcfg.overrides.to_dict().items()}


def token_scale(config: ml_collections.ConfigDict) -> float:
  """`tokenizer.latent_scale` (0.2325 for KL-16); 0 means 1/std of the cached latents, which
  `--mode cache` measured (our choice for tokenizers without a published scale, e.g. digits)."""
  if config.tokenizer.latent_scale > 0:
    return float(config.tokenizer.latent_scale)
  from ardiff_jax.data.cache import latent_scale_from_cache  # pylint: disable=g-import-not-at-top
  return latent_scale_from_cache(config.data.path)


def build_model(config: ml_collections.ConfigDict) -> mar_lib.MAR:
  _, seq_len, token_dim = token_geometry(config)
  return mar_lib.make_mar(config.mar.preset, token_dim=token_dim, seq_len=seq_len,
                          num_classes=config.data.num_classes,
                          dtype=jnp.dtype(config.train.compute_dtype), **_overrides(config.mar))


def decay_mask(params):
  """AdamW decays ≥2-D tensors (kernels, embeddings, positional embeddings, mask token, fake latent),
  never biases, norms or anything in the DiffLoss head (MAR's `add_weight_decay`)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, p: p.ndim >= 2 and not any(getattr(k, "key", None) == "diffloss" for k in path),
      params)


def make_method(config: ml_collections.ConfigDict) -> Method:
  m = config.mar
  model = build_model(config)
  _, seq_len, token_dim = token_geometry(config)
  scale = token_scale(config)
  train_diffusion = create_diffusion(1000)
  sample_diffusion = create_diffusion(1000, m.num_sampling_steps)
  schedule = mar_lib.cosine_schedule(seq_len, m.num_ar_steps)
  encoder_len = mar_lib.training_encoder_len(seq_len, model.buffer_size, m.mask_ratio_min)
  min_masked = math.ceil(seq_len * m.mask_ratio_min)
  embed_dim = token_dim // (m.patch_size ** 2)

  def init_params(rng):
    return model.init(rng, method=mar_lib.MAR.init_all)["params"]

  def tokens_from_moments(moments, rng):
    latents = kl_lib.posterior_sample(moments, rng) * scale
    return mar_lib.patchify(latents, m.patch_size)

  def loss_fn(params, batch, rng, step, extras):
    del step
    r_tok, r_order, r_ratio, r_drop, r_dropout, r_diff = jax.random.split(rng, 6)
    tokens = tokens_from_moments(batch["moments"].astype(jnp.float32), r_tok)      # [B, L, C]
    b = tokens.shape[0]
    orders = mar_lib.sample_orders(r_order, b, seq_len)
    ratio = mar_lib.sample_mask_ratio(r_ratio, m.mask_ratio_min)
    num_masked = jnp.clip(jnp.ceil(seq_len * ratio).astype(jnp.int32), min_masked, seq_len)
    mask = mar_lib.mask_by_order(orders, num_masked)
    apply = lambda *a, **kw: model.apply({"params": params}, *a, **kw)
    drop = jax.random.uniform(r_drop, (b,)) < m.label_drop
    cls = apply(batch["label"], drop, method=mar_lib.MAR.class_embedding)
    z = apply(tokens, mask, cls, encoder_len=encoder_len, deterministic=False,
              rngs={"dropout": r_dropout})
    head = lambda x, t, zz: apply(x, t, zz, method=mar_lib.MAR.head)
    loss, terms = diffloss_loss(head, train_diffusion, z.reshape(-1, z.shape[-1]),
                                tokens.reshape(-1, token_dim), mask.reshape(-1), r_diff,
                                m.diffusion_batch_mul)
    return loss, dict(terms, mask_ratio=num_masked / seq_len), extras

  def load_frozen():
    from ardiff_jax.sampling.run import restore_run_params  # pylint: disable=g-import-not-at-top
    if not m.tokenizer_workdir:
      raise ValueError("mar.tokenizer_workdir is empty: point it at the tokenizer run whose "
                       "decoder turns tokens into images (e.g. workdirs/demo/kl)")
    return restore_run_params(m.tokenizer_workdir)["ae"]

  ae = kl_lib.make_autoencoder(config.tokenizer.preset, **_overrides(config.tokenizer))

  def generate(params, frozen, batch, rng):
    """Class-conditional samples: labels [B] -> uint8 images [B, H, W, 3] (EMA weights by default)."""
    tokens = sample_tokens(model, params, batch["label"], rng, diffusion=sample_diffusion,
                           schedule=schedule, cfg_scale=float(config.sample.cfg_scale),
                           cfg_schedule=m.cfg_schedule, temperature=float(m.temperature))
    latents = mar_lib.unpatchify(tokens, m.patch_size, embed_dim) / scale
    images = ae.apply({"params": frozen}, latents, method=ae.decode)
    return jnp.clip(jnp.round((jnp.clip(images.astype(jnp.float32), -1, 1) + 1) * 127.5), 0, 255).astype(jnp.uint8)

  return Method(name="mar", model=model, init_params=init_params, loss_fn=loss_fn,
                batch_keys=("moments", "label"), decay_mask=decay_mask, generate=generate,
                generate_from="labels", load_frozen=load_frozen)
