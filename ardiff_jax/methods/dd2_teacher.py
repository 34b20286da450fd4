"""The AR teacher of DD2's two stages (`methods/dd2_tune.py`, `methods/dd2.py`), of either kind
(`dd2.teacher_kind`), behind one interface: what the teacher samples, and its denoiser
E[x_0 | x_t, x_<i] on the rectified-flow path x_t = (1 − t)x_0 + tε at every position.

  llamagen      DD2's setting: an adapted LlamaGen run over VQ codes (`configs/dd2_adapt_*.py`),
                read from the `llamagen` section. Tokens are codebook vectors; the denoiser is the
                posterior mean of Eq. (1)'s codebook mixture under the teacher's next-code law
                (its CFG and top-k / top-p), exact in closed form.
  ar_diffusion  beyond the paper: a causal AR + DiffLoss run over continuous KL tokens
                (`configs/ar_diffusion_*.py`, raster order), read from the `ar` section. The
                denoiser comes from its head's ε-prediction: x_t maps onto the VP diffusion the
                head was trained on at the step of equal SNR (`rf.vp_time`: a fractional step,
                the head's time embedding read between its integer steps; k·x_t its input),
                ε̂ = ε̂_u + w(ε̂_c − ε̂_u) with the teacher's CFG (constant or MAR's linear ramp
                over positions; temperature 1 only: a tempered DDPM sampler has no denoiser),
                x̂_0 = (x_t − tε̂)/(1 − t), clipped to ±`ar.clip_denoised` when that is set (as
                the teacher's own sampler; x̂_0 from ε̂ blows up as t → 1).
Both give the students the teacher's trunk with a fresh velocity head (`dd2.head_width`,
`head_depth`): DD2's "swap the head, keep the backbone".
Frozen weights: {"tokenizer": the VQ's / KL autoencoder's, "teacher": the teacher's}.
Shapes: B batch, L tokens (raster), C token width, V codebook size, D trunk width.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ardiff_jax.diffusion import rectified_flow as rf
from ardiff_jax.diffusion.gaussian import create_diffusion
from ardiff_jax.methods import ar_diffusion, restore_checked_run
from ardiff_jax.methods import condref
from ardiff_jax.methods import dd2_adapt
from ardiff_jax.methods import latent_tokens as lt
from ardiff_jax.methods import vq_tokenizer
from ardiff_jax.models import gpt as gpt_lib
from ardiff_jax.sampling import dd2 as dd2_sampling
from ardiff_jax.sampling.ar import sample_tokens
from ardiff_jax.sampling.llamagen import filter_logits, sample_codes

KINDS = ("llamagen", "ar_diffusion")


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A frozen AR teacher for DD2.

  Attributes:
    model: the teacher's network.
    student: the students' network (stage 1, G, ψ): the teacher's trunk over tokens [B, L, C]
      with a DiffLoss head whose first C outputs are a velocity.
    seq_len, token_dim: L and C.
    sample: (frozen, labels [B], rng) -> tokens [B, L, C], drawn with the teacher's settings.
    posterior: (frozen, prefix [B, L, C], labels [B]) -> what `denoise` reads at every position,
      teacher-forced on the clean prefix.
    denoise: (frozen, posterior, x_t [B, L, C], t [B, L]) -> x̂_0 [B, L, C] float32.
    student_init: (fresh student params, restore_run_params) -> the teacher's weights in the
      student's tree (its output layer or DiffLoss head replaced by the fresh head).
    load_frozen, init_frozen: as `Method`'s.
    decode: (frozen, tokens [B, L, C]) -> uint8 images [B, H, W, 3] (codes: nearest entries).
    complete: (frozen, tokens [B, L, C], labels, rng, n) -> tokens with the last n redrawn by the
      teacher given the rest, or None where the kind has no such sampler.
  """
  model: gpt_lib.GPT
  student: gpt_lib.GPT
  seq_len: int
  token_dim: int
  sample: Callable[..., jax.Array]
  posterior: Callable[..., Any]
  denoise: Callable[..., jax.Array]
  student_init: Callable[..., Any]
  load_frozen: Callable[..., Any]
  init_frozen: Callable[..., Any]
  decode: Callable[..., jax.Array]
  complete: Callable[..., jax.Array] | None = None


def teacher_log_probs(teacher: gpt_lib.GPT, params, vectors: jax.Array, labels: jax.Array,
                      null: int, cfg: float, top_k: int, top_p: float, temperature: float
                      ) -> jax.Array:
  """The teacher's next-code law at every position, teacher-forced on codebook vectors
  [B, L, C]: CFG on the logits (LlamaGen: uncond + w(cond − uncond)), temperature, top-k /
  top-p -> log-probabilities [B, L, V] (−inf where filtered)."""
  logits_of = lambda y: teacher.apply({"params": params},
                                      teacher.apply({"params": params}, vectors, y),
                                      method=gpt_lib.GPT.logits)
  logits = logits_of(labels)
  if cfg > 1.0:
    uncond = logits_of(jnp.full_like(labels, null))
    logits = uncond + cfg * (logits - uncond)
  b, l, v = logits.shape
  logits = filter_logits(logits.reshape(b * l, v) / max(temperature, 1e-5), top_k, top_p)
  return jax.nn.log_softmax(logits, axis=-1).reshape(b, l, v)


def check_shapes(params, fresh, field: str, workdir: str) -> None:
  """Raises when a run's parameters do not fit this config's model (built with other arguments)."""
  shapes = lambda tree: jax.tree.map(np.shape, tree)
  if shapes(params) != shapes(fresh):
    raise ValueError(f"{field}={workdir!r} does not match this config's model sections: build "
                     "this config with that run's arguments")


def _student_init(teacher_params, fresh, replaced: str, workdir: str):
  params = {k: v for k, v in teacher_params.items() if k != replaced}
  for k in fresh:
    if k not in params:
      params[k] = fresh[k]               # the velocity head
  check_shapes(params, fresh, "dd2.teacher_workdir", workdir)
  return params


def llamagen_teacher(config: ml_collections.ConfigDict) -> Teacher:
  d = config.dd2
  model = dd2_adapt.build_model(config)
  vq = vq_tokenizer.build_vq(config.tokenizer)
  c = vq.embed_dim
  side, seq_len, vocab = vq_tokenizer.code_geometry(config)
  null = config.data.num_classes
  table_of = lambda frozen: vq_tokenizer.code_vectors(vq, frozen["tokenizer"])
  settings = dict(cfg_scale=float(d.teacher_cfg), temperature=float(d.teacher_temperature),
                  top_k=int(d.teacher_top_k), top_p=float(d.teacher_top_p))

  def load_params(restore_run_params):
    return restore_checked_run(restore_run_params, d.teacher_workdir, "dd2.teacher_workdir",
                               "an adapted teacher run (configs/dd2_adapt_*.py)",
                               has=("tok_mlp", "output"))

  def sample(frozen, labels, rng):
    table = table_of(frozen)
    return table[sample_codes(model, frozen["teacher"], labels, rng, token_table=table, **settings)]

  def posterior(frozen, prefix, labels):
    return teacher_log_probs(model, frozen["teacher"], prefix, labels, null, float(d.teacher_cfg),
                             int(d.teacher_top_k), float(d.teacher_top_p),
                             float(d.teacher_temperature))

  def denoise(frozen, log_p, xt, t):
    return rf.mixture_weights_chunked(xt, t, jax.lax.stop_gradient(log_p), table_of(frozen),
                                      int(d.score_chunk))

  def student_init(fresh, restore_run_params):
    return _student_init(load_params(restore_run_params), fresh, "output", d.teacher_workdir)

  def load_frozen(restore_run_params):
    vq_run = restore_run_params(config.llamagen.tokenizer_workdir)
    return {"tokenizer": vq_run["vq"], "teacher": load_params(restore_run_params)}

  def init_frozen(rng):
    r_vq, r_teacher = jax.random.split(rng)
    size = config.data.image_size
    return {"tokenizer": vq_tokenizer.init_vq_params(vq, r_vq, size),
            "teacher": nn.meta.unbox(model.init(r_teacher, method=gpt_lib.GPT.init_all)["params"])}

  def decode(frozen, tokens):
    codes = dd2_sampling.nearest_codes(tokens, table_of(frozen))
    return vq_tokenizer.codes_to_images(vq, frozen["tokenizer"], codes, side)

  def complete(frozen, tokens, labels, rng, n):
    table = table_of(frozen)
    codes = dd2_sampling.nearest_codes(tokens, table)
    codes = sample_codes(model, frozen["teacher"], labels, rng, token_table=table,
                         prefix=codes[:, :seq_len - min(n, seq_len)], **settings)
    return table[codes]

  student = model.clone(vocab_size=0, token_dim=c, input_dim=c, head_width=d.head_width,
                        head_depth=d.head_depth)
  return Teacher(model=model, student=student, seq_len=seq_len, token_dim=c, sample=sample,
                 posterior=posterior, denoise=denoise, student_init=student_init,
                 load_frozen=load_frozen, init_frozen=init_frozen, decode=decode,
                 complete=complete)


def ar_diffusion_teacher(config: ml_collections.ConfigDict) -> Teacher:
  d, a = config.dd2, config.ar
  if float(d.teacher_temperature) != 1.0:
    raise ValueError(f"dd2.teacher_temperature={d.teacher_temperature}: a DiffLoss teacher's "
                     "tempered sampler (noise scaled at each DDPM step) has no denoiser to distil; "
                     "use 1.0")
  if a.order != "raster":
    raise ValueError(f"ar.order={a.order!r}: DD2's students are causal in raster order; distil a "
                     "raster-order ar_diffusion run")
  model = ar_diffusion.build_model(config)
  seq_len, c = lt.token_geometry(config, a.patch_size)
  decode_latents = lt.make_decoder(config, lt.token_scale(config), a.patch_size)
  sample_diffusion = create_diffusion(1000, a.num_sampling_steps)
  alpha_bar = np.cumprod(1.0 - create_diffusion(1000).betas)
  null = config.data.num_classes
  w = float(d.teacher_cfg)

  def load_params(restore_run_params):
    params = restore_checked_run(restore_run_params, d.teacher_workdir, "dd2.teacher_workdir",
                                 "a causal AR + DiffLoss run (configs/ar_diffusion_*.py)",
                                 has=("diffloss",), lacks=("output", "tok_mlp"))
    return condref.generator_params(params)

  def sample(frozen, labels, rng):
    return sample_tokens(model, frozen["teacher"], labels, rng, diffusion=sample_diffusion,
                         cfg_scale=w, cfg_schedule=a.cfg_schedule,
                         temperature=float(d.teacher_temperature), clip_x0=float(a.clip_denoised))

  def posterior(frozen, prefix, labels):
    z = model.apply({"params": frozen["teacher"]}, prefix, labels)
    if w == 1.0:
      return z, None
    return z, model.apply({"params": frozen["teacher"]}, prefix, jnp.full_like(labels, null))

  def denoise(frozen, zs, xt, t):
    z_c, z_u = zs
    s, k = rf.vp_time(t, alpha_bar)
    x_in = (k[..., None] * xt).reshape(-1, c)
    eps_of = lambda z: model.apply({"params": frozen["teacher"]}, x_in, s.reshape(-1),
                                   z.reshape(x_in.shape[0], -1), method=gpt_lib.GPT.head)[:, :c]
    eps = eps_of(z_c).reshape(xt.shape)
    if z_u is not None:
      eps_u = eps_of(z_u).reshape(xt.shape)
      scale = (jnp.full((seq_len,), w) if a.cfg_schedule == "constant"
               else 1.0 + (w - 1.0) * (jnp.arange(seq_len) + 1.0) / seq_len)
      eps = eps_u + scale[None, :, None] * (eps - eps_u)
    x0 = rf.denoised_from_eps(eps, xt.astype(jnp.float32), t.astype(jnp.float32))
    return jnp.clip(x0, -a.clip_denoised, a.clip_denoised) if a.clip_denoised > 0 else x0

  def student_init(fresh, restore_run_params):
    return _student_init(load_params(restore_run_params), fresh, "diffloss", d.teacher_workdir)

  def load_frozen(restore_run_params):
    return {"tokenizer": lt.tokenizer_loader(a.tokenizer_workdir)(restore_run_params),
            "teacher": load_params(restore_run_params)}

  def init_frozen(rng):
    r_tok, r_teacher = jax.random.split(rng)
    return {"tokenizer": lt.tokenizer_init(config)(r_tok),
            "teacher": nn.meta.unbox(model.init(r_teacher, method=gpt_lib.GPT.init_all)["params"])}

  student = model.clone(head_width=d.head_width, head_depth=d.head_depth)
  return Teacher(model=model, student=student, seq_len=seq_len, token_dim=c, sample=sample,
                 posterior=posterior, denoise=denoise, student_init=student_init,
                 load_frozen=load_frozen, init_frozen=init_frozen,
                 decode=lambda frozen, tokens: decode_latents(frozen["tokenizer"], tokens))


def make_teacher(config: ml_collections.ConfigDict) -> Teacher:
  kind = config.dd2.get("teacher_kind", "llamagen")
  if kind not in KINDS:
    raise ValueError(f"dd2.teacher_kind={kind!r}: expected one of {KINDS}")
  return llamagen_teacher(config) if kind == "llamagen" else ar_diffusion_teacher(config)
