"""Condition refinement inside a generator's training step: the queues, checkpointing and
sampling of a trained state, the runtime mode's no-leak rule, the EMA-teacher reference, and what
`probe` mode leaves unchanged. (The operator, the queue and the analysis: test_condref.py.)"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ardiff_jax.evals import condition_error
from ardiff_jax.methods import condref as cr
from ardiff_jax.models.mar import cosine_schedule
from ardiff_jax.parallel import sharding as shd
from ardiff_jax.train import checkpoint
from ardiff_jax.train.experiment import build_experiment
from ardiff_jax.train.state import init_state, jit_train_step
from tests.helpers import load_config, perturb_head_outputs


# ------------------------------------------------------------------- inside a generator
def _small(r, mode):
  r.mode = mode
  r.update(num_points=64, num_reference=64, queue_size=128, push_per_step=64,
           sinkhorn_iterations=10)


def test_runtime_mode_never_feeds_the_samples_own_ground_truth_to_the_head():
  """Same conditions z, different ground-truth tokens: in runtime mode the head's input is
  identical (the reference is the queue as it was before this batch), while the queue pushed
  for later steps does hold this batch. A reference filled before refining would fail this."""
  r = cr.condref_config()
  _small(r, "runtime")
  refinement = cr.ConditionRefinement(r, seq_len=16, cond_dim=8, token_dim=4, num_classes=10)
  rng = np.random.default_rng(4)
  params = refinement.init_params(jax.random.key(0))
  extras = refinement.init_extras(jax.random.key(0))
  q = extras[cr.QUEUE_KEY]
  extras = dict(extras, **{cr.QUEUE_KEY: cr.push(q, jnp.asarray(rng.normal(size=(128, 8)), jnp.float32),
                                                 jnp.asarray(rng.integers(0, 10, 128)),
                                                 jnp.asarray(rng.integers(0, 16, 128)))})
  z = jnp.asarray(rng.normal(size=(8, 16, 8)), jnp.float32)
  labels = jnp.arange(8) % 10
  weights = jnp.asarray(rng.random((8, 16)) < 0.8)
  head = lambda x, t, zz: jnp.zeros((x.shape[0], 8))
  run = lambda tokens: refinement.training_terms(params, z, tokens, labels, labels, weights,
                                                 extras, jax.random.key(1), head)
  a_in, _, a_metrics, a_extras = run(jnp.asarray(rng.normal(size=(8, 16, 4)), jnp.float32))
  b_in, _, _, b_extras = run(jnp.asarray(rng.normal(size=(8, 16, 4)) * 3, jnp.float32))
  assert float(a_metrics["condref/move_rms"]) > 0.01           # refinement acted
  np.testing.assert_array_equal(np.asarray(a_in), np.asarray(b_in))
  assert not np.allclose(a_extras[cr.QUEUE_KEY]["conditions"], b_extras[cr.QUEUE_KEY]["conditions"])


def _runtime_terms(cross_fit=False, queue_ids=None):
  """(refinement, run(z, tokens, ids) -> head input [B·L, D], its extras) over a full queue of
  random entries whose example ids are `queue_ids` [128]."""
  r = cr.condref_config()
  _small(r, "runtime")
  refinement = cr.ConditionRefinement(r, seq_len=16, cond_dim=8, token_dim=4, num_classes=10,
                                      cross_fit=cross_fit)
  rng = np.random.default_rng(5)
  params = refinement.init_params(jax.random.key(0))
  extras = refinement.init_extras(jax.random.key(0))
  queue = cr.push(extras[cr.QUEUE_KEY], jnp.asarray(rng.normal(size=(128, 8)), jnp.float32),
                  jnp.asarray(rng.integers(0, 10, 128)), jnp.asarray(rng.integers(0, 16, 128)),
                  ids=queue_ids)
  labels = jnp.arange(8) % 10
  head = lambda x, t, zz: jnp.zeros((x.shape[0], 8))

  def run(z, tokens, ids=None, queue=queue):
    return refinement.training_terms(params, z, tokens, labels, labels, jnp.ones((8, 16)),
                                     dict(extras, **{cr.QUEUE_KEY: queue}), jax.random.key(1),
                                     head, ids=ids)[0]
  return run, queue, rng


def test_an_example_drawn_again_never_meets_its_own_queue_entries():
  """The batch holds examples 0..7 and 80 of the 128 queue entries came from them (an earlier
  epoch): changing those entries leaves the head's input bitwise unchanged, with fewer than
  `num_reference` other entries left (so some own entries are drawn, with zero mass). Without
  the ids (the first version) the same change moves it."""
  ids = jnp.asarray(np.r_[np.arange(80) % 8, 100 + np.arange(48)], jnp.int32)
  run, queue, rng = _runtime_terms(queue_ids=ids)
  z = jnp.asarray(rng.normal(size=(8, 16, 8)), jnp.float32)
  tokens = jnp.asarray(rng.normal(size=(8, 16, 4)), jnp.float32)
  own = np.asarray(ids < 8)
  moved = dict(queue, conditions=queue["conditions"].at[own].add(3.0))
  batch_ids = jnp.arange(8, dtype=jnp.int32)
  base = np.asarray(run(z, tokens, batch_ids))
  assert np.abs(base - np.asarray(z).reshape(-1, 8)).max() > 0.01         # refinement acted
  np.testing.assert_array_equal(np.asarray(run(z, tokens, batch_ids, moved)), base)
  assert not np.allclose(np.asarray(run(z, tokens, None, moved)), np.asarray(run(z, tokens, None)))


def test_causal_refinement_is_cross_fitted_between_batch_halves():
  """A causal generator's later conditions saw the earlier tokens of their image: changing every
  condition of image 0 but its first leaves that first row's head input bitwise unchanged when the
  OT is cross-fitted, and moves it when the map is fitted on the whole batch."""
  for cross_fit in (True, False):
    run, _, rng = _runtime_terms(cross_fit=cross_fit)
    z = jnp.asarray(rng.normal(size=(8, 16, 8)), jnp.float32)
    tokens = jnp.asarray(rng.normal(size=(8, 16, 4)), jnp.float32)
    later = z.at[0, 1:].add(jnp.asarray(rng.normal(size=(15, 8)), jnp.float32))
    first, changed = np.asarray(run(z, tokens))[0], np.asarray(run(later, tokens))[0]
    assert np.abs(first - np.asarray(z[0, 0])).max() > 0.01                 # refinement acted
    assert np.array_equal(first, changed) == cross_fit


@pytest.mark.parametrize("name,mode", [
    ("mar_digits", "runtime"),
    pytest.param("ar_diffusion_digits", "loss", marks=pytest.mark.slow)])
def test_generators_train_checkpoint_and_sample_with_refinement(name, mode, tmp_path):
  config = load_config(name, "tiny")
  config.tokenizer.latent_scale = 1.0
  _small(config.condref, mode)
  exp = build_experiment(config)
  state = init_state(0, exp.method, exp.tx, exp.shardings)
  step = jit_train_step(exp.method, exp.tx, exp.schedule, config, exp.mesh, exp.shardings)
  rng = np.random.default_rng(0)
  batch = shd.global_batch(
      {"moments": np.concatenate([rng.normal(size=(16, 8, 8, 4)), np.full((16, 8, 8, 4), -4.0)],
                                 -1).astype(np.float32),
       "label": (np.arange(16) % 10).astype(np.int32)}, exp.mesh)
  for _ in range(3):
    state, metrics = step(state, batch)
  assert np.isfinite(float(metrics["loss"])) and float(metrics["condref/queue_full"]) == 1.0
  assert int(state.extras[cr.QUEUE_KEY]["count"]) == 3 * 64
  # The queue is saved and restored with the checkpoint.
  manager = checkpoint.make_manager(str(tmp_path), 1, async_save=False)
  checkpoint.save(manager, 3, state, None, config.to_dict())
  manager.wait_until_finished()
  restored, _ = checkpoint.restore(manager, exp.abstract_state)
  for key in ("conditions", "labels", "positions", "count"):
    np.testing.assert_array_equal(restored.extras[cr.QUEUE_KEY][key], state.extras[cr.QUEUE_KEY][key])
  # Sampling: runtime mode refines against the queue (so the samples change), loss mode does not
  # need it.
  frozen = exp.method.init_frozen(jax.random.key(1))
  labels = {"label": np.arange(4, dtype=np.int32)}
  gen = jax.jit(exp.method.generate)
  with_queue = gen(exp.method.sampling_params(state.params, state.extras), frozen, labels,
                   jax.random.key(0))
  assert with_queue.shape[0] == 4 and with_queue.dtype == jnp.uint8
  if mode == "runtime":
    with pytest.raises(ValueError, match="checkpointed queues"):
      exp.method.generate(state.params, frozen, labels, jax.random.key(0))
    # The same weights against a queue that is not full: no refinement, other samples. (The head
    # is perturbed so that three training steps' worth of weights already depend on z.)
    params = exp.method.sampling_params(perturb_head_outputs(state.params, 0.5), state.extras)
    with_queue = gen(params, frozen, labels, jax.random.key(0))
    idle = dict(params, **{cr.QUEUE_KEY: dict(params[cr.QUEUE_KEY], count=jnp.zeros((), jnp.int32))})
    assert not np.array_equal(np.asarray(gen(idle, frozen, labels, jax.random.key(0))),
                              np.asarray(with_queue))
  # The condition-error analysis on the trained state (all three condition variants).
  moments = jnp.asarray(np.concatenate([rng.normal(size=(4, 8, 8, 4)), np.full((4, 8, 8, 4), -4.0)],
                                       -1), jnp.float32)
  params = exp.method.sampling_params(state.params, state.extras)
  probe = exp.method.condition_probe
  cond = jax.jit(probe.conditions)(params, moments, jnp.arange(4), jax.random.key(3))
  steps = np.asarray(cond["step"])
  assert steps.min() >= 0 and steps.max() < probe.num_steps
  if name == "mar_digits":   # every position generated at exactly one step, as the sampler does
    schedule = np.asarray(mar_schedule(exp.method.model.seq_len, config.mar.num_ar_steps))
    for row in steps:
      np.testing.assert_array_equal(np.bincount(row, minlength=probe.num_steps), schedule)
  result = condition_error.analyze(probe, params, params[cr.QUEUE_KEY], moments, jnp.arange(4),
                                   jax.random.key(4), [999, 500, 0], 500)
  assert set(result["variants"]) == {"raw", "refined", "ideal"}
  assert result["served"] == ("refined" if mode == "runtime" else "raw")
  assert len(result["variants"]["raw"]["condition_snr_vs_e_phi_db"]) == 3
  assert "condition_snr_vs_e_phi_db" not in result["variants"]["refined"]   # circular: not made
  assert all(np.isfinite(v) for v in result["variants"]["refined"]["denoise_snr_db"])
  condition_error.plot(result, str(tmp_path / "cond.png"))
  assert (tmp_path / "cond.png").stat().st_size > 1000


def mar_schedule(seq_len, num_steps):
  """Positions generated per AR step, in step order."""
  s = cosine_schedule(seq_len, num_steps)
  return [e - b for b, e in zip(s.starts, s.ends)]


@pytest.mark.slow
def test_ema_teacher_reference_with_gradient_accumulation():
  """The EMA model's conditions fill the queue (no E_φ is created); with 2 micro-batches the queue
  advances once per step, from the last micro-batch."""
  config = load_config("mar_digits", "tiny")
  config.tokenizer.latent_scale = 1.0
  _small(config.condref, "loss")
  config.condref.reference = "ema_teacher"
  config.train.grad_accum_steps = 2
  exp = build_experiment(config)
  assert exp.method.loss_reads_ema and cr.INVERSE_KEY not in exp.abstract_state.params
  state = init_state(0, exp.method, exp.tx, exp.shardings)
  step = jit_train_step(exp.method, exp.tx, exp.schedule, config, exp.mesh, exp.shardings)
  rng = np.random.default_rng(5)
  batch = shd.global_batch(
      {"moments": rng.normal(size=(16, 8, 8, 8)).astype(np.float32),
       "label": (np.arange(16) % 10).astype(np.int32)}, exp.mesh)
  state, metrics = step(state, batch)
  assert np.isfinite(float(metrics["loss"]))
  queue = state.extras[cr.QUEUE_KEY]
  assert int(queue["count"]) == 64
  assert float(jnp.abs(queue["conditions"][:64]).sum()) > 0
  # Two more steps: the 128-entry queue is full, so the third step refines against teacher entries.
  state, _ = step(state, batch)
  state, metrics = step(state, batch)
  assert float(metrics["condref/queue_full"]) == 1.0 and float(metrics["condref/move_rms"]) > 0


def test_probe_mode_makes_the_generators_update_of_off_mode():
  """`probe` trains E_φ and fills the queue beside an unchanged generator: with the clip active
  (norm 0.05), E_φ's gradient is clipped by its own norm, so the generator's four updates are
  those of `off`. (The first version clipped both by one joint norm: Adam undoes a constant
  scale, but E_φ's share of the norm changes between steps, and the updates differed by 0.5%
  here.)"""
  def updates(mode):
    config = load_config("mar_digits", "tiny")
    config.tokenizer.latent_scale = 1.0
    _small(config.condref, mode)
    config.optim.grad_clip_norm, config.optim.warmup_steps = 0.05, 0
    config.condref.inverse_weight = 100.0
    exp = build_experiment(config)
    state = init_state(0, exp.method, exp.tx, exp.shardings)
    start = cr.generator_params(jax.device_get(state.params))
    step = jit_train_step(exp.method, exp.tx, exp.schedule, config, exp.mesh, exp.shardings)
    rng = np.random.default_rng(0)
    batch = shd.global_batch(
        {"moments": rng.normal(size=(16, 8, 8, 8)).astype(np.float32),
         "label": (np.arange(16) % 10).astype(np.int32)}, exp.mesh)
    for _ in range(4):
      state, metrics = step(state, batch)
    end = cr.generator_params(jax.device_get(state.params))
    return jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), end, start), metrics

  off, _ = updates("off")
  probe, metrics = updates("probe")
  assert float(metrics["grad_norm"]) > 0.05                       # the clip acted
  assert max(float(np.abs(d).max()) for d in jax.tree.leaves(off)) > 1e-3
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-8), off, probe)
