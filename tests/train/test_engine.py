"""The training engine on the tiny digits tokenizer: sharding equivalence, resume, NaN policy."""
import jax
import numpy as np
import pytest

from ardiff_jax.parallel import sharding as shd
from ardiff_jax.train import checkpoint
from ardiff_jax.train.experiment import build_experiment
from ardiff_jax.train.loop import train_and_evaluate, train_data_iter
from ardiff_jax.train.metrics import read_metrics
from ardiff_jax.train.state import init_state, jit_train_step
from tests.helpers import load_config


def tiny_config(mesh_shape=(-1, 1, 1)):
  c = load_config("kl_digits", "tiny")
  c.mesh.shape = mesh_shape
  return c


def first_batches(config, n):
  it = train_data_iter(config)
  return [next(it) for _ in range(n)]


def run_steps(config, batches, devices=None):
  exp = build_experiment(config, devices)
  state = init_state(config.seed, exp.method, exp.tx, exp.shardings)
  step = jit_train_step(exp.method, exp.tx, exp.schedule, config, exp.mesh, exp.shardings)
  losses = []
  for b in batches:
    state, m = step(state, shd.global_batch({k: b[k] for k in exp.method.batch_keys}, exp.mesh))
    losses.append(float(m["loss"]))
  return np.array(losses), state, exp


@pytest.mark.slow   # make test runs the mesh equality on the tiny MAR and AR (tests/parallel)
@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2)])
def test_sharded_steps_match_single_device(mesh_shape):
  config = tiny_config()
  batches = first_batches(config, 3)
  single, _, _ = run_steps(tiny_config((1, 1, 1)), batches, devices=jax.devices()[:1])
  sharded, state, exp = run_steps(tiny_config(mesh_shape), batches)
  assert exp.mesh.devices.size == 8
  np.testing.assert_allclose(sharded, single, rtol=1e-5)
  assert single[-1] != single[0]  # the steps really trained


def test_params_are_sharded_on_fsdp_mesh():
  config = tiny_config((1, 8, 1))
  exp = build_experiment(config)
  specs = [s.spec for s in jax.tree.leaves(exp.shardings.params)]
  assert any("fsdp" in str(spec) for spec in specs), specs


@pytest.mark.slow   # make test checks exact resume in tests/train/test_resume.py, test_faults.py
def test_save_restore_next_step_identical(tmp_path):
  config = tiny_config()
  batches = first_batches(config, 3)
  exp = build_experiment(config)
  step = jit_train_step(exp.method, exp.tx, exp.schedule, config, exp.mesh, exp.shardings)
  gb = lambda b: shd.global_batch({k: b[k] for k in exp.method.batch_keys}, exp.mesh)
  state = init_state(config.seed, exp.method, exp.tx, exp.shardings)
  state, _ = step(state, gb(batches[0]))
  state, _ = step(state, gb(batches[1]))
  manager = checkpoint.make_manager(str(tmp_path), keep=2)
  checkpoint.save(manager, 2, state, None, {"note": "test"})
  manager.wait_until_finished()
  _, m_direct = step(state, gb(batches[2]))
  restored, at = checkpoint.restore(checkpoint.make_manager(str(tmp_path)), exp.abstract_state)
  assert at == 2
  _, m_restored = step(restored, gb(batches[2]))
  assert float(m_restored["loss"]) == float(m_direct["loss"])


def test_nonfinite_batch_is_skipped_and_counted():
  config = tiny_config()
  batch = first_batches(config, 1)[0]
  exp = build_experiment(config)
  step = jit_train_step(exp.method, exp.tx, exp.schedule, config, exp.mesh, exp.shardings)
  state = init_state(config.seed, exp.method, exp.tx, exp.shardings)
  before = jax.device_get(state.params)
  bad = dict(batch, image=np.full_like(batch["image"], np.nan))
  state, m = step(state, shd.global_batch({"image": bad["image"]}, exp.mesh))
  assert int(m["nonfinite"]) == 1 and int(state.num_nonfinite) == 1
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before)
  state, m = step(state, shd.global_batch({"image": batch["image"]}, exp.mesh))
  assert int(m["nonfinite"]) == 0 and int(state.num_nonfinite) == 1


@pytest.mark.slow   # make test restores across process layouts in tests/parallel/test_multiprocess.py
def test_checkpoint_restores_onto_a_different_mesh(tmp_path):
  config = tiny_config((8, 1, 1))
  exp = build_experiment(config)
  state = init_state(config.seed, exp.method, exp.tx, exp.shardings)
  manager = checkpoint.make_manager(str(tmp_path), keep=1)
  checkpoint.save(manager, 0, state, None, {})
  manager.wait_until_finished()
  other = build_experiment(tiny_config((1, 8, 1)))
  restored, _ = checkpoint.restore(checkpoint.make_manager(str(tmp_path)), other.abstract_state)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params),
               jax.device_get(state.params))
  specs = {str(x.sharding.spec) for x in jax.tree.leaves(restored.params)}
  assert any("fsdp" in s for s in specs), specs


@pytest.mark.parametrize("use_ema", [True, False])
def test_periodic_evaluation_is_a_callback_on_the_sampling_weights(tmp_path, use_ema):
  """The loop calls `evaluate(params, step)` every eval.every_steps steps with the weights sampling
  reads (EMA or raw, per sample.use_ema), and logs its scalars under eval/ in metrics.jsonl."""
  config = tiny_config()
  config.eval.every_steps, config.sample.use_ema = 2, use_ema
  calls = []

  def evaluate(params, step):
    calls.append((step, jax.device_get(params)))
    return {"score": float(step) / 10, "step": step, "note": "text is not logged"}

  state = train_and_evaluate(config, str(tmp_path), evaluate)
  assert [step for step, _ in calls] == [2, 4]
  want = jax.device_get(state.ema_params if use_ema else state.params)   # step 4's weights
  jax.tree.map(np.testing.assert_array_equal, calls[-1][1], want)
  rows = {r["step"]: r for r in read_metrics(str(tmp_path))}
  assert rows[2]["eval/score"] == 0.2 and rows[4]["eval/score"] == 0.4
  assert "eval/note" not in rows[4] and "eval/step" not in rows[4]
