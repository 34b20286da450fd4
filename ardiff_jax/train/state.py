"""Train state, its abstract-then-sharded construction, and the pure train step.

The state is created abstractly (`jax.eval_shape`), shardings are derived from the parameters'
logical axis names, and `jax.jit(init, out_shardings=...)` materialises it already sharded, so no
full copy of a large model ever sits on one device.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ardiff_jax.methods import Method
from ardiff_jax.parallel import sharding as shd


@struct.dataclass
class TrainState:
  step: jax.Array          # int32 [], number of updates applied (skipped steps included)
  params: Any
  ema_params: Any
  opt_state: Any
  extras: dict             # method-owned state, e.g. an OT reference queue
  num_nonfinite: jax.Array  # int32 [], steps whose update was dropped for a non-finite loss/grad


def create_state(rng: jax.Array, method: Method, tx: optax.GradientTransformation,
                 params=None, given_extras=None) -> TrainState:
  """An unboxed state at step 0 (from `params` when given: a warm start; `given_extras`: a dict
  whose keys replace those of the method's initial state). Used under eval_shape and under jit
  with out_shardings."""
  if params is None:
    params = nn.meta.unbox(method.init_params(jax.random.fold_in(rng, 0)))
  extras = method.init_extras(jax.random.fold_in(rng, 1))
  if method.extras_from_params is not None:
    extras = {**extras, **jax.tree.map(jnp.copy, method.extras_from_params(params))}
  extras = {**extras, **(given_extras or {})}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params),
                    extras=extras,
                    num_nonfinite=jnp.zeros((), jnp.int32))


def state_shardings(method: Method, tx: optax.GradientTransformation, mesh: Mesh,
                    rules) -> tuple[TrainState, TrainState]:
  """(abstract state, shardings) without allocating anything."""
  rng = jax.random.key(0)
  boxed = jax.eval_shape(method.init_params, rng)
  p_shard = shd.param_shardings(boxed, mesh, rules)
  abstract = jax.eval_shape(functools.partial(create_state, method=method, tx=tx), rng)
  replicated = NamedSharding(mesh, P())
  shardings = TrainState(
      step=replicated, params=p_shard, ema_params=p_shard,
      opt_state=shd.follow_param_shardings(abstract.opt_state, abstract.params, p_shard, mesh),
      # Extras that mirror parameters (an EMA teacher) follow their shardings; the rest (queues,
      # counters) are replicated.
      extras=shd.follow_param_shardings(abstract.extras, abstract.params, p_shard, mesh),
      num_nonfinite=replicated)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return abstract, shardings


def init_state(seed: int, method: Method, tx: optax.GradientTransformation,
               shardings: TrainState, params=None, extras=None) -> TrainState:
  """The sharded step-0 state; `params` (host arrays of the parameters' structure) replace the
  fresh initialisation, and the EMA and method extras start from them; `extras` (host arrays, a
  dict of some of the method state's keys) replace those keys."""
  rng = jax.random.key(seed)
  if params is None:
    return jax.jit(functools.partial(create_state, method=method, tx=tx),
                   out_shardings=shardings)(rng)
  params = jax.device_put(params, shardings.params)
  extras = {k: jax.device_put(v, shardings.extras[k]) for k, v in (extras or {}).items()}
  return jax.jit(lambda r, p, e: create_state(r, method, tx, p, e),
                 out_shardings=shardings)(rng, params, extras)


def _split_micro(batch: dict, num_micro: int) -> dict:
  return jax.tree.map(lambda x: x.reshape((num_micro, x.shape[0] // num_micro) + x.shape[1:]), batch)


def train_step(state: TrainState, batch: dict, frozen=None, *, method: Method,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               cfg: ml_collections.ConfigDict) -> tuple[TrainState, dict]:
  """One optimizer update. Pure: state in, state out; metrics are scalars. `frozen`: weights the
  loss reads but never trains (`Method.loss_reads_frozen`, e.g. a pretrained text encoder).

  RNG is fold_in(seed, step), so a resumed run draws exactly the numbers an uninterrupted one
  would. With `train.grad_accum_steps` = A > 1 the batch is split into A micro-batches whose
  gradients are averaged in a `lax.scan` (micro-batch i uses fold_in(rng, i)).
  A non-finite loss or gradient norm leaves params, EMA, optimizer and extras untouched and
  increments `num_nonfinite` (DESIGN.md, nan_policy).
  """
  rng = jax.random.fold_in(jax.random.key(cfg.seed), state.step)
  ema_in = state.ema_params if method.loss_reads_ema else None
  grad_fn = jax.value_and_grad(
      lambda p, b, r: _loss_with_aux(method, p, b, r, state.step, state.extras, ema_in, frozen),
      has_aux=True)
  num_micro = int(cfg.train.grad_accum_steps)
  if num_micro <= 1:
    (loss, (metrics, extras)), grads = grad_fn(state.params, batch, rng)
  else:
    micro = _split_micro(batch, num_micro)

    # Every micro-batch reads the step's extras; the new extras are the last micro-batch's (a
    # method's state, e.g. a reference queue, advances once per step).
    def body(carry, xs):
      i, mb = xs
      (l, (m, e)), g = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
      acc_l, acc_m, acc_g, _ = carry
      return (acc_l + l, jax.tree.map(jnp.add, acc_m, m), jax.tree.map(jnp.add, acc_g, g), e), None

    zeros_g = jax.tree.map(jnp.zeros_like, state.params)
    _, (m0, _) = jax.eval_shape(
        lambda: _loss_with_aux(method, state.params, jax.tree.map(lambda x: x[0], micro), rng,
                               state.step, state.extras, ema_in, frozen))
    zeros_m = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m0)
    (loss, metrics, grads, extras), _ = jax.lax.scan(
        body, (jnp.zeros((), jnp.float32), zeros_m, zeros_g, state.extras),
        (jnp.arange(num_micro), micro))
    loss, metrics, grads = jax.tree.map(lambda x: x / num_micro, (loss, metrics, grads))
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = cfg.train.ema_decay
  if cfg.train.get("ema_progressive", False):
    decay = jnp.minimum(decay, (state.step + 1.0) / (state.step + 10.0))
  ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  new_state = TrainState(
      step=state.step + 1, params=keep(params, state.params), ema_params=keep(ema, state.ema_params),
      opt_state=keep(opt_state, state.opt_state), extras=keep(extras, state.extras),
      num_nonfinite=state.num_nonfinite + (~finite).astype(jnp.int32))
  metrics = dict(metrics, loss=loss, grad_norm=grad_norm, lr=schedule(state.step),
                 nonfinite=(~finite).astype(jnp.int32), num_nonfinite=new_state.num_nonfinite)
  return new_state, metrics


def _loss_with_aux(method, params, batch, rng, step, extras, ema_params=None, frozen=None):
  kwargs = {}
  if method.loss_reads_ema:
    kwargs["ema_params"] = ema_params
  if method.loss_reads_frozen:
    if frozen is None:
      raise ValueError(f"method {method.name!r} reads frozen weights in its loss: pass them to the "
                       "train step (`frozen_for_training`)")
    kwargs["frozen"] = jax.lax.stop_gradient(frozen)
  loss, metrics, new_extras = method.loss_fn(params, batch, rng, step, extras, **kwargs)
  return loss, (metrics, new_extras)


def jit_train_step(method: Method, tx, schedule, cfg, mesh: Mesh, shardings: TrainState):
  """The jitted step `(state, batch, frozen=None) -> (state, metrics)` with explicit in/out
  shardings and the state donated; `frozen` (for a method that reads frozen weights in its loss,
  `frozen_for_training`) is replicated on every device."""
  replicated = NamedSharding(mesh, P())
  data = shd.batch_sharding(mesh)
  rules = tuple(tuple(r) for r in cfg.mesh.rules)

  def step_fn(state, batch, frozen=None):
    # The mesh and the rules are visible while tracing, so the models' logical activation
    # constraints (`nn.with_logical_constraint`) become real sharding constraints.
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
      return train_step(state, batch, frozen, method=method, tx=tx, schedule=schedule, cfg=cfg)

  return _FrozenDefault(jax.jit(step_fn, in_shardings=(shardings, data, replicated),
                                out_shardings=(shardings, replicated), donate_argnums=(0,)))


class _FrozenDefault:
  """A jitted `(state, batch, frozen)` step callable (and lowerable) as `(state, batch)`: jit
  binds no default arguments, and most methods read no frozen weights."""

  def __init__(self, jitted):
    self.jitted = jitted

  def __call__(self, state, batch, frozen=None):
    return self.jitted(state, batch, frozen)

  def lower(self, state, batch, frozen=None):
    return self.jitted.lower(state, batch, frozen)


def frozen_for_training(method: Method, mesh: Mesh, load: Callable[[], Any] | None = None):
  """What the train step's `frozen` argument gets: None for a method whose loss reads no frozen
  weights; otherwise `load()` (e.g. `checkpoint.load_frozen(method)`, or the method's
  `init_frozen` for a benchmark) placed on every device of the mesh."""
  if not method.loss_reads_frozen:
    return None
  if load is None:
    raise ValueError(f"method {method.name!r} reads frozen weights in its loss: give a loader")
  return jax.device_put(load(), NamedSharding(mesh, P()))
