"""Condition refinement inside a generator's training step: what `probe` mode leaves unchanged.

In its own file so that the two test workers share the condition-refinement tests' time.
"""
import jax
import numpy as np

from ardiff_jax.methods import condref as cr
from ardiff_jax.parallel import sharding as shd
from ardiff_jax.train.experiment import build_experiment
from ardiff_jax.train.state import init_state, jit_train_step
from tests.helpers import load_config
from tests.methods.test_condref import _small


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
