"""DD2 stage 2, conditional score distillation (reference/dd2_paella.md §1.3–1.7): a one-step
generator G and a guidance network ψ, both the stage-1 AR-diffusion model's shape (the teacher's
trunk over tokens with a DiffLoss velocity head, `methods/dd2_tune.py`) and both initialised from
a stage-1 run (`dd2.tune_workdir`); data-free. The teacher is an adapted LlamaGen run (DD2) or a
causal AR + DiffLoss run over continuous tokens (beyond the paper; `methods/dd2_teacher.py`).

One engine step is one G iteration and, before it, K = `dd2.guidance_updates` ψ iterations:
  ψ iteration (L_FCS, Eq. 5), for fresh random classes y and fresh noise:
    x       = sg(G(ε, y))                     one causal forward (`sampling/dd2.one_step_generate`)
    z       = trunk_ψ([y, x_1 … x_{L−1}])     ψ's causal features from G's clean prefix
    for m = `dd2.noise_draws` draws:  t ~ U(t_min, 1 − t_min) per token, x_t = (1 − t)x + tε'
    L_ψ     = mean ‖head_ψ(x_t, t, z) − (ε' − x)‖²          (`rf.fake_score_loss`)
    ψ ← Adam step (ψ's own optimizer: `dd2.guidance_lr`, warmup from `optim.warmup_start` over
        `dd2.guidance_warmup` ψ iterations; the rest of `optim`)
  G iteration (CSD in SiD form, Eq. 3–4, α = `dd2.alpha`):
    x       = G(ε, y)                         differentiated
    x_t     = (1 − t)x + tε' with t per token, as for ψ
    x̂_real  = the teacher's denoiser at x_t given sg(x)_<i, with its sampling settings: for a
              LlamaGen teacher Eq. (1)'s posterior mean of its codebook mixture under its law
              (`dd2.teacher_cfg`, top-k / top-p); for a DiffLoss teacher its CFG'd ε̂ as x̂_0
    x̂_fake  = x_t − t·head_ψ(x_t, t, sg(trunk_ψ(sg(x))))  (ψ's weights under stop-gradient)
    L_G     = Σ_i SiD(x̂_real, x̂_fake, x)_i, averaged over the batch   (`rf.csd_loss`)
  The engine's optimizer, EMA and checkpoints hold G; ψ and its optimizer state are the method's
  state (`extras`), checkpointed with it.
Choices the paper leaves open, ours: ω(t) is SiD's normaliser, per token (mean |x − x̂_real| over
the token's C channels, stop-gradient); t ~ U(t_min, 1 − t_min) per token for both losses; m = 4
noise draws per ψ sample (the trunk runs once per sequence, so extra draws cost only the small
head); each ψ iteration draws its own classes and noise; no dropout in stage 2 (G, ψ and the
teacher see exactly G's tokens); G's EMA with DD2's progressive rate min(0.9999, (i + 1)/(i + 10))
(`train.ema_progressive`), and learning rates warmed up from 1e-6 (`optim.warmup_start`).
`train.grad_accum_steps` > 1 is refused (each micro-batch would run ψ's K iterations from the
same ψ and keep only the last). A non-finite ψ loss makes the step's loss non-finite (it is added
times 0), so the engine's NaN policy drops the whole step, G's and ψ's updates alike.
Gradient clipping: the config's `optim.grad_clip_norm` for both networks (LlamaGen's 1.0 in the
shipped configs; DD2 states none).
Initialisation ablation (DD2 Tab. 4): `dd2.init_generator` / `dd2.init_guidance` False start that
network from a fresh initialisation instead of the stage-1 run.
Sampling: one forward, x = ε − v(ε, t = 1 | trunk([y, ε_<i])), then the teacher's decoder (codes:
each token snapped to its nearest entry). `dd2.teacher_steps` = n > 0 (LlamaGen teachers): the
teacher-refined multi-step mode (DD2's Alg. 4 as we read it for a raster teacher): G's first
L − n codes are kept and the teacher, prefilled with them, draws the last n with its own
sampling settings: 1 + n forwards.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ardiff_jax import optim
from ardiff_jax.diffusion import rectified_flow as rf
from ardiff_jax.methods import Method, restore_checked_run
from ardiff_jax.methods import dd2_teacher
from ardiff_jax.methods import dd2_tune
from ardiff_jax.models import gpt as gpt_lib
from ardiff_jax.sampling import dd2 as dd2_sampling


def dd2_config() -> ml_collections.ConfigDict:
  d = dd2_tune.dd2_tune_config()
  d.tune_workdir = ""             # the stage-1 run (configs/dd2_tune_*.py): G and ψ start from it
  d.guidance_updates = 5          # K: ψ iterations per G iteration (DD2, LlamaGen: 5)
  d.noise_draws = 4               # m: noise draws per generated sequence in ψ's loss
  d.alpha = 1.0                   # SiD's α (DD2: 1.0)
  d.guidance_lr = 2e-4            # ψ's peak learning rate (DD2, LlamaGen: 2e-4; G's is optim.lr)
  d.guidance_warmup = 0           # ψ iterations of linear warmup from optim.warmup_start
  d.init_generator = True         # False: G from a fresh initialisation (the ablation)
  d.init_guidance = True          # False: ψ from a fresh initialisation (the ablation)
  d.teacher_steps = 0             # sampling: the teacher redraws the last n codes (0: one step)
  return d


def guidance_optimizer(config: ml_collections.ConfigDict, num_steps: int
                       ) -> optax.GradientTransformation:
  """ψ's Adam: the config's `optim` section with ψ's peak rate and warmup, over K·steps updates."""
  cfg = ml_collections.ConfigDict(config.optim.to_dict())
  cfg.lr, cfg.warmup_steps = float(config.dd2.guidance_lr), int(config.dd2.guidance_warmup)
  tx, _ = optim.make_optimizer(cfg, num_steps * int(config.dd2.guidance_updates))
  return tx


def csd_terms(teacher: dd2_teacher.Teacher, psi, frozen, x: jax.Array, labels: jax.Array,
              t: jax.Array, eps: jax.Array, alpha: float = 1.0) -> jax.Array:
  """G's CSD loss per token (SiD form, summed over channels): x [B, L, C] G's tokens
  (differentiated), labels [B], t [B, L], eps [B, L, C] -> [B, L]. Everything conditioned on the
  prefix (the teacher's law or features, ψ's trunk features) reads sg(x), and ψ's weights are
  constants, so token i's term reaches G through x_i alone (its noised copy x_t,i and the two
  denoisers at it)."""
  model = teacher.student
  b, l, c = x.shape
  prefix = jax.lax.stop_gradient(x)          # with ψ's weights and the frozen teacher constant,
  psi = jax.lax.stop_gradient(psi)           # the posterior and ψ's features are constants too
  posterior = teacher.posterior(frozen, prefix, labels)
  xt = rf.interpolate(x, eps, t)
  z = model.apply({"params": psi}, prefix, labels)
  v_fake = dd2_sampling.head_velocity(model, psi, xt.reshape(-1, c), t.reshape(-1),
                                      z.reshape(b * l, -1)).reshape(x.shape)
  x_real = teacher.denoise(frozen, posterior, xt, t)
  return rf.csd_loss(x, xt, t, x_real, v_fake, alpha)


def make_method(config: ml_collections.ConfigDict) -> Method:
  d = config.dd2
  if int(d.guidance_updates) < 1 or int(d.noise_draws) < 1:
    raise ValueError(f"dd2.guidance_updates={d.guidance_updates} and dd2.noise_draws="
                     f"{d.noise_draws} must both be ≥ 1")
  if int(config.train.grad_accum_steps) > 1:
    raise ValueError(f"train.grad_accum_steps={config.train.grad_accum_steps}: dd2 trains ψ inside "
                     "the step, and each micro-batch would run ψ's K iterations from the same ψ "
                     "and keep only the last; use 1 (a smaller batch, or more devices)")
  teacher = dd2_teacher.make_teacher(config)
  if int(d.teacher_steps) > 0 and teacher.complete is None:
    raise ValueError(f"dd2.teacher_steps={d.teacher_steps}: the teacher-refined mode needs a "
                     f"llamagen teacher (dd2.teacher_kind={d.teacher_kind!r} has no such sampler)")
  model = teacher.student
  seq_len, c = teacher.seq_len, teacher.token_dim
  null = config.data.num_classes
  tx_psi = guidance_optimizer(config, config.train.num_steps)

  def init_params(rng):
    return model.init(rng, method=gpt_lib.GPT.init_all)["params"]

  def extras_from_params(params):
    """ψ and its Adam state; ψ starts as G (replaced by `warm_start` when the runs differ)."""
    return {"guidance": params, "guidance_opt": tx_psi.init(params)}

  def warm_start(fresh, restore_run_params):
    """(G, {"guidance": ψ}): each the stage-1 run's weights, or `fresh` for its ablation."""
    tuned = restore_checked_run(restore_run_params, d.tune_workdir, "dd2.tune_workdir",
                                "a stage-1 (dd2_tune) run (configs/dd2_tune_*.py)",
                                has=("diffloss",), lacks=("output",))
    dd2_teacher.check_shapes(tuned, fresh, "dd2.tune_workdir", d.tune_workdir)
    generator = tuned if d.init_generator else fresh
    return generator, {"guidance": tuned if d.init_guidance else fresh}

  def one_step(params, labels, rng):
    eps = jax.random.normal(rng, (labels.shape[0], seq_len, c))
    return dd2_sampling.one_step_generate(model, params, eps, labels)

  def time_and_noise(rng, shape):
    r_t, r_eps = jax.random.split(rng)
    t = jax.random.uniform(r_t, shape[:-1], minval=d.t_min, maxval=1.0 - d.t_min)
    return t, jax.random.normal(r_eps, shape)

  def guidance_loss(psi, x, labels, rng):
    """L_FCS over m noise draws: x [B, L, C] G's tokens (constant), labels [B] -> scalar."""
    b = x.shape[0]
    m = int(d.noise_draws)
    z = model.apply({"params": psi}, x, labels)                              # [B, L, D]
    t, eps = time_and_noise(rng, (m,) + x.shape)                             # [m, B, L], [m, B, L, C]
    xt = rf.interpolate(x[None], eps, t)
    zs = jnp.broadcast_to(z[None], (m,) + z.shape).reshape(m * b * seq_len, -1)
    v = dd2_sampling.head_velocity(model, psi, xt.reshape(-1, c), t.reshape(-1), zs)
    return rf.fake_score_loss(v.reshape(xt.shape), x[None], eps)

  def guidance_iterations(generator, psi, opt, b, rng):
    """K ψ iterations on fresh G samples -> (ψ, its Adam state, mean L_FCS)."""
    def one(carry, key):
      psi, opt = carry
      r_label, r_gen, r_noise = jax.random.split(key, 3)
      labels = jax.random.randint(r_label, (b,), 0, null)
      x = jax.lax.stop_gradient(one_step(generator, labels, r_gen))
      loss, grads = jax.value_and_grad(guidance_loss)(psi, x, labels, r_noise)
      updates, opt = tx_psi.update(grads, opt, psi)
      return (optax.apply_updates(psi, updates), opt), loss

    (psi, opt), losses = jax.lax.scan(one, (psi, opt),
                                      jax.random.split(rng, int(d.guidance_updates)))
    return psi, opt, jnp.mean(losses)

  def loss_fn(params, batch, rng, step, extras, frozen=None):
    del step
    r_psi, r_label, r_gen, r_noise = jax.random.split(rng, 4)
    b = batch["label"].shape[0]
    generator = jax.lax.stop_gradient(params)
    psi, opt, fcs = guidance_iterations(generator, extras["guidance"], extras["guidance_opt"], b,
                                        r_psi)
    labels = jax.random.randint(r_label, (b,), 0, null)
    x = one_step(params, labels, r_gen)                               # [B, L, C]
    t, eps = time_and_noise(r_noise, x.shape)
    terms = csd_terms(teacher, psi, frozen, x, labels, t, eps, float(d.alpha))
    loss = jnp.mean(jnp.sum(terms, axis=-1)) + 0.0 * fcs                     # NaN ψ -> skip
    metrics = {"guidance_loss": fcs, "token_norm": jnp.mean(jnp.square(x))}
    return loss, metrics, {**extras, "guidance": psi, "guidance_opt": opt}

  def sample_tokens(params, frozen, batch, rng):
    """One-step (or teacher-refined) tokens: labels [B] -> [B, L, C]."""
    r_gen, r_teacher = jax.random.split(rng)
    tokens = one_step(params, batch["label"], r_gen)
    if int(d.teacher_steps) > 0:
      tokens = teacher.complete(frozen, tokens, batch["label"], r_teacher, int(d.teacher_steps))
    return tokens

  def generate(params, frozen, batch, rng):
    """Class-conditional samples: labels [B] -> uint8 images [B, H, W, 3]."""
    return teacher.decode(frozen, sample_tokens(params, frozen, batch, rng))

  return Method(name="dd2", model=model, init_params=init_params, loss_fn=loss_fn,
                batch_keys=("label",), generate=generate, generate_from="labels",
                load_frozen=teacher.load_frozen, init_frozen=teacher.init_frozen,
                loss_reads_frozen=True, warm_start=warm_start,
                extras_from_params=extras_from_params, generate_tokens=sample_tokens)
