"""Two JAX processes × 4 CPU devices (launch/local_multiprocess.sh) train exactly as one process
does on the same global batches, and checkpoints move between 2 processes and 1 in both ways."""
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from ardiff_jax import main
from ardiff_jax.data import pipeline
from ardiff_jax.parallel import sharding as shd
from ardiff_jax.train import checkpoint
from ardiff_jax.train.experiment import build_experiment
from ardiff_jax.train.metrics import read_metrics
from ardiff_jax.train.state import init_state, jit_train_step
from tests.helpers import REPO, load_config

pytestmark = pytest.mark.multiprocess
LAUNCH = os.path.join(REPO, "launch", "local_multiprocess.sh")


def _launch(workdir, steps):
  env = dict(os.environ, PROCESSES="2", DEVICES_PER_PROCESS="4", PYTHON=sys.executable,
             XLA_FLAGS="--xla_backend_optimization_level=0")
  proc = subprocess.Popen(
      [LAUNCH, "--config", "configs/kl_digits.py:tiny", "--workdir", workdir, "--mode", "train",
       f"--config.train.num_steps={steps}", "--config.train.log_every=1",
       f"--config.train.ckpt_every={steps}"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      start_new_session=True)
  try:
    log, _ = proc.communicate(timeout=400)
  finally:
    if proc.poll() is None:              # timed out: stop the script and both JAX processes
      os.killpg(proc.pid, signal.SIGKILL)
  assert proc.returncode == 0, log[-8000:]
  return log


def _config(steps):
  c = load_config("kl_digits", "tiny")
  c.train.num_steps, c.train.log_every, c.train.ckpt_every = steps, 1, steps
  return c


def _two_process_batches(config, n):
  """The global batches two processes assemble: each reads its own shard of the stream."""
  streams = [iter(pipeline.make_dataset(config.data, split=config.data.train_split,
                                        seed=config.seed, batch_size=config.train.batch_size // 2,
                                        train=True, process_index=p, process_count=2))
             for p in range(2)]
  batches = []
  for _ in range(n):
    parts = [next(s) for s in streams]
    batches.append({"image": np.concatenate([p["image"] for p in parts])})
  return batches


def test_two_processes_match_one_and_checkpoints_cross_process_counts(tmp_path):
  workdir = str(tmp_path / "run")
  log = _launch(workdir, 3)
  assert "process 1 of 2, 4 local / 8 global devices" in log
  losses_2p = [r["loss"] for r in read_metrics(workdir)]

  # One process, 8 devices, the same global batches.
  config = _config(3)
  exp = build_experiment(config)
  state = init_state(config.seed, exp.method, exp.tx, exp.shardings)
  step = jit_train_step(exp.method, exp.tx, exp.schedule, config, exp.mesh, exp.shardings)
  losses_1p = []
  for batch in _two_process_batches(config, 3):
    state, metrics = step(state, shd.global_batch(batch, exp.mesh))
    losses_1p.append(float(metrics["loss"]))
  np.testing.assert_allclose(losses_2p, losses_1p, rtol=1e-5)
  assert len(set(losses_1p)) == 3

  # The 2-process checkpoint restores in 1 process, and 1 process trains on from it ...
  data_files = sorted(os.listdir(os.path.join(workdir, "checkpoints", "3", "data_iter")))
  assert data_files == ["commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
  restored, at = checkpoint.restore(checkpoint.make_manager(workdir), exp.abstract_state)
  assert at == 3 and int(restored.step) == 3
  # Parameters with gradients at float-noise level may take Adam steps of opposite signs under a
  # different reduction order (|update| ≤ lr per step), so compare to within 3 such steps, and
  # compare what the weights compute exactly: the loss at a fixed batch and rng.
  bound = 3 * config.optim.lr * 1.01
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=bound),
               jax.device_get(restored.params), jax.device_get(state.params))
  probe_batch = shd.global_batch(_two_process_batches(config, 1)[0], exp.mesh)
  probe = jax.jit(lambda p: exp.method.loss_fn(p, probe_batch, jax.random.key(5), 3, {})[0])
  np.testing.assert_allclose(float(probe(restored.params)), float(probe(state.params)), rtol=1e-5)
  main.run(_config(4), workdir, "train")
  assert read_metrics(workdir)[-1]["step"] == 4

  # ... and its 1-process checkpoint restores in 2 processes, which train on.
  log = _launch(workdir, 5)
  assert "resuming at step 4" in log
  assert read_metrics(workdir)[-1]["step"] == 5
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "5"))
