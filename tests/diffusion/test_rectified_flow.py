"""DD2's rectified-flow math against float64 NumPy: Eq. (1)'s mixture score (also as the finite-
difference gradient of the mixture's log density), its chunked form, the velocity / score / x̂_0
conversions, and SiD's loss."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

from ardiff_jax.diffusion import rectified_flow as rf

V, C = 37, 4


def _case(seed=0, shape=(3, 5), t_low=0.05):
  rng = np.random.default_rng(seed)
  book = rng.normal(size=(V, C))
  logits = 2.0 * rng.normal(size=shape + (V,))
  logits[..., :5] = -np.inf                       # entries a top-k filter removed
  log_p = logits - logsumexp(logits, axis=-1, keepdims=True)
  x = rng.normal(size=shape + (C,))
  t = rng.uniform(t_low, 1.0, size=shape)
  return x, t, log_p, book


def _np_log_density(x, t, log_p, book):
  """log Σ_j p_j N(x; (1 − t)c_j, t²I), float64."""
  d = x[..., None, :] - (1 - t)[..., None, None] * book
  sq = np.sum(d ** 2, axis=-1)
  return logsumexp(log_p - sq / (2 * t[..., None] ** 2), axis=-1) - C * np.log(t) - 0.5 * C * np.log(2 * np.pi)


def _np_score(x, t, log_p, book):
  d = x[..., None, :] - (1 - t)[..., None, None] * book                       # [..., V, C]
  w = log_p - np.sum(d ** 2, axis=-1) / (2 * t[..., None] ** 2)
  w = np.exp(w - logsumexp(w, axis=-1, keepdims=True))
  return -np.sum(w[..., None] * d, axis=-2) / t[..., None] ** 2


@pytest.mark.parametrize("chunk", [5, 8, V])   # 5: the first chunk is all −inf (filtered codes)
def test_mixture_score_and_velocity_match_numpy_in_any_chunking(chunk):
  x, t, log_p, book = _case()
  args = [jnp.asarray(a, jnp.float32) for a in (x, t, log_p, book)]
  got = rf.mixture_score(*args, chunk)
  score = _np_score(x, t, log_p, book)
  np.testing.assert_allclose(np.asarray(got), score, rtol=2e-4, atol=2e-4)
  velocity = (-t[..., None] * score - x) / (1 - t[..., None])
  np.testing.assert_allclose(np.asarray(rf.mixture_velocity(*args, chunk)), velocity, rtol=2e-4, atol=2e-4)


def test_mixture_score_is_the_gradient_of_the_log_density():
  x, t, log_p, book = _case(seed=1, shape=(4,), t_low=0.3)
  h = 1e-5
  fd = np.stack([(_np_log_density(x + h * e, t, log_p, book) - _np_log_density(x - h * e, t, log_p, book))
                 / (2 * h) for e in np.eye(C)], axis=-1)
  np.testing.assert_allclose(_np_score(x, t, log_p, book), fd, rtol=1e-6, atol=1e-6)
  got = rf.mixture_score(jnp.asarray(x), jnp.asarray(t), jnp.asarray(log_p), jnp.asarray(book), 16)
  np.testing.assert_allclose(np.asarray(got), fd, rtol=2e-4, atol=2e-4)


def test_small_t_is_finite_and_snaps_to_the_nearest_likely_code():
  """At t = 0.01 the weights are one-hot on the nearest code (of those with p > 0) to x/(1 − t)."""
  x, _, log_p, book = _case(seed=2)
  t = np.full(x.shape[:-1], 0.01)
  x = (1 - t[..., None]) * book[7] + 0.001          # next to code 7
  mean = rf.mixture_weights_chunked(jnp.asarray(x), jnp.asarray(t), jnp.asarray(log_p),
                                    jnp.asarray(book), 8)
  assert np.isfinite(np.asarray(mean)).all()
  np.testing.assert_allclose(np.asarray(mean), np.broadcast_to(book[7], x.shape), atol=1e-4)


def test_velocity_score_and_denoised_conversions():
  """One-code law (p = δ_c): x_t = (1 − t)c + tε has score −ε/t, velocity ε − c, x̂_0 = c."""
  rng = np.random.default_rng(3)
  c, eps = rng.normal(size=(6, C)), rng.normal(size=(6, C))
  t = rng.uniform(0.05, 0.95, size=6)
  x = np.asarray(rf.interpolate(jnp.asarray(c), jnp.asarray(eps), jnp.asarray(t)))
  np.testing.assert_allclose(x, (1 - t[:, None]) * c + t[:, None] * eps, rtol=1e-6)
  s = rf.mixture_score(jnp.asarray(x), jnp.asarray(t),
                       jnp.zeros((6, 1)), jnp.asarray(c[:1]))       # codebook of one: c_0
  s0 = -(x - (1 - t[:, None]) * c[:1]) / t[:, None] ** 2
  np.testing.assert_allclose(np.asarray(s), s0, rtol=1e-5, atol=1e-5)
  score = -eps / t[:, None]
  v = np.asarray(rf.velocity_from_score(jnp.asarray(score), jnp.asarray(x), jnp.asarray(t)))
  np.testing.assert_allclose(v, eps - c, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(rf.score_from_velocity(jnp.asarray(v), jnp.asarray(x),
                                                               jnp.asarray(t))), score, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(rf.denoised_from_velocity(jnp.asarray(v), jnp.asarray(x),
                                                                  jnp.asarray(t))), c, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("alpha", [1.0, 1.2])
def test_sid_loss_and_its_generator_gradient(alpha):
  rng = np.random.default_rng(4)
  xr, xf, xg = (rng.normal(size=(3, 5, C)) for _ in range(3))
  norm = np.maximum(np.mean(np.abs(xg - xr), axis=-1, keepdims=True), 1e-5)
  want = np.sum((xr - xf) * ((xr - xg) - alpha * (xr - xf)) / norm, axis=-1)
  got = rf.sid_loss(jnp.asarray(xr), jnp.asarray(xf), jnp.asarray(xg), alpha)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
  # The normaliser is stop-gradiented: d/dx_g = −(x̂_real − x̂_fake)/norm.
  grad = jax.grad(lambda g: jnp.sum(rf.sid_loss(jnp.asarray(xr), jnp.asarray(xf), g, alpha)))(
      jnp.asarray(xg))
  np.testing.assert_allclose(np.asarray(grad), -(xr - xf) / norm, rtol=1e-5)


def test_stage_two_losses_match_numpy():
  """DD2's CSD in SiD form (per token, summed over positions) and the fake-score loss."""
  rng = np.random.default_rng(0)
  b, l, c, v = 2, 3, 4, 11
  table = rng.normal(size=(v, c))
  logits = rng.normal(size=(b, l, v))
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  x, eps, v_fake = (rng.normal(size=(b, l, c)) for _ in range(3))
  t = rng.uniform(0.1, 0.9, size=(b, l))
  xt = (1 - t[..., None]) * x + t[..., None] * eps
  s = _np_score(xt.reshape(-1, c), t.reshape(-1), log_p.reshape(-1, v), table).reshape(b, l, c)
  x_real = (xt + t[..., None] ** 2 * s) / (1 - t[..., None])
  x_fake = xt - t[..., None] * v_fake
  norm = np.maximum(np.mean(np.abs(x - x_real), -1, keepdims=True), 1e-5)
  want = np.mean(np.sum(np.sum((x_real - x_fake) * (x_fake - x) / norm, -1), -1))
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  real = lambda g: rf.mixture_weights_chunked(rf.interpolate(g, f32(eps), f32(t)), f32(t),
                                              f32(log_p), f32(table))
  loss = lambda g: jnp.mean(jnp.sum(rf.csd_loss(g, rf.interpolate(g, f32(eps), f32(t)), f32(t),
                                                real(g), f32(v_fake)), -1))
  np.testing.assert_allclose(float(loss(f32(x))), want, rtol=1e-4)
  np.testing.assert_allclose(float(rf.fake_score_loss(f32(v_fake), f32(x), f32(eps))),
                             np.mean((v_fake - (eps - x)) ** 2), rtol=1e-5)
  # The generator's gradient, through its tokens, their noised copies and the teacher's
  # denoiser at them, against central differences of the float64 loss.
  def np_loss(xx):
    xxt = (1 - t[..., None]) * xx + t[..., None] * eps
    ss = _np_score(xxt.reshape(-1, c), t.reshape(-1), log_p.reshape(-1, v), table).reshape(b, l, c)
    xr = (xxt + t[..., None] ** 2 * ss) / (1 - t[..., None])
    xf = xxt - t[..., None] * v_fake
    return np.mean(np.sum(np.sum((xr - xf) * (xf - xx) / norm, -1), -1))   # norm: frozen at x
  grad = np.asarray(jax.grad(loss)(f32(x)))
  for index in [(1, 2, 3), (0, 0, 0), (1, 0, 2), (0, 2, 1)]:
    e = np.zeros_like(x)
    e[index] = 1e-5
    np.testing.assert_allclose(grad[index], (np_loss(x + e) - np_loss(x - e)) / 2e-5, rtol=2e-3,
                               atol=1e-5)


def test_vp_time_matches_the_paths_snr_and_scale():
  """At the RF time whose SNR (1 − t)²/t² equals a schedule step's ᾱ/(1 − ᾱ), s is that step and
  k·x_t is the VP diffusion's √ᾱ x_0 + √(1 − ᾱ) ε; between steps s interpolates log SNR; a
  denoiser given the true ε returns x_0 exactly."""
  from ardiff_jax.diffusion.gaussian import cosine_betas  # pylint: disable=g-import-not-at-top
  ab = np.cumprod(1.0 - cosine_betas(1000))
  steps = np.array([3, 250, 500, 871])
  t = 1.0 / (1.0 + np.sqrt(ab[steps] / (1.0 - ab[steps])))            # (1 − t)/t = √SNR
  s, k = rf.vp_time(jnp.asarray(t, jnp.float32), ab)
  np.testing.assert_allclose(np.asarray(s), steps, atol=2e-2)
  rng = np.random.default_rng(0)
  x0, eps = rng.normal(size=(4, C)), rng.normal(size=(4, C))
  xt = (1 - t)[:, None] * x0 + t[:, None] * eps
  vp = np.sqrt(ab[steps])[:, None] * x0 + np.sqrt(1 - ab[steps])[:, None] * eps
  np.testing.assert_allclose(np.asarray(k)[:, None] * xt, vp, rtol=1e-4, atol=1e-5)
  mid = 1.0 / (1.0 + np.sqrt(np.sqrt(ab[500] * ab[501] / ((1 - ab[500]) * (1 - ab[501])))))
  np.testing.assert_allclose(float(rf.vp_time(jnp.float32(mid), ab)[0]), 500.5, atol=2e-2)
  np.testing.assert_allclose(np.asarray(rf.denoised_from_eps(jnp.asarray(eps), jnp.asarray(xt),
                                                             jnp.asarray(t))), x0, rtol=1e-5, atol=1e-5)
