"""Sample-quality metrics against independent float64 computations and closed forms."""
import numpy as np
import pytest
import scipy.linalg

from ardiff_jax.evals import metrics as M


def _gaussian_sets(seed=0, n=400, d=6):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
  b = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + 0.5
  return a, b


def test_frechet_distance_matches_scipy_sqrtm():
  a, b = _gaussian_sets()
  mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
  mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
  covmean = scipy.linalg.sqrtm(s1 @ s2).real
  expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
  assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_a_set_with_itself_is_zero_and_symmetric():
  a, b = _gaussian_sets(1)
  assert abs(M.frechet_distance_of_features(a, a)) < 1e-8
  assert M.frechet_distance_of_features(a, b) == pytest.approx(M.frechet_distance_of_features(b, a), rel=1e-10)


def test_frechet_distance_closed_form_for_diagonal_gaussians():
  # Commuting covariances: FD = |mu1-mu2|² + Σ (sqrt(s1) - sqrt(s2))².
  s1, s2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 1.0])
  mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
  assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(5.0 + 1 + 1 + 4, rel=1e-12)


def test_mismatched_statistics_fail_with_a_clear_message():
  with pytest.raises(ValueError, match="same feature net"):
    M.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_stats_npz_round_trip_uses_mu_sigma_keys(tmp_path):
  a, _ = _gaussian_sets()
  mu, sigma = M.feature_stats(a)
  path = str(tmp_path / "ref_stats.npz")
  M.save_stats(path, mu, sigma)
  with np.load(path) as f:
    assert sorted(f.files) == ["mu", "sigma"]     # the layout of ADM's and pytorch-fid's files
  mu2, sigma2 = M.load_stats(path)
  np.testing.assert_array_equal(mu, mu2)
  np.testing.assert_array_equal(sigma, sigma2)


def test_load_stats_errors_name_the_problem(tmp_path):
  with pytest.raises(FileNotFoundError, match="do not exist"):
    M.load_stats(str(tmp_path / "missing.npz"))
  bad = str(tmp_path / "bad.npz")
  np.savez(bad, mean=np.zeros(2))
  with pytest.raises(ValueError, match="lacks"):
    M.load_stats(bad)


def test_inception_score_closed_forms():
  c = 10
  one_hot = np.eye(c)[np.arange(1000) % c]           # confident and evenly spread: IS = C
  assert M.inception_score(one_hot, splits=10)[0] == pytest.approx(c, rel=1e-9)
  uniform = np.full((1000, c), 1.0 / c)               # no information: IS = 1
  assert M.inception_score(uniform, splits=10)[0] == pytest.approx(1.0, rel=1e-9)


def _brute_precision_recall(real, fake, k):
  def radii(x):
    return np.array([np.sort([np.linalg.norm(p - q) for q in x])[k] for p in x])

  def covered(queries, support, r):
    return np.mean([any(np.linalg.norm(q - s) <= rs for s, rs in zip(support, r)) for q in queries])

  return covered(fake, real, radii(real)), covered(real, fake, radii(fake))


def test_precision_recall_matches_brute_force_loops():
  rng = np.random.default_rng(3)
  real = rng.normal(size=(60, 3))
  fake = rng.normal(size=(50, 3)) * 1.5 + 0.7
  got = M.precision_recall(real, fake, k=3)
  np.testing.assert_allclose(got, _brute_precision_recall(real, fake, 3), rtol=0, atol=1e-12)
  assert M.precision_recall(real, real, k=3) == (1.0, 1.0)


def test_class_accuracy():
  logits = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
  assert M.class_accuracy(logits, np.array([0, 1, 1])) == pytest.approx(2 / 3)


def test_memorization_separates_copies_from_new_draws():
  """Nearest-training distances against a brute-force loop; samples that copy training points
  (plus a little noise) sit far nearer them than held-out draws do, new draws of the same law
  do not."""
  rng = np.random.default_rng(4)
  train, held_out, fresh = (rng.normal(size=(n, 4)) for n in (300, 120, 120))
  brute = np.array([min(np.linalg.norm(q - t) for t in train) for q in fresh])
  np.testing.assert_allclose(M.nearest_distances(fresh, train), brute, rtol=1e-12)
  copies = train[rng.choice(300, 120)] + 0.01 * rng.normal(size=(120, 4))
  copied = M.memorization(copies, held_out, train)
  assert copied["nn_train_ratio"] < 0.05 and copied["frac_below_real_p5"] == 1.0
  new = M.memorization(fresh, held_out, train)
  assert 0.7 < new["nn_train_ratio"] < 1.3 and new["frac_below_real_p5"] < 0.15
