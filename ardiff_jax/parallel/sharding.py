"""Logical axis names -> mesh shardings, abstract-then-sharded state init, global batches.

Parameters carry logical names through `nn.with_logical_partitioning`; one rules table (the
config's `mesh.rules`) maps each name to mesh axes. A dimension that the chosen mesh axes do not
divide evenly is replicated instead of failing, so a tiny test model runs on any mesh and a
large model is sharded wherever it can be.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Rules = Sequence[tuple[str, Any]]


def _as_tuple(axes: Any) -> tuple[str, ...]:
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_mesh_spec(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                         rules: Rules) -> P:
  """PartitionSpec for an array of `shape` whose dimensions have the given logical names.

  Each mesh axis is used at most once per array; an axis (or axes) that does not divide the
  dimension, or that is already taken by an earlier dimension, is dropped for that dimension.
  """
  table = {name: _as_tuple(axes) for name, axes in rules}
  used: set[str] = set()
  spec = []
  for name, size in zip(logical, shape):
    axes = tuple(a for a in table.get(name, ()) if a not in used and mesh.shape[a] > 1) if name else ()
    while axes and size % int(np.prod([mesh.shape[a] for a in axes])):
      axes = axes[:-1]  # drop the innermost axis until the product divides the dimension
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  while spec and spec[-1] is None:
    spec.pop()
  return P(*spec)


def _path_key(path) -> tuple:
  return tuple(str(p) for p in path)


def param_shardings(boxed_abstract_params: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for an abstract, possibly `LogicallyPartitioned`-boxed params tree."""
  logical = nn.get_partition_spec(boxed_abstract_params)
  unboxed = nn.meta.unbox(boxed_abstract_params)

  def one(spec, leaf):
    names = tuple(spec) if spec is not None else ()
    names = names + (None,) * (len(leaf.shape) - len(names))
    return NamedSharding(mesh, logical_to_mesh_spec(names, leaf.shape, mesh, rules))

  return jax.tree.map(one, logical, unboxed, is_leaf=lambda x: isinstance(x, P))


def follow_param_shardings(tree: Any, params: Any, shardings: Any, mesh: Mesh) -> Any:
  """Shardings for a tree (e.g. optimizer state) whose leaves mirror parameters.

  A leaf whose key path ends with a parameter's key path and has that parameter's shape gets the
  parameter's sharding (Adam moments, EMA); every other leaf (counts, scalars) is replicated.
  """
  by_path = {}
  for (path, p), s in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                          jax.tree.leaves(shardings)):
    by_path[_path_key(path)] = (p.shape, s)
  replicated = NamedSharding(mesh, P())

  def one(path, leaf):
    key = _path_key(path)
    for k in range(len(key)):
      hit = by_path.get(key[k:])
      if hit is not None and tuple(hit[0]) == tuple(getattr(leaf, "shape", ())):
        return hit[1]
    return replicated

  return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """The global batch is split over every data-parallel axis ('data' and 'fsdp')."""
  del ndim
  axes = tuple(a for a in ("data", "fsdp") if a in mesh.shape)
  return NamedSharding(mesh, P(axes))


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles process-local batch arrays into global arrays sharded along the batch axis."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}


def count_params(params: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(params))))


def sharded_init(init_fn: Callable[..., Any], shardings: Any, *args) -> Any:
  """Runs `init_fn(*args)` under jit so each device materialises only its own shards."""
  return jax.jit(init_fn, out_shardings=shardings)(*args)
