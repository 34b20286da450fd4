"""Diffusion math against an independent float64 NumPy computation (iDDPM's formulas)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from ardiff_jax.diffusion import gaussian as G


def _np_cosine(T=1000, s=0.008):
  f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
  return np.array([min(1 - f(i + 1) / f(i), 0.999) for i in range(T)])


def _np_tables(betas):
  ab = np.cumprod(1 - betas)
  ab_prev = np.concatenate([[1.0], ab[:-1]])
  post_var = betas * (1 - ab_prev) / (1 - ab)
  return ab, ab_prev, post_var


def test_cosine_schedule_matches_the_formula():
  betas = G.cosine_betas(1000)
  np.testing.assert_allclose(betas, _np_cosine(), rtol=1e-12)
  assert betas.max() == pytest.approx(0.999) and betas[0] < 1e-4


def test_q_sample_and_posterior_against_numpy():
  diff = G.create_diffusion()
  betas = _np_cosine()
  ab, ab_prev, post_var = _np_tables(betas)
  rng = np.random.default_rng(0)
  x0, noise, xt = rng.normal(size=(3, 5, 4))
  t = np.array([0, 1, 10, 500, 999])
  got = np.asarray(diff.q_sample(jnp.asarray(x0, jnp.float32), jnp.asarray(t), jnp.asarray(noise, jnp.float32)))
  want = np.sqrt(ab[t])[:, None] * x0 + np.sqrt(1 - ab[t])[:, None] * noise
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  mean, log_var = diff.q_posterior(jnp.asarray(x0, jnp.float32), jnp.asarray(xt, jnp.float32), jnp.asarray(t))
  # mu~_t = sqrt(ab_prev) b / (1-ab) x0 + sqrt(a)(1-ab_prev)/(1-ab) xt; log var~ clipped at t = 0.
  want_mean = (np.sqrt(ab_prev[t]) * betas[t] / (1 - ab[t]))[:, None] * x0 + \
      (np.sqrt(1 - betas[t]) * (1 - ab_prev[t]) / (1 - ab[t]))[:, None] * xt
  np.testing.assert_allclose(np.asarray(mean), want_mean, rtol=1e-5, atol=1e-6)
  want_lv = np.log(np.where(t == 0, post_var[1], post_var[t]))
  np.testing.assert_allclose(np.asarray(log_var)[:, 0], want_lv, rtol=1e-5)


def _np_normal_kl(m1, lv1, m2, lv2):
  return 0.5 * (-1 + lv2 - lv1 + np.exp(lv1 - lv2) + (m1 - m2) ** 2 * np.exp(-lv2))


def test_vlb_terms_against_numpy():
  diff = G.create_diffusion()
  betas = _np_cosine()
  ab, ab_prev, post_var = _np_tables(betas)
  rng = np.random.default_rng(1)
  n, c = 6, 3
  xt = rng.normal(size=(n, c)) * 0.3
  eps = rng.normal(size=(n, c)) * 0.01
  v = np.tanh(rng.normal(size=(n, c)))
  t = np.array([0, 0, 3, 100, 600, 999])
  x0 = np.clip(rng.normal(size=(n, c)) * 0.5, -1, 1)
  # At t = 0 the model mean is x̂0 = (x_t − √(1−ᾱ_0) ε̂)/√ᾱ_0; put x0 a few bins from it (and one
  # value on the +1 edge bin) so the likelihood is not vanishingly small.
  x0_hat0 = (xt[:2] - np.sqrt(1 - ab[0]) * eps[:2]) / np.sqrt(ab[0])
  x0[:2] = np.clip(x0_hat0 + 0.004 * rng.normal(size=(2, c)), -1, 1)
  x0[1, 0], xt[1, 0] = 1.0, 0.999
  got = np.asarray(diff.vb_terms_bits(jnp.asarray(np.concatenate([eps, v], -1), jnp.float32),
                                      jnp.asarray(x0, jnp.float32), jnp.asarray(xt, jnp.float32),
                                      jnp.asarray(t)))
  log_post = np.log(np.where(t == 0, post_var[1], post_var[t]))[:, None]
  true_mean = (np.sqrt(ab_prev[t]) * betas[t] / (1 - ab[t]))[:, None] * x0 + \
      (np.sqrt(1 - betas[t]) * (1 - ab_prev[t]) / (1 - ab[t]))[:, None] * xt
  frac = (v + 1) / 2
  model_lv = frac * np.log(betas[t])[:, None] + (1 - frac) * log_post
  x0_hat = np.sqrt(1 / ab[t])[:, None] * xt - np.sqrt(1 / ab[t] - 1)[:, None] * eps
  model_mean = (np.sqrt(ab_prev[t]) * betas[t] / (1 - ab[t]))[:, None] * x0_hat + \
      (np.sqrt(1 - betas[t]) * (1 - ab_prev[t]) / (1 - ab[t]))[:, None] * xt
  kl = _np_normal_kl(true_mean, log_post, model_mean, model_lv).mean(-1) / math.log(2)
  # Decoder NLL at t = 0 with the exact normal CDF: the tanh approximation agrees to ~1e-3.
  std, m, x = np.exp(0.5 * model_lv[:2]), model_mean[:2], x0[:2]
  upper = np.where(x > 0.999, 1.0, norm.cdf((x - m + 1 / 255) / std))
  lower = np.where(x < -0.999, 0.0, norm.cdf((x - m - 1 / 255) / std))
  nll = -np.log(upper - lower).mean(-1) / math.log(2)
  np.testing.assert_allclose(got[2:], kl[2:], rtol=1e-4)
  assert np.isfinite(nll).all()
  np.testing.assert_allclose(got[:2], nll, rtol=2e-2)


def test_training_loss_is_mse_plus_vb_with_mean_stopped():
  diff = G.create_diffusion()
  rng = np.random.default_rng(2)
  x0, noise = (jnp.asarray(a, jnp.float32) for a in rng.normal(size=(2, 4, 3)))
  t = jnp.array([5, 50, 500, 900])
  w = jnp.asarray(rng.normal(size=(3, 6)) * 0.1, jnp.float32)
  model = lambda w, x, t: jnp.tanh(x @ w)
  out = diff.training_losses(lambda x, tt: model(w, x, tt), x0, t, noise)
  np.testing.assert_allclose(out["loss"], out["mse"] + out["vb"], rtol=1e-6)
  # The VLB sees only the variance channels: its gradient through the ε half is zero.
  g = jax.grad(lambda w: diff.training_losses(lambda x, tt: model(w, x, tt), x0, t, noise)["vb"].sum())(w)
  np.testing.assert_allclose(np.asarray(g)[:, :3], 0.0, atol=0)
  assert np.abs(np.asarray(g)[:, 3:]).max() > 0


def test_respacing_keeps_the_adm_steps_and_cumulative_alphas():
  assert G.space_timesteps(1000, "100")[:3] == [0, 10, 20]
  kept = G.space_timesteps(1000, "100")
  assert len(kept) == 100 and kept[-2:] == [989, 999]
  base = G.create_diffusion()
  sp = G.create_diffusion(respacing="100")
  np.testing.assert_array_equal(sp.timestep_map, kept)
  ab = np.cumprod(1 - _np_cosine())
  # Respaced betas reproduce ᾱ at the kept steps exactly.
  np.testing.assert_allclose(np.cumprod(1 - sp.betas), ab[kept], rtol=1e-10)
  assert base.num_timesteps == 1000 and sp.num_timesteps == 100


def test_sampler_feeds_original_timesteps_and_temperature_scales_only_step_noise():
  sp = G.create_diffusion(respacing="10")
  seen = []

  def model_fn(x, t):
    seen.append(t)
    return jnp.zeros(x.shape[:-1] + (2 * x.shape[-1],))

  x_t = jnp.ones((2, 3))
  # With ε̂ = 0 and τ = 0 the chain is deterministic; the first (model) call is traced once.
  out0 = sp.p_sample_loop(model_fn, x_t, jax.random.key(0), temperature=0.0)
  ab = np.cumprod(1 - sp.betas)
  # ε̂ = 0 -> x̂0 = x_t/√ᾱ_t at every step; the chain ends at x_T/√ᾱ_T scaled down to x̂0 of step 0.
  np.testing.assert_allclose(np.asarray(out0), np.ones((2, 3)) / np.sqrt(ab[-1]), rtol=1e-4)
  out1 = sp.p_sample_loop(model_fn, x_t, jax.random.key(0), temperature=1.0)
  assert not np.allclose(np.asarray(out0), np.asarray(out1))
