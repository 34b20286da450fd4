"""Gaussian diffusion as MAR's DiffLoss uses it (DiT's port of ADM / improved DDPM).

Forward process q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I) with the cosine schedule
ᾱ(t) = cos²(((t/T + s)/(1 + s))·π/2), s = 0.008, β_t = min(1 − ᾱ(t+1)/ᾱ(t), 0.999), T = 1000
(Nichol & Dhariwal 2021, eq. 17). The network predicts ε and a per-channel v ∈ [-1, 1] that
interpolates the log-variance between the posterior's β̃_t and β_t ("learned range", eq. 15).
Training loss per token (MAR's `DiffLoss`, iDDPM's hybrid loss, λ = 1):
  L = mean_c (ε − ε̂)² + L_vlb,  L_vlb = KL(q(x_{t-1}|x_t,x_0) ‖ p(x_{t-1}|x_t)) / ln 2 (bits, mean over
  channels), with the model mean stop-gradiented so the VLB trains only the variance; at t = 0 the
  VLB term is the discretised Gaussian decoder NLL (bins of width 2/255 on [-1, 1]).

Tables are computed in float64 NumPy and used as float32. Everything is pure and jit-able; time
indices are int32 arrays with the batch's leading shape. A respaced process (`respace`) keeps the
original t indices in `timestep_map`, which is what the network receives.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


def cosine_alpha_bar(t: np.ndarray, s: float = 0.008) -> np.ndarray:
  return np.cos((t + s) / (1 + s) * math.pi / 2) ** 2


def cosine_betas(num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """β_i = min(1 − ᾱ((i+1)/T) / ᾱ(i/T), max_beta), i = 0..T−1 (float64 [T])."""
  t = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
  ab = cosine_alpha_bar(t, s)
  return np.minimum(1.0 - ab[1:] / ab[:-1], max_beta)


def space_timesteps(num_timesteps: int, section_counts: str | list[int]) -> list[int]:
  """ADM's respacing: which of the original steps to keep, e.g. "100" -> {0, 10, 20, …, 989, 999}.

  Each section of the original range keeps `count` steps at evenly rounded strides.
  """
  if isinstance(section_counts, str):
    section_counts = [int(x) for x in section_counts.split(",")]
  size_per = num_timesteps // len(section_counts)
  extra = num_timesteps % len(section_counts)
  start, kept = 0, []
  for i, count in enumerate(section_counts):
    size = size_per + (1 if i < extra else 0)
    if size < count:
      raise ValueError(f"cannot take {count} steps from a section of {size} steps")
    stride = 1 if count <= 1 else (size - 1) / (count - 1)
    cur = 0.0
    for _ in range(count):
      kept.append(start + round(cur))
      cur += stride
    start += size
  return sorted(set(kept))


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianDiffusion:
  """Schedule tables (float32 [K]) of a process with K steps; `timestep_map[k]` is the original t."""
  betas: np.ndarray
  timestep_map: np.ndarray

  @classmethod
  def create(cls, betas: np.ndarray) -> "GaussianDiffusion":
    betas = np.asarray(betas, np.float64)
    return cls(betas=betas, timestep_map=np.arange(len(betas), dtype=np.int32))

  @property
  def num_timesteps(self) -> int:
    return len(self.betas)

  def respace(self, section_counts: str | list[int]) -> "GaussianDiffusion":
    """The process on a subset of steps: β'_k = 1 − ᾱ_{t_k} / ᾱ_{t_{k−1}} (ᾱ before the first = 1)."""
    keep = space_timesteps(self.num_timesteps, section_counts)
    ab = np.cumprod(1.0 - self.betas)
    new_betas, last = [], 1.0
    for t in keep:
      new_betas.append(1.0 - ab[t] / last)
      last = ab[t]
    return GaussianDiffusion(betas=np.asarray(new_betas), timestep_map=self.timestep_map[keep])

  # --- float64 tables -----------------------------------------------------------------------
  @functools.cached_property
  def _tables(self) -> dict[str, np.ndarray]:
    b = self.betas
    ab = np.cumprod(1.0 - b)
    ab_prev = np.append(1.0, ab[:-1])
    post_var = b * (1.0 - ab_prev) / (1.0 - ab)
    return dict(
        sqrt_ab=np.sqrt(ab), sqrt_1m_ab=np.sqrt(1.0 - ab),
        sqrt_recip_ab=np.sqrt(1.0 / ab), sqrt_recipm1_ab=np.sqrt(1.0 / ab - 1.0),
        post_var=post_var,
        # β̃_0 = 0: the log is clipped to β̃_1 as in iDDPM.
        post_log_var=np.log(np.append(post_var[1], post_var[1:])),
        post_coef1=b * np.sqrt(ab_prev) / (1.0 - ab),
        post_coef2=(1.0 - ab_prev) * np.sqrt(1.0 - b) / (1.0 - ab),
        log_betas=np.log(b))

  def _at(self, name: str, t: jax.Array, x: jax.Array) -> jax.Array:
    """tables[name][t] broadcast to x's shape: t int [..] and x [.., C]."""
    table = jnp.asarray(self._tables[name], jnp.float32)
    return table[t].reshape(t.shape + (1,) * (x.ndim - t.ndim))

  # --- the forward process and its posterior ------------------------------------------------
  def q_sample(self, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε."""
    return self._at("sqrt_ab", t, x0) * x0 + self._at("sqrt_1m_ab", t, x0) * noise

  def q_posterior(self, x0, xt, t) -> tuple[jax.Array, jax.Array]:
    """Mean and clipped log-variance of q(x_{t−1} | x_t, x_0)."""
    mean = self._at("post_coef1", t, xt) * x0 + self._at("post_coef2", t, xt) * xt
    return mean, jnp.broadcast_to(self._at("post_log_var", t, xt), xt.shape)

  def noise_std(self, t: int) -> float:
    """σ_t = √(1 − ᾱ_t): the std of the noise in x_t (float64 table)."""
    return float(self._tables["sqrt_1m_ab"][t])

  def predict_x0(self, xt, t, eps):
    return self._at("sqrt_recip_ab", t, xt) * xt - self._at("sqrt_recipm1_ab", t, xt) * eps

  def p_mean_variance(self, model_out: jax.Array, xt: jax.Array, t: jax.Array,
                      clip_x0: float = 0.0):
    """model_out [.., 2C] = (ε̂, v) -> (mean, log-variance, x̂_0) of p(x_{t−1} | x_t).

    clip_x0 > 0 clips x̂_0 to [−clip_x0, clip_x0] (ADM's `clip_denoised` with a chosen range);
    MAR does not clip (0). Near t = T, x̂_0 = (x_t − √(1−ᾱ)ε̂)/√ᾱ multiplies the error of ε̂ by
    up to ~1/√ᾱ_T; a briefly trained head is not yet exact there, and clipping keeps its chain
    from diverging.
    """
    eps, v = jnp.split(model_out, 2, axis=-1)
    frac = (v + 1.0) / 2.0
    log_var = frac * self._at("log_betas", t, xt) + (1.0 - frac) * self._at("post_log_var", t, xt)
    x0 = self.predict_x0(xt, t, eps)
    if clip_x0:
      x0 = jnp.clip(x0, -clip_x0, clip_x0)
    mean, _ = self.q_posterior(x0, xt, t)
    return mean, log_var, x0

  # --- losses ------------------------------------------------------------------------------
  def training_losses(self, model_fn, x0: jax.Array, t: jax.Array, noise: jax.Array) -> dict:
    """Per-example hybrid loss. x0, noise [N, C]; t int32 [N]; model_fn(x_t, t) -> [N, 2C].

    Returns {"loss", "mse", "vb"}, each [N]: loss = mse + vb (iDDPM `hybrid`, MAR's DiffLoss).
    """
    xt = self.q_sample(x0, t, noise)
    out = model_fn(xt, t)
    eps, v = jnp.split(out, 2, axis=-1)
    frozen = jnp.concatenate([jax.lax.stop_gradient(eps), v], axis=-1)
    mse = jnp.mean(jnp.square(noise - eps), axis=-1)
    vb = self.vb_terms_bits(frozen, x0, xt, t)
    return {"loss": mse + vb, "mse": mse, "vb": vb}

  def vb_terms_bits(self, model_out, x0, xt, t) -> jax.Array:
    """[N] KL(q ‖ p) in bits, channel-mean; the decoder NLL at t = 0."""
    true_mean, true_log_var = self.q_posterior(x0, xt, t)
    mean, log_var, _ = self.p_mean_variance(model_out, xt, t)
    kl = jnp.mean(normal_kl(true_mean, true_log_var, mean, log_var), axis=-1) / math.log(2.0)
    nll = -jnp.mean(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var), axis=-1) / math.log(2.0)
    return jnp.where(t == 0, nll, kl)

  # --- sampling ----------------------------------------------------------------------------
  def p_sample_loop(self, model_fn, noise: jax.Array, rng: jax.Array,
                    temperature: float | jax.Array = 1.0, clip_x0: float = 0.0) -> jax.Array:
    """Ancestral sampling from x_T = noise [N, C] down to x_0, one `lax.fori_loop`.

    model_fn(x_t, t) -> [N, 2C] receives the *original* timestep indices. Temperature τ scales only
    the per-step noise: x_{t−1} = μ + 1[t>0]·exp(½ log σ²)·τ·z (ADM, MAR §3.2); x_T is not scaled.
    """
    k_steps = self.num_timesteps
    tmap = jnp.asarray(self.timestep_map, jnp.int32)

    def body(i, carry):
      x, key = carry
      k = k_steps - 1 - i
      key, sub = jax.random.split(key)
      t_model = jnp.full(x.shape[:1], tmap[k], jnp.int32)
      t_local = jnp.full(x.shape[:1], k, jnp.int32)
      mean, log_var, _ = self.p_mean_variance(model_fn(x, t_model), x, t_local, clip_x0)
      z = jax.random.normal(sub, x.shape, x.dtype)
      x = mean + jnp.where(k > 0, 1.0, 0.0) * jnp.exp(0.5 * log_var) * temperature * z
      return x, key

    x, _ = jax.lax.fori_loop(0, k_steps, body, (noise, rng))
    return x


def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)), elementwise, in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def _approx_std_normal_cdf(x):
  """ADM's tanh approximation of the standard normal CDF (kept for faithfulness)."""
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * jnp.power(x, 3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
  """log P(x) of x in [-1, 1] under N(means, e^{2 log_scales}) integrated over bins of width 2/255;
  the edge bins extend to ±∞ (ADM)."""
  centered = x - means
  inv_stdv = jnp.exp(-log_scales)
  cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
  cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  cdf_delta = cdf_plus - cdf_min
  return jnp.where(x < -0.999, log_cdf_plus,
                   jnp.where(x > 0.999, log_one_minus_cdf_min, jnp.log(jnp.maximum(cdf_delta, 1e-12))))


def create_diffusion(num_timesteps: int = 1000, respacing: str = "") -> GaussianDiffusion:
  """MAR's `create_diffusion(timestep_respacing, noise_schedule="cosine")`."""
  base = GaussianDiffusion.create(cosine_betas(num_timesteps))
  return base.respace(respacing) if respacing else base
