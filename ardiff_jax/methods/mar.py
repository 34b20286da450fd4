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

from ardiff_jax import configlib
from ardiff_jax.diffusion.gaussian import create_diffusion
from ardiff_jax.methods import Method
from ardiff_jax.methods import condref
from ardiff_jax.methods import latent_tokens as lt
from ardiff_jax.models import mar as mar_lib
from ardiff_jax.models.diffloss import diffloss_loss
from ardiff_jax.sampling.mar import sample_tokens


def mar_config(preset: str = "mar_base") -> ml_collections.ConfigDict:
  """Defaults of the `mar` config section: MAR's released recipe (reference/mar.md §2, §3)."""
  m = lt.generator_section(preset)
  m.mask_ratio_min = 0.7
  m.num_ar_steps = 64
  return m


def mar_base_config(preset: str, batch_size: int) -> ml_collections.ConfigDict:
  """A full MAR config with the paper's optimisation (`latent_tokens.generator_base_config`)."""
  return lt.generator_base_config("mar", "mar", mar_config(preset), batch_size)


def build_model(config: ml_collections.ConfigDict) -> mar_lib.MAR:
  seq_len, token_dim = lt.token_geometry(config, config.mar.patch_size)
  return mar_lib.make_mar(config.mar.preset, token_dim=token_dim, seq_len=seq_len,
                          num_classes=config.data.num_classes,
                          remat=config.mar.remat, scan_layers=config.mar.scan_layers,
                          dtype=jnp.dtype(config.train.compute_dtype), **configlib.overrides(config.mar))


decay_mask = lt.no_decay_in_head


def make_method(config: ml_collections.ConfigDict) -> Method:
  m = config.mar
  model = build_model(config)
  seq_len, token_dim = lt.token_geometry(config, m.patch_size)
  scale = lt.token_scale(config)
  train_diffusion = create_diffusion(1000)
  sample_diffusion = create_diffusion(1000, m.num_sampling_steps)
  schedule = mar_lib.cosine_schedule(seq_len, m.num_ar_steps)
  encoder_len = mar_lib.training_encoder_len(seq_len, model.buffer_size, m.mask_ratio_min)
  min_masked = math.ceil(seq_len * m.mask_ratio_min)
  refinement = condref.for_generator(config, model, loss_tokens_per_image=min_masked)

  def init_params(rng):
    own = model.init(rng, method=mar_lib.MAR.init_all)["params"]
    return {**own, **refinement.init_params(jax.random.fold_in(rng, 1))}

  def loss_fn(params, batch, rng, step, extras, ema_params=None):
    del step
    r_tok, r_order, r_ratio, r_drop, r_dropout, r_diff = jax.random.split(rng, 6)
    own = condref.generator_params(params)
    tokens = lt.tokens_from_moments(batch["moments"], r_tok, scale, m.patch_size)   # [B, L, C]
    b = tokens.shape[0]
    orders = mar_lib.sample_orders(r_order, b, seq_len)
    ratio = mar_lib.sample_mask_ratio(r_ratio, m.mask_ratio_min)
    num_masked = jnp.clip(jnp.ceil(seq_len * ratio).astype(jnp.int32), min_masked, seq_len)
    mask = mar_lib.mask_by_order(orders, num_masked)
    apply = lambda *a, **kw: model.apply({"params": own}, *a, **kw)
    drop = jax.random.uniform(r_drop, (b,)) < m.label_drop
    cls = apply(batch["label"], drop, method=mar_lib.MAR.class_embedding)
    z = apply(tokens, mask, cls, encoder_len=encoder_len, deterministic=False,
              rngs={"dropout": r_dropout})
    head = lambda x, t, zz: apply(x, t, zz, method=mar_lib.MAR.head)
    fixed_head = lambda x, t, zz: model.apply({"params": jax.lax.stop_gradient(own)}, x, t, zz,
                                              method=mar_lib.MAR.head)
    seen_labels = jnp.where(drop, config.data.num_classes, batch["label"])
    teacher = None
    if refinement.uses_teacher:   # the EMA model with more context: a prefix of the same order
      scale_t = refinement.cfg.teacher_mask_scale
      t_mask = mar_lib.mask_by_order(orders, jnp.maximum(1, jnp.ceil(num_masked * scale_t)).astype(jnp.int32))
      ema = {"params": jax.lax.stop_gradient(condref.generator_params(ema_params))}
      t_cls = model.apply(ema, batch["label"], method=mar_lib.MAR.class_embedding)
      teacher = (model.apply(ema, tokens, t_mask, t_cls), t_mask)
    z_head, extra, ref_terms, extras = refinement.training_terms(
        params, z, tokens, seen_labels, batch["label"], mask, extras, jax.random.fold_in(rng, 7),
        fixed_head, teacher, ids=batch.get("index"))
    loss, terms = diffloss_loss(head, train_diffusion, z_head, tokens.reshape(-1, token_dim),
                                mask.reshape(-1), r_diff, m.diffusion_batch_mul)
    return loss + extra, dict(terms, mask_ratio=num_masked / seq_len, **ref_terms), extras

  decode = lt.make_decoder(config, scale, m.patch_size)

  def probe_conditions(params, moments, labels, rng):
    """The sampler's conditions with ground truth as the already generated tokens: step k sees
    order[ends[k]:] and conditions order[starts[k]:ends[k]] (one random order per image)."""
    own = condref.generator_params(params)
    apply = lambda *a, **kw: model.apply({"params": own}, *a, **kw)
    r_tok, r_order = jax.random.split(rng)
    tokens = lt.tokens_from_moments(moments, r_tok, scale, m.patch_size)
    b = tokens.shape[0]
    orders = mar_lib.sample_orders(r_order, b, seq_len)
    ranks = jnp.argsort(orders, axis=1)
    cls, null = apply(labels, method=mar_lib.MAR.class_embedding), apply(b, method=mar_lib.MAR.null_embedding)
    xs = tuple(jnp.asarray(v, jnp.int32) for v in (schedule.starts, schedule.ends,
                                                     range(len(schedule.starts))))

    def step(carry, x):
      z, z_null, step_of = carry
      start, end, k = x
      mask = mar_lib.mask_by_order(orders, end)
      here = (ranks >= start) & (ranks < end)
      pick = lambda new, old: jnp.where(here[..., None], new, old)
      return (pick(apply(tokens, mask, cls), z), pick(apply(tokens, mask, null), z_null),
              jnp.where(here, k, step_of)), None

    zeros = jnp.zeros((b, seq_len, model.width), jnp.float32)
    init = (zeros, zeros, jnp.full((b, seq_len), -1, jnp.int32))
    (z, z_null, step_of), _ = jax.lax.scan(step, init, xs)
    return {"tokens": tokens, "z": z, "z_null": z_null, "step": step_of}

  probe = condref.ConditionProbe(
      conditions=probe_conditions,
      head=lambda p, x, t, z: model.apply({"params": condref.generator_params(p)}, x, t, z,
                                          method=mar_lib.MAR.head),
      num_steps=len(schedule.starts), refinement=refinement)

  def generate(params, frozen, batch, rng):
    """Class-conditional samples: labels [B] -> uint8 images [B, H, W, 3] (EMA weights by default)."""
    tokens = sample_tokens(model, condref.generator_params(params), batch["label"], rng,
                           diffusion=sample_diffusion, schedule=schedule,
                           cfg_scale=float(config.sample.cfg_scale), cfg_schedule=m.cfg_schedule,
                           temperature=float(m.temperature), clip_x0=float(m.clip_denoised),
                           refine_fn=refinement.sampling_refiner(params))
    return decode(frozen, tokens)

  return Method(name="mar", model=model, init_params=init_params, loss_fn=loss_fn,
                batch_keys=("moments", "label") + refinement.batch_keys,
                decay_mask=decay_mask, generate=generate,
                generate_from="labels", load_frozen=lt.tokenizer_loader(m.tokenizer_workdir),
                init_frozen=lt.tokenizer_init(config), init_extras=refinement.init_extras,
                sampling_params=refinement.sampling_params, condition_probe=probe,
                loss_reads_ema=refinement.uses_teacher,
                auxiliary_params=refinement.auxiliary_params())
