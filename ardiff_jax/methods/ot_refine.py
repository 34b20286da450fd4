"""The pieces of condition refinement that know nothing of generators: entropic-OT JKO steps
(ott-jax) between point sets with appended features, and a FIFO queue of reference points.

Used by `methods/condref.py`; see its docstring for the method.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from ott.geometry import pointcloud
from ott.solvers import linear


# ------------------------------------------------------------------------------ the operator
def feature_scales(x: jax.Array, y: jax.Array, class_cost: float,
                   position_cost: float) -> tuple[jax.Array, jax.Array]:
  """Scales (s_class, s_position) such that a one-hot mismatch (cost 2s²) adds `cost` × the mean
  squared distance between x [n, D] and y [m, D] (computed in closed form, no n×m matrix)."""
  mean_sq = (jnp.mean(jnp.sum(x * x, -1)) + jnp.mean(jnp.sum(y * y, -1))
             - 2.0 * jnp.dot(x.mean(0), y.mean(0)))
  mean_sq = jax.lax.stop_gradient(jnp.maximum(mean_sq, 1e-12))
  return jnp.sqrt(class_cost * mean_sq / 2.0), jnp.sqrt(position_cost * mean_sq / 2.0)


def condition_features(labels: jax.Array, positions: jax.Array, num_classes: int, seq_len: int,
                       class_scale: jax.Array, position_scale: jax.Array) -> jax.Array:
  """[n, num_classes + seq_len]: scaled one-hot class (zero for the null class) and position."""
  cls = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)    # label == num_classes -> zeros
  pos = jax.nn.one_hot(positions, seq_len, dtype=jnp.float32)
  return jnp.concatenate([class_scale * cls, position_scale * pos], axis=-1)


def entropic_map(x: jax.Array, y: jax.Array, *, epsilon: float, iterations: int,
                 tau_b: float = 1.0) -> tuple[Callable[[jax.Array], jax.Array], dict]:
  """Fits entropic OT from x [n, d] to y [m, d] (uniform weights, squared Euclidean cost) and
  returns (T, diagnostics), T: [k, d] -> [k, d] the entropic map (x − ½∇f), usable out of sample.

  The solve runs in float32 with a fixed number of Sinkhorn iterations (a multiple of 10: ott-jax
  runs them in blocks of 10) under stop-gradient.
  """
  if iterations <= 0 or iterations % 10:
    raise ValueError(f"iterations={iterations}: use a positive multiple of 10")
  x, y = (jax.lax.stop_gradient(a.astype(jnp.float32)) for a in (x, y))
  geom = pointcloud.PointCloud(x, y, epsilon=epsilon, relative_epsilon="std")
  out = linear.solve(geom, tau_b=tau_b, min_iterations=iterations, max_iterations=iterations)
  potentials = out.to_dual_potentials()
  transport = lambda v: jax.lax.stop_gradient(potentials.transport(v.astype(jnp.float32)))
  info = {"converged": out.converged.astype(jnp.float32), "reg_ot_cost": out.reg_ot_cost}
  return transport, info


def jko_update(z: jax.Array, mapped: jax.Array, tau: float, lam: float = 0.0,
               y_hat: jax.Array | None = None) -> jax.Array:
  """z ← (z + τ·T(z) + τλ·ŷ) / (1 + τ + τλ); with λ = 0 (or no ŷ), z + τ/(1+τ)·(T(z) − z)."""
  if y_hat is None or not lam:
    return (z + tau * mapped) / (1.0 + tau)
  return (z + tau * mapped + tau * lam * y_hat) / (1.0 + tau + tau * lam)


@dataclasses.dataclass(frozen=True)
class Refiner:
  """R(z): K JKO steps toward a reference point set, the static settings bound.

  `__call__(z [n, D], feats [n, F], fit_index [N], ref [N', D], ref_feats [N', F], y_hat [n, D] |
  None) -> (refined z [n, D] float32, diagnostics of the last step)`. The OT is fitted on the
  rows `fit_index` of z (re-fitted at each step on the moved points) and applied to every row.
  """
  num_steps: int
  tau: float
  lam: float
  epsilon: float
  iterations: int
  tau_b: float

  def __call__(self, z, feats, fit_index, ref, ref_feats, y_hat=None):
    z = jax.lax.stop_gradient(z.astype(jnp.float32))
    d = z.shape[-1]
    target = jnp.concatenate([ref.astype(jnp.float32), ref_feats], -1)

    def step(z, _):
      source = jnp.concatenate([z, feats], -1)
      transport, info = entropic_map(source[fit_index], target, epsilon=self.epsilon,
                                     iterations=self.iterations, tau_b=self.tau_b)
      mapped = transport(source)[:, :d]
      return jko_update(z, mapped, self.tau, self.lam, y_hat), info

    z, infos = jax.lax.scan(step, z, None, length=self.num_steps)
    return z, jax.tree.map(lambda v: v[-1], infos)


# ------------------------------------------------------------------------ the reference queue
def init_queue(size: int, dim: int) -> dict:
  """An empty FIFO queue of `size` conditions [size, dim] with their labels and positions."""
  return {"conditions": jnp.zeros((size, dim), jnp.float32),
          "labels": jnp.zeros((size,), jnp.int32), "positions": jnp.zeros((size,), jnp.int32),
          "count": jnp.zeros((), jnp.int32)}


def push(queue: dict, conditions: jax.Array, labels: jax.Array, positions: jax.Array) -> dict:
  """Appends P entries (overwriting the oldest once full). `count` is the total ever pushed."""
  size = queue["conditions"].shape[0]
  slots = (queue["count"] + jnp.arange(conditions.shape[0])) % size
  return {"conditions": queue["conditions"].at[slots].set(
              jax.lax.stop_gradient(conditions).astype(jnp.float32)),
          "labels": queue["labels"].at[slots].set(labels.astype(jnp.int32)),
          "positions": queue["positions"].at[slots].set(positions.astype(jnp.int32)),
          "count": queue["count"] + conditions.shape[0]}


def queue_full(queue: dict) -> jax.Array:
  return queue["count"] >= queue["conditions"].shape[0]


def draw_reference(queue: dict, rng: jax.Array, n: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """n distinct queue entries at random: (conditions [n, D], labels [n], positions [n])."""
  idx = jax.random.choice(rng, queue["conditions"].shape[0], (n,), replace=False)
  return queue["conditions"][idx], queue["labels"][idx], queue["positions"][idx]


def fit_rows(rng: jax.Array, weights: jax.Array, n: int) -> jax.Array:
  """n row indices among rows with weight > 0, fixed shape: distinct (Gumbel top-k) while there are
  enough such rows, the rest re-drawn from them with replacement (never a zero-weight row, unless
  every weight is zero)."""
  r_top, r_fill = jax.random.split(rng)
  positive = weights > 0
  top = jax.lax.top_k(jax.random.gumbel(r_top, weights.shape) + jnp.where(positive, 0.0, -1e9), n)[1]
  p = jnp.where(positive.any(), positive / jnp.maximum(positive.sum(), 1), 1.0 / weights.shape[0])
  fill = jax.random.choice(r_fill, weights.shape[0], (n,), p=p)
  return jnp.where(positive[top], top, fill)
