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
def feature_scales(x: jax.Array, y: jax.Array, class_cost: float, position_cost: float,
                   y_weights: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Scales (s_class, s_position) such that a one-hot mismatch (cost 2s²) adds `cost` × the mean
  squared distance between x [n, D] and y [m, D] (y weighted by `y_weights` [m] summing to 1 when
  given; computed in closed form, no n×m matrix)."""
  wy = jnp.full((y.shape[0],), 1.0 / y.shape[0]) if y_weights is None else y_weights
  y_mean = wy @ y
  mean_sq = (jnp.mean(jnp.sum(x * x, -1)) + wy @ jnp.sum(y * y, -1) - 2.0 * jnp.dot(x.mean(0), y_mean))
  mean_sq = jax.lax.stop_gradient(jnp.maximum(mean_sq, 1e-12))
  return jnp.sqrt(class_cost * mean_sq / 2.0), jnp.sqrt(position_cost * mean_sq / 2.0)


def condition_features(labels: jax.Array, positions: jax.Array, num_classes: int, seq_len: int,
                       class_scale: jax.Array, position_scale: jax.Array) -> jax.Array:
  """[n, num_classes + seq_len]: scaled one-hot class (zero for the null class) and position."""
  cls = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)    # label == num_classes -> zeros
  pos = jax.nn.one_hot(positions, seq_len, dtype=jnp.float32)
  return jnp.concatenate([class_scale * cls, position_scale * pos], axis=-1)


def entropic_map(x: jax.Array, y: jax.Array, *, epsilon: float, iterations: int,
                 tau_b: float = 1.0, a: jax.Array | None = None, b: jax.Array | None = None
                 ) -> tuple[Callable[[jax.Array], jax.Array], dict]:
  """Fits entropic OT from x [n, d] (marginal `a` [n]) to y [m, d] (marginal `b` [m]; uniform
  where None, squared Euclidean cost) and returns (T, diagnostics), T: [k, d] -> [k, d] the
  entropic map (x − ½∇f), usable out of sample. A point of zero mass takes no part: y_j with
  b_j = 0 is never a target.

  The solve runs in float32 with a fixed number of Sinkhorn iterations (a multiple of 10: ott-jax
  runs them in blocks of 10) under stop-gradient.
  """
  if iterations <= 0 or iterations % 10:
    raise ValueError(f"iterations={iterations}: use a positive multiple of 10")
  x, y = (jax.lax.stop_gradient(v.astype(jnp.float32)) for v in (x, y))
  # ε relative to the std of the cost under the marginals a ⊗ b (uniform: the plain std, ott's
  # relative_epsilon="std"), so that a zero-mass point changes nothing.
  uniform = lambda k: jnp.full((k,), 1.0 / k, jnp.float32)
  wa = uniform(x.shape[0]) if a is None else a.astype(jnp.float32)
  wb = uniform(y.shape[0]) if b is None else b.astype(jnp.float32)
  cost = (jnp.sum(x * x, -1)[:, None] + jnp.sum(y * y, -1)[None] - 2.0 * x @ y.T)
  mean = wa @ cost @ wb
  std = jnp.sqrt(wa @ jnp.square(cost - mean) @ wb)
  geom = pointcloud.PointCloud(x, y, epsilon=epsilon * std)
  out = linear.solve(geom, a=a, b=b, tau_b=tau_b, min_iterations=iterations,
                     max_iterations=iterations)
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
  None, fit_weights [N] | None, ref_weights [N'] | None) -> (refined z [n, D] float32, diagnostics
  of the last step)`. The OT is fitted on the rows `fit_index` of z, with `fit_weights` as their
  marginal and `ref_weights` as the reference's (re-fitted at each step on the moved points), and
  applied to every row.
  """
  num_steps: int
  tau: float
  lam: float
  epsilon: float
  iterations: int
  tau_b: float

  def __call__(self, z, feats, fit_index, ref, ref_feats, y_hat=None, fit_weights=None,
               ref_weights=None):
    z = jax.lax.stop_gradient(z.astype(jnp.float32))
    d = z.shape[-1]
    target = jnp.concatenate([ref.astype(jnp.float32), ref_feats], -1)

    def step(z, _):
      source = jnp.concatenate([z, feats], -1)
      transport, info = entropic_map(source[fit_index], target, epsilon=self.epsilon,
                                     iterations=self.iterations, tau_b=self.tau_b, a=fit_weights,
                                     b=ref_weights)
      mapped = transport(source)[:, :d]
      return jko_update(z, mapped, self.tau, self.lam, y_hat), info

    z, infos = jax.lax.scan(step, z, None, length=self.num_steps)
    return z, jax.tree.map(lambda v: v[-1], infos)

  def fitted(self, source, source_feats, ref, ref_feats, ref_weights=None
             ) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """R as a fixed map, fitted once on a stored source set [N, D] (features [N, F]) against the
    reference [N', D] (features [N', F], marginal `ref_weights` [N'], uniform if None): the K maps
    are fitted in turn on the source moved by the ones before, and `apply(z [n, D], feats [n, F])`
    moves each row by them alone, so a row's result never depends on the other rows. (λ = 0: no
    paired ŷ exists for a new sample.)"""
    d = source.shape[-1]
    target = jnp.concatenate([ref.astype(jnp.float32), ref_feats], -1)
    x = jax.lax.stop_gradient(source.astype(jnp.float32))
    maps = []
    for _ in range(self.num_steps):   # K is small and static
      transport, _ = entropic_map(jnp.concatenate([x, source_feats], -1), target,
                                  epsilon=self.epsilon, iterations=self.iterations,
                                  tau_b=self.tau_b, b=ref_weights)
      maps.append(transport)
      x = jko_update(x, transport(jnp.concatenate([x, source_feats], -1))[:, :d], self.tau)

    def apply(z, feats):
      z = jax.lax.stop_gradient(z.astype(jnp.float32))
      for transport in maps:
        z = jko_update(z, transport(jnp.concatenate([z, feats], -1))[:, :d], self.tau)
      return z

    return apply


# ------------------------------------------------------------------------ the reference queue
NO_ID = -1   # the example id of an empty slot, or of an entry whose example is unknown


def init_queue(size: int, dim: int) -> dict:
  """An empty FIFO queue of `size` conditions [size, dim] with their labels, positions and the
  ids of the examples they came from."""
  return {"conditions": jnp.zeros((size, dim), jnp.float32),
          "labels": jnp.zeros((size,), jnp.int32), "positions": jnp.zeros((size,), jnp.int32),
          "ids": jnp.full((size,), NO_ID, jnp.int32), "count": jnp.zeros((), jnp.int32)}


def push(queue: dict, conditions: jax.Array, labels: jax.Array, positions: jax.Array,
         valid: jax.Array | None = None, ids: jax.Array | None = None) -> dict:
  """Appends the P entries (those with `valid` [P] true, if given) with their example `ids` [P]
  (NO_ID if None), overwriting the oldest once full. `count` is the total ever pushed."""
  size = queue["conditions"].shape[0]
  valid = jnp.ones(conditions.shape[:1], bool) if valid is None else valid.astype(bool)
  offset = jnp.cumsum(valid) - 1
  slots = jnp.where(valid, (queue["count"] + offset) % size, size)   # size: out of range, dropped
  put = lambda a, v: a.at[slots].set(v, mode="drop")
  return {"conditions": put(queue["conditions"], jax.lax.stop_gradient(conditions).astype(jnp.float32)),
          "labels": put(queue["labels"], labels.astype(jnp.int32)),
          "positions": put(queue["positions"], positions.astype(jnp.int32)),
          "ids": put(queue["ids"], jnp.full(labels.shape, NO_ID, jnp.int32) if ids is None
                     else ids.astype(jnp.int32)),
          "count": queue["count"] + jnp.sum(valid).astype(jnp.int32)}


def queue_full(queue: dict) -> jax.Array:
  return queue["count"] >= queue["conditions"].shape[0]


def draw_reference(queue: dict, rng: jax.Array, n: int, exclude_ids: jax.Array | None = None
                   ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """n distinct queue entries at random: (conditions [n, D], labels [n], positions [n], marginal
  [n]). Entries whose example id is in `exclude_ids` [k] (the current batch's examples) are drawn
  only when too few others exist, and then with zero mass, so a condition is never matched to
  its own example's entries; the marginal is uniform over the rest (all zero when none is left).
  The draw is `fit_rows`' with the kept entries as the rows of weight."""
  keep = jnp.ones(queue["conditions"].shape[:1], bool)
  if exclude_ids is not None:
    own = jnp.any(queue["ids"][:, None] == exclude_ids.astype(jnp.int32)[None, :], axis=1)
    keep = ~own | (queue["ids"] == NO_ID)
  idx, marginal = fit_rows(rng, keep.astype(jnp.float32), n)
  marginal = jnp.where(jnp.any(keep), marginal, 0.0)
  return queue["conditions"][idx], queue["labels"][idx], queue["positions"][idx], marginal


def fit_rows(rng: jax.Array, weights: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
  """n distinct row indices [n] drawn at random (Gumbel top-k), rows with weight > 0 first, and
  their marginal [n]: the weights normalised, 0 for any zero-weight row the draw had to include
  (never a duplicated row). All-zero weights give a uniform marginal."""
  positive = weights > 0
  idx = jax.lax.top_k(jax.random.gumbel(rng, weights.shape) + jnp.where(positive, 0.0, -1e9), n)[1]
  w = jnp.where(positive[idx], weights[idx], 0.0).astype(jnp.float32)
  total = jnp.sum(w)
  return idx, jnp.where(total > 0, w / jnp.maximum(total, 1e-30), 1.0 / n)
