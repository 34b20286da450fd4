"""Condition refinement: the OT step against closed forms and float64 NumPy, sharding, the queue in
checkpoints, no ground-truth leakage in runtime mode, and both generators training and sampling."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ardiff_jax.evals import condition_error
from ardiff_jax.methods import condref as cr
from ardiff_jax.methods import get_method
from tests.helpers import load_config


# ------------------------------------------------------------------ float64 references
def gaussian_w2(m1, s1, m2, s2) -> float:
  """Closed-form W₂ between N(m1, s1) and N(m2, s2) (Bures metric), float64."""
  def sqrtm(a):
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.maximum(w, 0))) @ v.T
  r = sqrtm(s1)
  bures = np.trace(s1 + s2 - 2 * sqrtm(r @ s2 @ r))
  return float(np.sqrt(np.sum((m1 - m2) ** 2) + max(bures, 0.0)))


def moments(x):
  x = np.asarray(x, np.float64)
  return x.mean(0), np.cov(x, rowvar=False)


def numpy_entropic_map(x, y, eps, tau_b, iters=3000):
  """Log-domain semi-unbalanced Sinkhorn in float64 (uniform a, b; KL relaxation on b with
  τ_b = ρ/(ρ+ε)), then the barycentric projection Σ_j P_ij y_j / Σ_j P_ij on the fitted points."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  c = ((x[:, None] - y[None]) ** 2).sum(-1)
  log_a, log_b = -np.log(len(x)) * np.ones(len(x)), -np.log(len(y)) * np.ones(len(y))
  lse = lambda m, axis: np.log(np.exp(m - m.max(axis, keepdims=True)).sum(axis)) + m.max(axis)
  f, g = np.zeros(len(x)), np.zeros(len(y))
  for _ in range(iters):
    f = -eps * lse(log_b[None] + (g[None] - c) / eps, 1)
    g = tau_b * -eps * lse(log_a[:, None] + (f[:, None] - c) / eps, 0)
  logp = (f[:, None] + g[None] - c) / eps + log_a[:, None] + log_b[None]
  p = np.exp(logp - logp.max(1, keepdims=True))
  return (p @ y) / p.sum(1, keepdims=True), c.std()


# --------------------------------------------------------------------------- the operator
def test_entropic_map_equals_the_barycentric_projection_of_a_float64_sinkhorn():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(96, 5))
  y = rng.normal(size=(120, 5)) * 0.6 + 1.5
  rel_eps, tau_b = 0.05, 0.9
  _, cost_std = numpy_entropic_map(x, y, 1.0, tau_b, iters=1)
  expected, _ = numpy_entropic_map(x, y, rel_eps * cost_std, tau_b)
  transport, info = cr.entropic_map(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32),
                                    epsilon=rel_eps, iterations=400, tau_b=tau_b)
  got = np.asarray(transport(jnp.asarray(x, jnp.float32)), np.float64)
  assert float(info["converged"]) == 1.0
  np.testing.assert_allclose(got, expected, atol=2e-4)


@pytest.mark.parametrize("tau,num_steps", [(1.0, 1), (1.0, 2), (3.0, 1)])
def test_jko_steps_contract_w2_by_one_over_one_plus_tau(tau, num_steps):
  """Gaussian clouds: each JKO step moves z a fraction τ/(1+τ) of the way along the OT map, so
  W₂ to the target shrinks by (1/(1+τ))^K (closed-form Gaussian W₂ as the reference)."""
  rng = np.random.default_rng(1)
  n, d = 1500, 3
  x = rng.normal(size=(n, d))
  rot = np.linalg.qr(rng.normal(size=(d, d)))[0]
  y = (rng.normal(size=(n, d)) * np.array([0.5, 1.0, 1.6])) @ rot.T + np.array([2.0, -1.0, 0.5])
  refiner = cr.Refiner(num_steps=num_steps, tau=tau, lam=0.0, epsilon=0.002, iterations=300,
                       tau_b=1.0)
  empty = jnp.zeros((n, 0), jnp.float32)
  moved, _ = refiner(jnp.asarray(x, jnp.float32), empty, jnp.arange(n), jnp.asarray(y, jnp.float32),
                     empty)
  before = gaussian_w2(*moments(x), *moments(y))
  after = gaussian_w2(*moments(moved), *moments(y))
  expected = (1.0 / (1.0 + tau)) ** num_steps
  assert abs(after / before - expected) < 0.03, (before, after, expected)


def test_jko_update_minimises_the_proximal_objective():
  """One JKO step with the map T frozen is argmin_x (1/2τ)‖x − z‖² + ½‖x − T(z)‖² + (λ/2)‖x − ŷ‖²
  (the proximal step of F = ½W₂²(·, P*) + (λ/2)E‖· − ŷ‖², W₂ linearised by T). The minimiser is
  found here by scipy's BFGS in float64, not from a formula."""
  import scipy.optimize  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  z, t, y = (rng.normal(size=(4, 3)) for _ in range(3))
  for tau, lam in ((0.5, 2.0), (1.0, 0.0), (3.0, 0.25)):
    objective = lambda x, tau=tau, lam=lam: (
        np.sum((x - z.ravel()) ** 2) / (2 * tau) + 0.5 * np.sum((x - t.ravel()) ** 2)
        + 0.5 * lam * np.sum((x - y.ravel()) ** 2))
    best = scipy.optimize.minimize(objective, np.zeros(z.size), method="BFGS",
                                   options={"gtol": 1e-10}).x.reshape(z.shape)
    got = cr.jko_update(jnp.asarray(z, jnp.float32), jnp.asarray(t, jnp.float32), tau=tau, lam=lam,
                        y_hat=jnp.asarray(y, jnp.float32) if lam else None)
    np.testing.assert_allclose(np.asarray(got), best, rtol=1e-5, atol=1e-5)


def test_class_features_keep_the_transport_within_each_class():
  """Two classes whose clouds are swapped in space: with a class cost, every point maps into its
  own class's reference cloud, not the nearer one of the other class."""
  rng = np.random.default_rng(2)
  z = np.concatenate([rng.normal(size=(64, 2)) + 4, rng.normal(size=(64, 2)) - 4])
  labels = np.repeat([0, 1], 64)
  ref = np.concatenate([rng.normal(size=(64, 2)) - 4, rng.normal(size=(64, 2)) + 4])  # swapped
  ref_labels = np.repeat([0, 1], 64)
  s_cls, s_pos = cr.feature_scales(jnp.asarray(z), jnp.asarray(ref), 20.0, 0.0)
  feats = cr.condition_features(jnp.asarray(labels), jnp.zeros(128, jnp.int32), 2, 1, s_cls, s_pos)
  rfeats = cr.condition_features(jnp.asarray(ref_labels), jnp.zeros(128, jnp.int32), 2, 1, s_cls, s_pos)
  refiner = cr.Refiner(num_steps=1, tau=1e6, lam=0.0, epsilon=0.01, iterations=200, tau_b=1.0)
  moved, _ = refiner(jnp.asarray(z, jnp.float32), feats, jnp.arange(128), jnp.asarray(ref, jnp.float32),
                     rfeats)
  moved = np.asarray(moved)
  assert (moved[:64, 0] < -2).all() and (moved[64:, 0] > 2).all()


def test_null_class_features_are_zero():
  f = cr.condition_features(jnp.array([0, 2]), jnp.array([1, 0]), 2, 3, jnp.float32(2.0),
                            jnp.float32(1.0))
  np.testing.assert_array_equal(f, [[2, 0, 0, 1, 0], [0, 0, 1, 0, 0]])


def test_sharded_refinement_equals_single_device():
  """The same refinement, jitted with the conditions sharded over 8 devices, equals the
  single-device result (XLA partitions the cost matrix; the coupling stays global)."""
  assert jax.device_count() == 8
  rng = np.random.default_rng(3)
  r = cr.condref_config()
  r.update(num_points=64, num_reference=96, queue_size=128, push_per_step=64, sinkhorn_iterations=30,
           num_steps=2)
  refinement = cr.ConditionRefinement(r, seq_len=4, cond_dim=8, token_dim=2, num_classes=3)
  queue = cr.push(cr.init_queue(128, 8), jnp.asarray(rng.normal(size=(128, 8)) + 1, jnp.float32),
                  jnp.asarray(rng.integers(0, 3, 128)), jnp.asarray(rng.integers(0, 4, 128)))
  z = jnp.asarray(rng.normal(size=(128, 8)), jnp.float32)
  labels, pos = jnp.asarray(rng.integers(0, 4, 128)), jnp.asarray(np.tile(np.arange(4), 32))
  weights = jnp.ones((128,))
  fn = lambda z, lab, p, w, q: refinement.refine(z, lab, p, w, q, jax.random.key(0))[0]
  single = jax.jit(fn)(z, labels, pos, weights, queue)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  rows = NamedSharding(mesh, P("data"))
  put = lambda a: jax.device_put(a, NamedSharding(mesh, P("data", *([None] * (a.ndim - 1)))))
  sharded = jax.jit(fn)(put(z), jax.device_put(labels, rows), jax.device_put(pos, rows),
                        jax.device_put(weights, rows), queue)
  assert len(sharded.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(single - z).max()) > 0.1      # it did move the points


def test_queue_is_fifo_and_refinement_waits_until_it_is_full():
  q = cr.init_queue(4, 2)
  q = cr.push(q, jnp.ones((3, 2)), jnp.array([1, 1, 1]), jnp.array([0, 1, 2]))
  assert not bool(cr.queue_full(q))
  q = cr.push(q, 2 * jnp.ones((3, 2)), jnp.array([2, 2, 2]), jnp.array([3, 4, 5]))
  np.testing.assert_array_equal(q["labels"], [2, 2, 1, 2])   # slots 3, 0, 1 overwritten in order
  np.testing.assert_array_equal(q["positions"], [4, 5, 2, 3])
  assert int(q["count"]) == 6 and bool(cr.queue_full(q))
  r = cr.condref_config()
  r.update(num_points=4, num_reference=4, queue_size=8, push_per_step=4, sinkhorn_iterations=10)
  refinement = cr.ConditionRefinement(r, seq_len=6, cond_dim=2, token_dim=2, num_classes=3)
  z = jnp.arange(8.0).reshape(4, 2)
  out, info = refinement.refine(z, jnp.zeros(4, jnp.int32), jnp.zeros(4, jnp.int32), jnp.ones(4),
                                cr.init_queue(8, 2), jax.random.key(0))
  np.testing.assert_array_equal(out, z)
  assert float(info["queue_full"]) == 0.0


def test_fit_rows_are_distinct_and_zero_weight_rows_carry_no_mass():
  """Six rows of eight, three of them with weight: those three come first, every row once, and the
  zero-weight rows the draw must include get marginal 0; a zero-marginal row leaves the fitted map
  unchanged (the first version repeated positive rows instead)."""
  w = jnp.array([0, 1, 0, 1, 1, 0, 0, 0], jnp.float32)
  rows, a = (np.asarray(v) for v in cr.fit_rows(jax.random.key(0), w, 6))
  assert len(set(rows)) == 6 and set(rows[:3]) == {1, 3, 4}
  np.testing.assert_allclose(a, [1 / 3] * 3 + [0] * 3)
  rng = np.random.default_rng(6)
  x, y, probe = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((5, 3), (7, 3), (4, 3)))
  junk = jnp.concatenate([x, 50 + jnp.zeros((2, 3))])
  fit = lambda pts, a: cr.entropic_map(pts, y, epsilon=0.1, iterations=200, a=a)[0](probe)
  np.testing.assert_allclose(fit(junk, jnp.array([0.2] * 5 + [0, 0])), fit(x, None), atol=1e-5)


def test_push_writes_only_valid_rows():
  q = cr.push(cr.init_queue(4, 1), jnp.arange(4.0)[:, None], jnp.arange(4), jnp.arange(4),
              valid=jnp.array([True, False, True, False]))
  assert int(q["count"]) == 2
  np.testing.assert_array_equal(q["conditions"][:, 0], [0, 2, 0, 0])


def _filled_refinement(num_steps=2):
  """A refinement with both queues full of random conditions (source and reference differ)."""
  r = cr.condref_config()
  r.update(mode="runtime", num_points=64, num_reference=96, queue_size=128, push_per_step=64,
           sinkhorn_iterations=30, num_steps=num_steps)
  refinement = cr.ConditionRefinement(r, seq_len=4, cond_dim=8, token_dim=2, num_classes=3)
  rng = np.random.default_rng(7)
  fill = lambda shift: cr.push(cr.init_queue(128, 8),
                               jnp.asarray(rng.normal(size=(128, 8)) + shift, jnp.float32),
                               jnp.asarray(rng.integers(0, 3, 128)), jnp.asarray(rng.integers(0, 4, 128)))
  return refinement, {cr.QUEUE_KEY: fill(1.0), cr.SOURCE_KEY: fill(0.0)}


def test_sampling_refinement_is_per_sample():
  """The sampling map is fitted from the checkpointed queues alone: a row's refined condition is
  bitwise the same whatever the other rows of its batch are, and (to float rounding) whatever
  the batch size; the map does move the rows."""
  refinement, params = _filled_refinement()
  rng = np.random.default_rng(8)
  z = jnp.asarray(rng.normal(size=(12, 8)), jnp.float32)
  labels, pos = jnp.asarray(rng.integers(0, 4, 12)), jnp.asarray(rng.integers(0, 4, 12))
  fn = jax.jit(lambda p, z, lab, ps: refinement.sampling_map(p)(z, lab, ps))
  base = np.asarray(fn(params, z, labels, pos))
  other = z.at[1:].set(jnp.asarray(rng.normal(size=(11, 8)) * 3, jnp.float32))
  other_labels = labels.at[1:].set(3)                     # all others: the null class
  np.testing.assert_array_equal(np.asarray(fn(params, other, other_labels, pos))[0], base[0])
  np.testing.assert_allclose(np.asarray(fn(params, z[:3], labels[:3], pos[:3])), base[:3],
                             rtol=1e-6, atol=1e-6)
  assert np.abs(base - np.asarray(z)).max() > 0.1
  idle = dict(params, **{cr.SOURCE_KEY: cr.init_queue(128, 8)})   # the source not yet full
  np.testing.assert_array_equal(np.asarray(fn(idle, z, labels, pos)), np.asarray(z))


@pytest.mark.parametrize("settings,message", [
    (dict(mode="always"), "condref.mode"),
    (dict(mode="runtime", lam=0.5), "lam must be 0 in runtime"),
    (dict(num_reference=5000), "queue_size"),
    (dict(sinkhorn_iterations=64), "multiple of 10"),
    (dict(reference="ema_teacher", lambda_weight=0.1), "paired ideal condition"),
    (dict(tau_b=0.0), r"tau_b=0.0: .* \(0, 1\]"),
    (dict(tau_b=1.5), r"tau_b=1.5"),
    (dict(push_per_step=5000), "push_per_step=5000 exceeds condref.queue_size"),
    (dict(mode="runtime", num_points=3000), r"num_points=3000 exceeds the 2000 loss-bearing"),
    (dict(mode="loss", push_per_step=2048), r"push_per_step=2048 exceeds the 2000"),
])
def test_config_errors_name_the_field(settings, message):
  r = cr.condref_config()
  r.update(settings)
  with pytest.raises(ValueError, match=message):
    cr.validate(r, loss_rows=2000)


def test_mar_bounds_the_fit_set_by_its_fewest_masked_tokens():
  """MAR's loss rows are its masked tokens: at least ⌈0.7·16⌉ = 12 of 16 per digit, so a batch
  of 64 holds 768 of them, and the digits settings (512 fit points, 256 pushed) fit."""
  config = load_config("mar_digits", "condref=runtime")
  config.tokenizer.latent_scale = 1.0     # no latent cache needed to build the method
  get_method(config)
  config.condref.num_points = 800
  with pytest.raises(ValueError, match="num_points=800 exceeds the 768 loss-bearing"):
    get_method(config)


def test_fit_decay_recovers_an_exponential_and_its_interval():
  steps = np.arange(20)
  noise = 0.01 * np.random.default_rng(9).normal(size=20)
  fit = condition_error.fit_decay(steps, 2.0 * 0.8 ** steps + 0.5 + noise)
  assert abs(fit["beta"] - 0.8) < 0.02 and abs(fit["m"] - 0.5) < 0.03 and fit["r2"] > 0.99
  lo, hi = fit["beta_interval"]
  assert lo <= 0.8 <= hi < 0.9 and fit["decays"] and fit["M"] > 0


def test_fit_decay_does_not_read_a_rising_or_flat_sequence_as_decay():
  """With M free, 0.9 − 0.2·0.8ⁱ (rising) fitted β = 0.80 exactly like a decay; with M ≥ 0 it
  cannot, and a flat sequence leaves β unidentified (the interval spans the grid)."""
  steps = np.arange(16)
  rising = condition_error.fit_decay(steps, 0.9 - 0.2 * 0.8 ** steps)
  assert not rising["decays"] and (rising["M"] == 0 or rising["beta"] > 1)
  flat = condition_error.fit_decay(steps, np.full(16, 0.7))
  assert not flat["decays"] and flat["M"] == 0
  assert flat["beta_interval"] == [float(condition_error.BETA_GRID[0]),
                                   float(condition_error.BETA_GRID[-1])]


def test_compare_lines_up_served_snr_and_refuses_mismatched_analyses():
  """Across models the comparison is of the conditions each sampler feeds its head (the baseline's
  raw z, the runtime model's R(z)) on the same held-out tokens and noise."""
  def analysis(served, snr, seed=0):
    return {"timesteps": [900, 0], "num_tokens": 64, "analysis_seed": seed, "score_t": 500,
            "served": served, "mode": "runtime" if served == "refined" else "probe",
            "variants": {"raw": {"denoise_snr_db": [1.0, 3.0]},
                         "refined": {"denoise_snr_db": snr}}}
  table = condition_error.compare({"base": analysis("raw", [9.0, 9.0]),
                                   "refined": analysis("refined", [2.0, 5.0])})
  assert table["base"]["mean_db"] == 2.0 and table["refined"]["mean_db"] == 3.5
  assert table["refined"]["delta_db"] == 1.5 and table["base"]["delta_db"] == 0.0
  with pytest.raises(ValueError, match="differ in analysis_seed"):
    condition_error.compare({"a": analysis("raw", [0, 0]), "b": analysis("raw", [0, 0], seed=1)})
