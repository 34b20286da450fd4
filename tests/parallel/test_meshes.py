"""The tiny MAR, causal AR, LlamaGen and DD2 (stage 2, with ψ's iterations inside the step) train
identically on 1 device and on data / fsdp / tensor meshes."""
import jax
import numpy as np
import pytest

from ardiff_jax.parallel import sharding as shd
from ardiff_jax.train.experiment import build_experiment
from ardiff_jax.train.state import frozen_for_training, init_state, jit_train_step
from tests.helpers import load_config

CONFIGS = {"mar": "mar_digits", "ar": "ar_diffusion_digits", "llamagen": "llamagen_digits",
           "dd2": "dd2_digits"}


def _config(kind, mesh_shape):
  c = load_config(CONFIGS[kind], "tiny")
  if "latent_scale" in c.tokenizer:     # continuous tokenizers: no cache statistics needed
    c.tokenizer.latent_scale = 1.0
  c.train.batch_size = 16
  c.optim.warmup_steps, c.optim.lr = 0, 3e-3
  c.mesh.shape = mesh_shape
  return c


def _batches(kind, n=3):
  rng = np.random.default_rng(0)
  if kind == "dd2":          # data-free: the batch only sizes the step
    return [{"label": rng.integers(0, 10, 16).astype(np.int32)} for _ in range(n)]
  if kind == "llamagen":     # 8×8 codes of the tiny VQ tokenizer (64 entries)
    return [{"codes": rng.integers(0, 64, (16, 8, 8)).astype(np.int32),
             "label": rng.integers(0, 10, 16).astype(np.int32)} for _ in range(n)]
  return [{"moments": np.concatenate([rng.normal(size=(16, 8, 8, 4)),
                                      np.full((16, 8, 8, 4), -4.0)], -1).astype(np.float32),
           "label": rng.integers(0, 10, 16).astype(np.int32)} for _ in range(n)]


def _losses(kind, config, devices=None):
  exp = build_experiment(config, devices)
  state = init_state(config.seed, exp.method, exp.tx, exp.shardings)
  step = jit_train_step(exp.method, exp.tx, exp.schedule, config, exp.mesh, exp.shardings)
  # Random teacher and tokenizer weights for DD2 (the same on every mesh).
  frozen = frozen_for_training(exp.method, exp.mesh,
                               lambda: exp.method.init_frozen(jax.random.key(7)))
  losses = []
  for b in _batches(kind):
    state, m = step(state, shd.global_batch(b, exp.mesh), frozen)
    losses.append(float(m["loss"]))
  return np.array(losses), exp, state


@pytest.fixture(scope="module")
def single_device():
  return {kind: _losses(kind, _config(kind, (1, 1, 1)), jax.devices()[:1])[0] for kind in CONFIGS}


@pytest.mark.parametrize("kind,mesh_shape", [
    ("mar", (2, 2, 2)), ("ar", (2, 2, 2)), ("llamagen", (2, 2, 2)), ("dd2", (2, 2, 2)),
    pytest.param("mar", (8, 1, 1), marks=pytest.mark.slow),
    pytest.param("mar", (1, 8, 1), marks=pytest.mark.slow),
    pytest.param("ar", (8, 1, 1), marks=pytest.mark.slow),
    pytest.param("ar", (1, 8, 1), marks=pytest.mark.slow)])
def test_three_steps_match_one_device(single_device, kind, mesh_shape):
  losses, exp, state = _losses(kind, _config(kind, mesh_shape))
  assert exp.mesh.devices.size == 8 and dict(exp.mesh.shape) == dict(zip(exp.mesh.axis_names, mesh_shape))
  np.testing.assert_allclose(losses, single_device[kind], rtol=1e-5)
  assert len(set(single_device[kind].tolist())) == 3     # three different steps really ran
  specs = {str(x.sharding.spec) for x in jax.tree.leaves(state.params)}
  for axis in ("fsdp", "tensor"):
    if exp.mesh.shape[axis] > 1:     # FSDP shards embeddings, tensor parallelism heads and MLPs
      assert any(axis in s for s in specs), (axis, specs)
  opt_specs = {str(x.sharding.spec) for x in jax.tree.leaves(state.opt_state)}
  if exp.mesh.shape["fsdp"] > 1:     # the Adam moments follow the parameters
    assert any("fsdp" in s for s in opt_specs), opt_specs
