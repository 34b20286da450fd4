"""Faults and bad input: an unreadable newest checkpoint, a NaN batch under nan_policy=halt."""
import logging
import os

import jax
import numpy as np
import pytest

from ardiff_jax import main
from ardiff_jax.train import checkpoint, experiment, loop
from tests.helpers import load_config


def _tiny(steps, **train):
  c = load_config("kl_digits", "tiny")
  c.train.num_steps = steps
  c.train.update(train)
  return c


def _state(workdir, config, step=None):
  exp = experiment.build_experiment(config)
  state, at = checkpoint.restore(checkpoint.make_manager(workdir), exp.abstract_state, step=step)
  return jax.device_get(state), at


def _truncate_checkpoint(workdir, step):
  """Cuts every file of checkpoint `step` to half its length, as a crash mid-write would."""
  for root, _, files in os.walk(os.path.join(workdir, "checkpoints", str(step))):
    for name in files:
      path = os.path.join(root, name)
      size = os.path.getsize(path)
      with open(path, "r+b") as f:
        f.truncate(size // 2)


def test_unreadable_newest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
  reference, workdir = str(tmp_path / "reference"), str(tmp_path / "run")
  main.run(_tiny(6), reference, "train")
  main.run(_tiny(4), workdir, "train")              # checkpoints 2 and 4
  _truncate_checkpoint(workdir, 4)
  with caplog.at_level(logging.WARNING):
    main.run(_tiny(6), workdir, "train")            # falls back to 2, then trains 3..6
  assert any("unreadable checkpoint 4" in r.getMessage() for r in caplog.records)
  aside = os.listdir(os.path.join(workdir, checkpoint.UNREADABLE_DIR))
  assert len(aside) == 1 and aside[0].startswith("4-")        # moved, not deleted
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int) == ["2", "4", "6"]
  got, at = _state(workdir, _tiny(6))
  want, _ = _state(reference, _tiny(6))
  assert at == 6
  jax.tree.map(np.testing.assert_array_equal, got, want)      # the same run as without the crash


@pytest.mark.slow
def test_no_readable_checkpoint_is_an_error_that_moves_nothing(tmp_path):
  workdir = str(tmp_path)
  main.run(_tiny(4), workdir, "train")
  for step in (2, 4):
    _truncate_checkpoint(workdir, step)
  with pytest.raises(checkpoint.CheckpointError, match="no checkpoint .* can be read"):
    main.run(_tiny(6), workdir, "train")
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  assert not os.path.exists(os.path.join(workdir, checkpoint.UNREADABLE_DIR))


@pytest.mark.slow   # make test runs the skip policy on a NaN batch (tests/train/test_engine.py)
def test_nan_batch_halts_cleanly_under_halt_policy(tmp_path, monkeypatch):
  real, calls = loop.shd.global_batch, []

  def poisoned(local, mesh):      # the third batch (step 2) arrives with NaN images
    calls.append(1)
    if len(calls) == 3:
      local = dict(local, image=np.full_like(local["image"], np.nan))
    return real(local, mesh)

  monkeypatch.setattr(loop.shd, "global_batch", poisoned)
  config = _tiny(6)
  config.nan_policy = "halt"
  with pytest.raises(loop.NonFiniteError, match="step 2: non-finite"):
    main.run(config, str(tmp_path), "train")
  halted, at = _state(str(tmp_path), config)
  before, _ = _state(str(tmp_path), config, step=2)
  assert at == 3 and int(halted.num_nonfinite) == 1
  jax.tree.map(np.testing.assert_array_equal, halted.params, before.params)   # update dropped
