"""The train step on a toy least-squares method, checked against float64 NumPy."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ardiff_jax import configlib
from ardiff_jax.methods import Method
from ardiff_jax.parallel import mesh as mesh_lib
from ardiff_jax.parallel import sharding as shd
from ardiff_jax import optim
from ardiff_jax.train.state import init_state, jit_train_step, state_shardings

D = 8


def toy_method():
  """loss = mean_b ‖x_b W + c − y_b‖² (deterministic, so accumulation can be exact)."""
  def init_params(rng):
    w = jax.random.normal(rng, (D, 1)) * 0.1
    return {"w": nn.LogicallyPartitioned(w, ("embed", None)), "c": jnp.zeros((1,))}

  def loss_fn(params, batch, rng, step, extras):
    pred = batch["x"] @ params["w"] + params["c"]
    loss = jnp.mean(jnp.sum((pred - batch["y"]) ** 2, -1))
    return loss, {"mse": loss}, extras

  return Method("toy", None, init_params, loss_fn, batch_keys=("x", "y"))


def toy_config(accum=1, lr=0.1, ema=0.9, clip=0.0, wd=0.0):
  c = configlib.base_config()
  c.train.batch_size, c.train.grad_accum_steps, c.train.ema_decay = 16, accum, ema
  c.optim.lr, c.optim.grad_clip_norm, c.optim.weight_decay = lr, clip, wd
  return c


def run(config, batches, mesh_shape=(-1, 1, 1), devices=None):
  method = toy_method()
  mesh = mesh_lib.make_mesh(mesh_shape, ("data", "fsdp", "tensor"), devices)
  tx, sched = optim.make_optimizer(config.optim, 100)
  _, shardings = state_shardings(method, tx, mesh, configlib.DEFAULT_RULES)
  state = init_state(0, method, tx, shardings)
  w0 = jax.device_get(state.params)
  step = jit_train_step(method, tx, sched, config, mesh, shardings)
  ms = []
  for b in batches:
    state, m = step(state, shd.global_batch(b, mesh))
    ms.append(jax.device_get(m))
  return w0, jax.device_get(state), ms


def data(n=2, seed=0):
  r = np.random.default_rng(seed)
  return [{"x": r.normal(size=(16, D)).astype(np.float32),
           "y": r.normal(size=(16, 1)).astype(np.float32)} for _ in range(n)]


def test_accumulated_step_equals_full_batch():
  batches = data(2)
  _, full, mf = run(toy_config(accum=1), batches)
  _, acc, ma = run(toy_config(accum=4), batches)
  np.testing.assert_allclose(acc.params["w"], full.params["w"], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose([m["loss"] for m in ma], [m["loss"] for m in mf], rtol=1e-5)


def test_adamw_ema_and_clipping_against_numpy():
  """One step of clipped AdamW and the EMA, recomputed in float64 NumPy."""
  b = data(1)[0]
  lr, ema, clip, wd, b1, b2, eps = 0.1, 0.9, 0.05, 0.3, 0.9, 0.95, 1e-8
  w0, state, ms = run(toy_config(lr=lr, ema=ema, clip=clip, wd=wd), [b])
  x, y = b["x"].astype(np.float64), b["y"].astype(np.float64)
  w, c = w0["w"].astype(np.float64), w0["c"].astype(np.float64)
  r = x @ w + c - y
  gw, gc = 2 * x.T @ r / len(x), 2 * r.mean(0)
  norm = np.sqrt((gw ** 2).sum() + (gc ** 2).sum())
  np.testing.assert_allclose(ms[0]["grad_norm"], norm, rtol=1e-5)
  scale = min(1.0, clip / norm)
  new = {}
  for name, p, g, decay in (("w", w, gw * scale, True), ("c", c, gc * scale, False)):
    m, v = (1 - b1) * g, (1 - b2) * g * g
    upd = (m / (1 - b1)) / (np.sqrt(v / (1 - b2)) + eps)
    new[name] = p - lr * (upd + (wd * p if decay else 0.0))
    np.testing.assert_allclose(state.params[name], new[name], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(state.ema_params[name], ema * p + (1 - ema) * new[name],
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2)])
def test_toy_losses_match_across_meshes(mesh_shape):
  batches = data(3)
  _, ref, m_ref = run(toy_config(), batches, (1, 1, 1), devices=jax.devices()[:1])
  _, got, m_got = run(toy_config(), batches, mesh_shape)
  np.testing.assert_allclose([m["loss"] for m in m_got], [m["loss"] for m in m_ref], rtol=1e-5)


def test_warmup_then_cosine_schedule():
  c = configlib.base_config().optim
  c.lr, c.warmup_steps, c.schedule, c.min_lr = 1.0, 10, "cosine", 0.1
  s = optim.make_schedule(c, 110)
  np.testing.assert_allclose(float(s(0)), 0.1, rtol=1e-6)
  np.testing.assert_allclose(float(s(9)), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(s(10)), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(s(60)), 0.1 + 0.9 * 0.5, rtol=1e-5)
  np.testing.assert_allclose(float(s(110)), 0.1, rtol=1e-5)


def test_frozen_weights_reach_the_loss_unchanged_and_untrained():
  """A method whose loss reads frozen weights: loss = mean_b ‖x_b W − x_b W_f‖² with W_f frozen.
  SGD (plain, lr η) on it: W ← W − η·2/B·Xᵀ X (W − W_f), checked in float64; W_f never moves."""
  target = np.random.default_rng(3).normal(size=(D, 1)).astype(np.float32)

  def loss_fn(params, batch, rng, step, extras, frozen):
    diff = batch["x"] @ params["w"] - batch["x"] @ frozen["w"]
    return jnp.mean(jnp.sum(diff ** 2, -1)), {}, extras

  method = Method("frozen_toy", None, lambda rng: {"w": jnp.zeros((D, 1))}, loss_fn,
                  batch_keys=("x",), loss_reads_frozen=True,
                  init_frozen=lambda rng: {"w": jnp.zeros((D, 1))})
  config = toy_config(lr=0.05, ema=0.0)
  config.optim.b1 = 0.0                                  # Adam with β1 0 still rescales: use SGD
  mesh = mesh_lib.make_mesh((-1, 1, 1), ("data", "fsdp", "tensor"))
  import optax  # pylint: disable=g-import-not-at-top
  tx, sched = optax.sgd(0.05), optax.constant_schedule(0.05)
  _, shardings = state_shardings(method, tx, mesh, configlib.DEFAULT_RULES)
  state = init_state(0, method, tx, shardings)
  step = jit_train_step(method, tx, sched, config, mesh, shardings)
  from ardiff_jax.train.state import frozen_for_training  # pylint: disable=g-import-not-at-top
  frozen = frozen_for_training(method, mesh, lambda: {"w": target})
  x = data(1)[0]["x"]
  state, _ = step(state, shd.global_batch({"x": x}, mesh), frozen)
  xd = x.astype(np.float64)
  want = -0.05 * 2 / 16 * xd.T @ xd @ (np.zeros((D, 1)) - target)
  np.testing.assert_allclose(jax.device_get(state.params["w"]), want, rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(jax.device_get(frozen["w"]), target)
  with pytest.raises(ValueError, match="frozen weights"):
    step(state, shd.global_batch({"x": x}, mesh))       # forgot to pass them
  assert frozen_for_training(toy_method(), mesh, None) is None


def test_warmup_from_a_start_rate():
  """DD2's warmup from 1e-6: start + (lr − start)·(step + 1)/warmup, then lr."""
  c = configlib.base_config().optim
  c.lr, c.warmup_steps, c.warmup_start = 1.0, 10, 1e-6
  s = optim.make_schedule(c, 100)
  for step in (0, 4, 9, 50):
    want = 1e-6 + (1.0 - 1e-6) * min(step + 1, 10) / 10
    np.testing.assert_allclose(float(s(step)), want, rtol=1e-6)


def test_progressive_ema_follows_dd2s_rate():
  """train.ema_progressive: the EMA after step i (0-based) mixes with decay
  min(ema_decay, (i + 1)/(i + 10)), recomputed from the raw weights after each step."""
  config = toy_config(ema=0.9999)
  config.train.ema_progressive = True
  batches = data(3)
  w0, _, _ = run(config, batches[:1])
  raw = [run(config, batches[:k])[1].params["w"].astype(np.float64) for k in (1, 2, 3)]
  ema = w0["w"].astype(np.float64)
  for i, p in enumerate(raw):
    decay = min(0.9999, (i + 1) / (i + 10))
    ema = decay * ema + (1 - decay) * p
  np.testing.assert_allclose(run(config, batches)[1].ema_params["w"], ema, rtol=1e-5, atol=1e-7)
