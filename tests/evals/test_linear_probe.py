"""The ST-AR / MAE linear probe (evals/linear_probe.py) on planted features, and its BatchNorm
against an independent float64 NumPy computation."""
import functools

import jax

import ml_collections
import numpy as np
import pytest

from ardiff_jax import configlib
from ardiff_jax.evals import linear_probe as lp

NUM_CLASSES, DIM = 4, 16


def _planted(rng, class_means, n):
  """features [n, 2, D]: position 0 = class mean + noise σ 0.5 (linearly separable), position 1
  pure noise; labels [n]."""
  labels = rng.integers(0, NUM_CLASSES, n)
  signal = class_means[labels] + 0.5 * rng.normal(size=(n, DIM))
  noise = rng.normal(size=(n, DIM))
  return np.stack([signal, noise], axis=1).astype(np.float32), labels


@functools.lru_cache(maxsize=None)
def _data():
  rng = np.random.default_rng(0)
  class_means = rng.normal(size=(NUM_CLASSES, DIM))
  return _planted(rng, class_means, 512) + _planted(rng, class_means, 256)


def _cfg() -> ml_collections.ConfigDict:
  """A short schedule: 20 epochs of 8 batches of 64, lr 4 (LARS's trust ratio 0.001 makes the
  head's relative step ~lr/1000)."""
  cfg = configlib.probe_config()
  cfg.epochs, cfg.warmup_epochs, cfg.batch_size, cfg.base_lr = 20, 2, 64, 16.0
  return cfg


@functools.lru_cache(maxsize=None)
def _stacked():
  train_x, train_y, test_x, test_y = _data()
  return lp.train_probe(train_x, train_y, test_x, test_y, NUM_CLASSES, _cfg(), seed=0)


def test_probe_recovers_a_planted_linear_signal_and_not_noise():
  result = _stacked()
  assert result["top1"][0] > 0.95
  assert result["top1"][1] < 0.35          # chance is 0.25 (256 test rows: σ ≈ 0.027)
  assert result["best_index"] == 0 and result["best_top1"] == result["top1"][0]
  assert result["batch_size"] == 64 and result["steps_per_epoch"] == 8
  assert result["train_loss"][0] < result["train_loss"][1]


def test_batch_norm_matches_float64_numpy():
  rng = np.random.default_rng(1)
  x = (3.0 + 2.0 * rng.normal(size=(32, 5))).astype(np.float32)
  stats = {"mean": rng.normal(size=5).astype(np.float32),
           "var": rng.uniform(0.5, 2.0, size=5).astype(np.float32)}
  y, new = lp.batch_norm(x, stats, train=True)
  x64 = x.astype(np.float64)
  mean, var = x64.mean(0), ((x64 - x64.mean(0)) ** 2).mean(0)
  np.testing.assert_allclose(y, (x64 - mean) / np.sqrt(var + 1e-6), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(new["mean"], 0.9 * stats["mean"] + 0.1 * mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new["var"], 0.9 * stats["var"] + 0.1 * var * 32 / 31, rtol=1e-5)
  y_eval, same = lp.batch_norm(x, stats, train=False)
  np.testing.assert_allclose(y_eval, (x64 - stats["mean"]) / np.sqrt(stats["var"] + 1e-6),
                             rtol=1e-5, atol=1e-5)
  assert all(np.array_equal(same[k], stats[k]) for k in stats)


def test_heads_train_independently_of_the_heads_beside_them():
  # Alone vs stacked next to a noise head: same init (fold_in per head), same shuffles, and
  # LARS's trust ratio per head, so the signal head ends where it would alone.
  train_x, train_y, test_x, test_y = _data()
  alone = lp.train_probe(train_x[:, :1], train_y, test_x[:, :1], test_y, NUM_CLASSES, _cfg(),
                         seed=0)
  stacked = _stacked()
  assert alone["top1"][0] == stacked["top1"][0]
  np.testing.assert_allclose(alone["train_loss"][0], stacked["train_loss"][0], rtol=1e-5)
  # The softmax ignores a common shift of the biases and the cross-entropy gradient w.r.t. b sums
  # to 0, so round-off moves their mean freely (~1e-6 at this lr): compare the centred biases.
  centred = lambda b: np.asarray(b) - np.mean(b)
  pairs = {"w": (alone["params"]["w"][0], stacked["params"]["w"][0]),
           "b": (centred(alone["params"]["b"][0]), centred(stacked["params"]["b"][0]))}
  pairs.update({name: (alone["stats"][name][0], stacked["stats"][name][0])
                for name in alone["stats"]})
  for name, (a, b) in pairs.items():
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=name)


def test_positions_closed_form_and_range():
  np.testing.assert_array_equal(lp.positions(256, 8), np.arange(1, 9) * 32 - 1)
  np.testing.assert_array_equal(lp.positions(10, 3), [2, 5, 9])      # ⌊(k+1)·10/3⌋ − 1
  np.testing.assert_array_equal(lp.positions(16, 16), np.arange(16))
  with pytest.raises(ValueError, match=r"probe.num_positions=17 must be in \[1, 16\]"):
    lp.positions(16, 17)


def test_lars_steps_match_maes_lars_in_float64():
  """MAE's util/lars.py, step by step while the lr warms up: decay and trust ratio on matrices,
  momentum on that step, then −lr."""
  cfg = configlib.probe_config()
  cfg.epochs, cfg.warmup_epochs, cfg.weight_decay = 4, 2, 0.05
  tx, schedule = lp.make_optimizer(cfg, steps_per_epoch=2, batch_size=512)
  rng = np.random.default_rng(1)
  params = {"w": rng.normal(size=(5, 3)), "b": rng.normal(size=3)}
  state = tx.init(jax.tree.map(np.float32, params))
  got, want, mu = dict(params), dict(params), {k: np.zeros_like(v) for k, v in params.items()}
  for step in range(5):
    grads = {"w": rng.normal(size=(5, 3)), "b": rng.normal(size=3)}
    updates, state = tx.update(jax.tree.map(np.float32, grads), state,
                               jax.tree.map(np.float32, got))
    got = {k: np.asarray(got[k], np.float32) + np.asarray(updates[k]) for k in got}
    for k, p in want.items():
      dp = grads[k]
      if p.ndim > 1:
        dp = dp + cfg.weight_decay * p
        dp = dp * cfg.trust_coefficient * np.linalg.norm(p) / np.linalg.norm(dp)
      mu[k] = cfg.momentum * mu[k] + dp
      want[k] = p - float(schedule(step)) * mu[k]
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)
