"""Causal AR with diffusion loss (MAR Table 1's "AR, raster, causal" variant; the backbone of the
condition-refinement paper's "GPT-XL" model) as a `Method`.

For cached posterior moments: tokens x_1..x_L = patchify(scale · posterior sample), raster order.
  z = GPT([class or null, x_1 … x_{L−1}])           (labels dropped to the null row with p = label_drop)
  L = Σ_copies [ mean_c (ε − ε̂)² + L_vlb ] / #copies over all L tokens, each repeated
      `diffusion_batch_mul` times with its own t (teacher forcing: every position is trained).
`ar.order = "random"`: one random permutation per image and step (MAR Table 1's causal
random-order AR; the model learns an embedding of the next position, models/gpt.py).
Sampling (`sampling/ar.py`) decodes in raster or a random order with a KV cache.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from ardiff_jax import configlib
from ardiff_jax.diffusion.gaussian import create_diffusion
from ardiff_jax.methods import Method
from ardiff_jax.methods import condref
from ardiff_jax.methods import latent_tokens as lt
from ardiff_jax.models import gpt as gpt_lib
from ardiff_jax.models import mar as mar_lib
from ardiff_jax.models.diffloss import diffloss_loss
from ardiff_jax.sampling.ar import sample_tokens


ORDERS = ("raster", "random")


def ar_config(preset: str = "gpt_xl") -> ml_collections.ConfigDict:
  """Defaults of the `ar` config section (MAR's DiffLoss settings; constant CFG, raster order)."""
  a = lt.generator_section(preset)
  a.cfg_schedule = "constant"                   # or "linear": 1 + (s − 1)(i + 1)/L
  a.order = "raster"                            # or "random"
  return a


def ar_base_config(preset: str, batch_size: int) -> ml_collections.ConfigDict:
  return lt.generator_base_config("ar_diffusion", "ar", ar_config(preset), batch_size)


def build_model(config: ml_collections.ConfigDict) -> gpt_lib.GPT:
  seq_len, token_dim = lt.token_geometry(config, config.ar.patch_size)
  if config.ar.order not in ORDERS:
    raise ValueError(f"ar.order={config.ar.order!r}: expected one of {ORDERS}")
  return gpt_lib.make_gpt(config.ar.preset, token_dim=token_dim, seq_len=seq_len,
                          num_classes=config.data.num_classes, random_order=config.ar.order == "random",
                          remat=config.ar.remat, scan_layers=config.ar.scan_layers,
                          dtype=jnp.dtype(config.train.compute_dtype), **configlib.overrides(config.ar))


def make_method(config: ml_collections.ConfigDict) -> Method:
  a = config.ar
  model = build_model(config)
  seq_len, token_dim = lt.token_geometry(config, a.patch_size)
  scale = lt.token_scale(config)
  train_diffusion = create_diffusion(1000)
  sample_diffusion = create_diffusion(1000, a.num_sampling_steps)
  decode = lt.make_decoder(config, scale, a.patch_size)
  refinement = condref.for_generator(config, model, causal=True)

  def init_params(rng):
    own = model.init(rng, method=gpt_lib.GPT.init_all)["params"]
    return {**own, **refinement.init_params(jax.random.fold_in(rng, 1))}

  def loss_fn(params, batch, rng, step, extras, ema_params=None):
    del step
    r_tok, r_drop, r_dropout, r_diff = jax.random.split(rng, 4)
    order = (mar_lib.sample_orders(jax.random.fold_in(rng, 8), batch["label"].shape[0], seq_len)
             if model.random_order else None)
    tokens = lt.tokens_from_moments(batch["moments"], r_tok, scale, a.patch_size)   # [B, L, C]
    b = tokens.shape[0]
    drop = jax.random.uniform(r_drop, (b,)) < a.label_drop
    labels = jnp.where(drop, config.data.num_classes, batch["label"])
    own = condref.generator_params(params)
    apply = lambda *args, **kw: model.apply({"params": own}, *args, **kw)
    z = apply(tokens, labels, deterministic=False, order=order, rngs={"dropout": r_dropout})
    head = lambda x, t, zz: apply(x, t, zz, method=gpt_lib.GPT.head)
    fixed_head = lambda x, t, zz: model.apply({"params": jax.lax.stop_gradient(own)}, x, t, zz,
                                              method=gpt_lib.GPT.head)
    weights = jnp.ones((b, seq_len))
    teacher = None
    if refinement.uses_teacher:   # causal: the same context, the EMA weights
      ema = {"params": jax.lax.stop_gradient(condref.generator_params(ema_params))}
      teacher = (model.apply(ema, tokens, batch["label"], order=order), weights)
    z_head, extra, ref_terms, extras = refinement.training_terms(
        params, z, tokens, labels, batch["label"], weights, extras, jax.random.fold_in(rng, 7),
        fixed_head, teacher, ids=batch.get("index"))
    loss, terms = diffloss_loss(head, train_diffusion, z_head, tokens.reshape(-1, token_dim),
                                weights.reshape(-1), r_diff, a.diffusion_batch_mul)
    return loss + extra, dict(terms, **ref_terms), extras

  def probe_conditions(params, moments, labels, rng):
    """Teacher-forced conditions: z at position o_i sees x_{o_<i}; its AR step is i (raster:
    o_i = i; random order: one permutation per image)."""
    own = condref.generator_params(params)
    r_tok, r_order = jax.random.split(rng)
    tokens = lt.tokens_from_moments(moments, r_tok, scale, a.patch_size)
    b = tokens.shape[0]
    order = mar_lib.sample_orders(r_order, b, seq_len) if model.random_order else None
    z = model.apply({"params": own}, tokens, labels, order=order)
    z_null = model.apply({"params": own}, tokens, jnp.full_like(labels, config.data.num_classes),
                         order=order)
    step = (jnp.argsort(order, axis=1).astype(jnp.int32) if order is not None else
            jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (b, seq_len)))
    return {"tokens": tokens, "z": z, "z_null": z_null, "step": step}

  probe = condref.ConditionProbe(
      conditions=probe_conditions,
      head=lambda p, x, t, z: model.apply({"params": condref.generator_params(p)}, x, t, z,
                                          method=gpt_lib.GPT.head),
      num_steps=seq_len, refinement=refinement)

  def generate(params, frozen, batch, rng):
    tokens = sample_tokens(model, condref.generator_params(params), batch["label"], rng,
                           diffusion=sample_diffusion, cfg_scale=float(config.sample.cfg_scale),
                           cfg_schedule=a.cfg_schedule, temperature=float(a.temperature),
                           clip_x0=float(a.clip_denoised),
                           refine_fn=refinement.sampling_refiner(params))
    return decode(frozen, tokens)

  return Method(name="ar_diffusion", model=model, init_params=init_params, loss_fn=loss_fn,
                batch_keys=("moments", "label") + refinement.batch_keys,
                decay_mask=lt.no_decay_in_head, generate=generate,
                generate_from="labels", load_frozen=lt.tokenizer_loader(a.tokenizer_workdir),
                init_frozen=lt.tokenizer_init(config), init_extras=refinement.init_extras,
                sampling_params=refinement.sampling_params, condition_probe=probe,
                loss_reads_ema=refinement.uses_teacher,
                auxiliary_params=refinement.auxiliary_params())
