"""The rectified-flow path of Distilled Decoding 2 (reference/dd2_paella.md §1.2–1.3) and the
closed-form score of a codebook mixture, as pure functions.

Path: x_t = (1 − t)·x_0 + t·ε, t ∈ [0, 1] (α_t = 1 − t, σ_t = t). For a next-token law p over
codebook vectors c_j (V of them, C wide), the t-smoothed density is the Gaussian mixture
p_t(x) = Σ_j p_j N(x; (1 − t)c_j, t²I), whose score is Eq. (1):
    s(x, t, p) = −Σ_j w_j (x − (1 − t)c_j) / t²,   w = softmax_j(log p_j − ‖x − (1 − t)c_j‖² / 2t²)
               = −(x − (1 − t)·Σ_j w_j c_j) / t².
Networks predict a velocity v = E[ε | x_t] − E[x_0 | x_t]; the conversions (DD2 App. E.1):
    v = (−t·s − x_t) / (1 − t),   s = −(x_t + (1 − t)·v) / t,   x̂_0 = x_t − t·v = (x_t + t²s)/(1 − t).
Shape letters: ... any leading axes (batch, positions), C token width, V codebook size.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def interpolate(x0: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
  """x_t = (1 − t)x_0 + tε: x0, eps [..., C], t [...] -> [..., C]."""
  t = t[..., None]
  return (1.0 - t) * x0 + t * eps


def mixture_weights_chunked(x: jax.Array, t: jax.Array, log_p: jax.Array, codebook: jax.Array,
                            chunk: int = 4096) -> jax.Array:
  """Σ_j w_j c_j of Eq. (1), the posterior mean of the clean token, without a [..., V, C] tensor:
  an online softmax over chunks of `chunk` codebook rows (a 16,384-entry codebook in 4 chunks).

  x [..., C], t [...] (in (0, 1]), log_p [..., V] (log-probabilities; −inf allowed where p = 0),
  codebook [V, C] -> [..., C] float32. The logit of entry j drops the ‖x‖² term (the same for
  every j): (1 − t)·x·c_j / t² − (1 − t)²‖c_j‖² / 2t² + log p_j.
  """
  if chunk < 1:
    raise ValueError(f"chunk={chunk}: codebook rows per chunk must be ≥ 1")
  x, t, log_p = x.astype(jnp.float32), t.astype(jnp.float32), log_p.astype(jnp.float32)
  codebook = codebook.astype(jnp.float32)
  v, c = codebook.shape
  chunk = min(chunk, v)
  pad = (-v) % chunk
  if pad:
    codebook = jnp.concatenate([codebook, jnp.zeros((pad, c), jnp.float32)])
    log_p = jnp.concatenate([log_p, jnp.full(log_p.shape[:-1] + (pad,), -jnp.inf)], axis=-1)
  n = (v + pad) // chunk
  books = codebook.reshape(n, chunk, c)
  logps = jnp.moveaxis(log_p.reshape(log_p.shape[:-1] + (n, chunk)), -2, 0)   # [n, ..., chunk]
  a = (1.0 - t)[..., None]
  inv_t2 = 1.0 / jnp.square(t)[..., None]

  def step(carry, inputs):
    running_max, total, weighted = carry
    book, logp = inputs
    norms = jnp.sum(jnp.square(book), axis=-1)                                   # [chunk]
    logits = logp + (a * jnp.einsum("...c,kc->...k", x, book) - 0.5 * jnp.square(a) * norms) * inv_t2
    new_max = jnp.maximum(running_max, jnp.max(logits, axis=-1))
    safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
    scale = jnp.exp(jnp.where(jnp.isfinite(running_max), running_max - safe_max, -jnp.inf))
    e = jnp.exp(logits - safe_max[..., None])
    total = total * scale + jnp.sum(e, axis=-1)
    weighted = weighted * scale[..., None] + jnp.einsum("...k,kc->...c", e, book)
    return (new_max, total, weighted), None

  init = (jnp.full(x.shape[:-1], -jnp.inf), jnp.zeros(x.shape[:-1]), jnp.zeros(x.shape))
  (_, total, weighted), _ = jax.lax.scan(step, init, (books, logps))
  return weighted / total[..., None]


def mixture_velocity(x: jax.Array, t: jax.Array, log_p: jax.Array, codebook: jax.Array,
                     chunk: int = 4096) -> jax.Array:
  """The velocity of Eq. (1)'s score, E[ε − x_0 | x_t] = (x_t − m)/t with m = Σ_j w_j c_j (the
  same as `velocity_from_score(mixture_score(...))`, without its cancellation near t = 1).
  Shapes as `mixture_weights_chunked` -> [..., C] float32."""
  mean = mixture_weights_chunked(x, t, log_p, codebook, chunk)
  return velocity_from_denoised(mean, x.astype(jnp.float32), t.astype(jnp.float32))


def mixture_score(x: jax.Array, t: jax.Array, log_p: jax.Array, codebook: jax.Array,
                  chunk: int = 4096) -> jax.Array:
  """Eq. (1): the score of Σ_j p_j N((1 − t)c_j, t²I) at x. Shapes as `mixture_weights_chunked`
  -> [..., C] float32."""
  mean = mixture_weights_chunked(x, t, log_p, codebook, chunk)
  t = t.astype(jnp.float32)[..., None]
  return -(x.astype(jnp.float32) - (1.0 - t) * mean) / jnp.square(t)


def velocity_from_score(score: jax.Array, x: jax.Array, t: jax.Array) -> jax.Array:
  """v = (−t·s − x_t)/(1 − t); t [...] in [0, 1) broadcast over C."""
  t = t[..., None]
  return (-t * score - x) / (1.0 - t)


def score_from_velocity(v: jax.Array, x: jax.Array, t: jax.Array) -> jax.Array:
  """s = −(x_t + (1 − t)·v)/t; t [...] in (0, 1]."""
  t = t[..., None]
  return -(x + (1.0 - t) * v) / t


def velocity_from_denoised(x0: jax.Array, x: jax.Array, t: jax.Array) -> jax.Array:
  """v = (x_t − x̂_0)/t, the inverse of `denoised_from_velocity`; t [...] in (0, 1]."""
  return (x - x0) / t[..., None]


def denoised_from_velocity(v: jax.Array, x: jax.Array, t: jax.Array) -> jax.Array:
  """x̂_0 = x_t − t·v."""
  return x - t[..., None] * v


def sid_loss(x_real: jax.Array, x_fake: jax.Array, x_gen: jax.Array, alpha: float = 1.0,
             reduce_axes: tuple[int, ...] = (-1,)) -> jax.Array:
  """Score identity distillation's generator loss in x_0 space (SiD; DD2 picks α = 1):
      (x̂_real − x̂_fake)·((x̂_real − x_g) − α(x̂_real − x̂_fake)) / sg(mean |x_g − x̂_real|),
  summed over `reduce_axes`; the normaliser is the mean over the same axes (floored at 1e-5),
  under stop-gradient. x_real, x_fake: the teacher's and the fake score's denoised estimates,
  x_gen: the generator's clean output, all [..., C] -> [...]. With α = 1 the element is
  (x̂_real − x̂_fake)·(x̂_fake − x_g)."""
  diff = x_real - x_fake
  element = diff * ((x_real - x_gen) - alpha * diff)
  norm = jax.lax.stop_gradient(jnp.maximum(jnp.mean(jnp.abs(x_gen - x_real), axis=reduce_axes,
                                                    keepdims=True), 1e-5))
  return jnp.sum(element / norm, axis=reduce_axes)


# A Gaussian (VP) diffusion teacher on the rectified-flow path (DD2 for a DiffLoss teacher).


def vp_time(t: jax.Array, alpha_bar: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """The VP step at which a diffusion with cumulative products `alpha_bar` [K] (decreasing, ᾱ_0
  near 1) has the rectified-flow path's SNR at t, (1 − t)²/t², and the factor k with
  k·x_t = √ᾱ x_0 + √(1 − ᾱ) ε (k = 1/√((1 − t)² + t²)).

  t [...] in (0, 1) -> (s [...] float32, fractional by linear interpolation of log SNR between
  integer steps, clamped to [0, K − 1]; k [...])."""
  alpha_bar = np.asarray(alpha_bar, np.float64)
  log_snr = np.log(alpha_bar) - np.log1p(-alpha_bar)                # decreasing in the step
  t = t.astype(jnp.float32)
  target = 2.0 * (jnp.log1p(-t) - jnp.log(t))
  s = jnp.interp(target, jnp.asarray(log_snr[::-1], jnp.float32),
                 jnp.arange(len(alpha_bar) - 1, -1, -1, dtype=jnp.float32))
  return s, jax.lax.rsqrt(jnp.square(1.0 - t) + jnp.square(t))


def denoised_from_eps(eps: jax.Array, x: jax.Array, t: jax.Array) -> jax.Array:
  """x̂_0 = (x_t − t·ε̂)/(1 − t) on the path x_t = (1 − t)x_0 + tε; t [...] in [0, 1)."""
  t = t[..., None]
  return (x - t * eps) / (1.0 - t)


# DD2 stage 2's losses (§1.3–1.4), as pure functions of the three networks' outputs.


def fake_score_loss(v_psi: jax.Array, x: jax.Array, eps: jax.Array) -> jax.Array:
  """L_FCS (DD2 Eq. 5) in velocity form: ψ's velocity v_psi [..., C] at x_t = (1 − t)x + tε for
  the generator's (stop-gradient) tokens x regresses the conditional target ε − x; mean."""
  return jnp.mean(jnp.square(v_psi - jax.lax.stop_gradient(eps - x)))


def csd_loss(x_gen: jax.Array, xt: jax.Array, t: jax.Array, x_real: jax.Array,
             v_fake: jax.Array, alpha: float = 1.0) -> jax.Array:
  """Conditional score distillation (DD2 Eq. 3–4) in SiD form, per token: x_gen [B, L, C] the
  generator's tokens (differentiated), xt = (1 − t)·x_gen + t·ε [B, L, C] with its own t [B, L]
  per position, x_real [B, L, C] the teacher's denoiser at xt given the generator's
  stop-gradient prefix (for a codebook teacher Eq. (1)'s posterior mean Σ_j w_j c_j =
  (x_t + t²s)/(1 − t)), v_fake [B, L, C] ψ's velocity at xt given the same prefix;
  x̂_fake = xt − t·v_fake. The normaliser is per token (mean over C; SiD normalises per image,
  DD2 does not say, ours). -> [B, L]; the loss is their sum over positions, averaged over the
  batch. The generator is reached through its tokens and their noised copies only (the
  networks' weights and the teacher's law are constants for the caller to stop-gradient);
  t in (0, 1]."""
  return sid_loss(x_real, denoised_from_velocity(v_fake, xt, t), x_gen, alpha)
