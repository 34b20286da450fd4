"""Stacks of identical blocks for large models: rematerialisation and scan-over-layers switches.

`remat` (a name from REMAT_POLICIES) recomputes each block's activations in the backward pass
instead of keeping them: "full" keeps only the block inputs, "dots" also keeps the matmul outputs,
"dots_no_batch" keeps the matmul outputs that have no batch dimension (weights-only products).
The parameter tree is unchanged, so a checkpoint loads with remat on or off.

`scan_layers` runs the blocks of a stack as one `nn.scan` step applied `depth` times: the program
holds one block instead of `depth`, which cuts compile time and memory of deep models. The
parameters of the stack are then stacked along a leading "layers" axis under
`<stack name>/SCAN_LAYER/...`, a different tree from the per-block `<stack name>_<i>` of the loop
(a checkpoint must be trained and restored with the same setting); `unstack_layers` converts.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}
SCAN_LAYER = "scanned_layer"   # the scan step's block: parameter paths contain this key once
LAYERS_AXIS = "layers"         # logical name of the stacked leading axis


def check_remat(remat: str) -> None:
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat={remat!r}: expected one of {sorted(REMAT_POLICIES)}")


def remat_block(block_cls: type[nn.Module], remat: str, static_argnums: Sequence[int],
                prevent_cse: bool = True) -> type[nn.Module]:
  """`block_cls` itself (remat "none") or its rematerialised version with the same parameters.

  static_argnums count `self` as 0 and mark the Python-valued arguments (e.g. `deterministic`).
  prevent_cse=False is safe (and faster) inside a scan.
  """
  check_remat(remat)
  if remat == "none":
    return block_cls
  return nn.remat(block_cls, policy=REMAT_POLICIES[remat], static_argnums=tuple(static_argnums),
                  prevent_cse=prevent_cse)


class _ScanStep(nn.Module):
  """One scan step: x, *args -> (x, per-layer output or None) through `block_cls(**kwargs)`."""
  block_cls: Any
  kwargs: tuple   # sorted (name, value) pairs: hashable module fields

  @nn.compact
  def __call__(self, x, *args):
    out = self.block_cls(**dict(self.kwargs), name=SCAN_LAYER)(x, *args)
    return out if isinstance(out, tuple) else (out, None)


def scanned_stack(block_cls: type[nn.Module], kwargs: dict, depth: int, remat: str,
                  in_axes: Sequence[Any], name: str) -> nn.Module:
  """A module applying `depth` blocks as one `nn.scan`: (x, *args) -> (x, stacked outputs).

  in_axes has one entry per extra argument: `nn.broadcast` (the same for every layer, which also
  keeps Python values static) or 0 (sliced per layer from a leading [depth] axis, e.g. a KV
  cache). The last argument must be the block's `deterministic` flag.
  """
  step = remat_block(_ScanStep, remat, static_argnums=(len(in_axes) + 1,), prevent_cse=False)
  scan = nn.scan(step, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                 in_axes=tuple(in_axes), length=depth,
                 metadata_params={nn.PARTITION_NAME: LAYERS_AXIS})
  return scan(block_cls=block_cls, kwargs=tuple(sorted(kwargs.items())), name=name)


def stacked_rank_offset(path: Sequence[Any]) -> int:
  """1 for a parameter inside a scanned stack (its leading axis is the layer index), else 0."""
  return int(any(getattr(k, "key", None) == SCAN_LAYER for k in path))


def matrix_like(path: Sequence[Any], p: jax.Array) -> bool:
  """True for kernels and embeddings (≥ 2 dims per layer; a scanned stack's leading layer axis
  does not count), False for biases and norm scales: what AdamW decays by default."""
  return p.ndim - stacked_rank_offset(path) >= 2


def unstack_layers(params: dict, name: str) -> dict:
  """Converts a scanned stack `name/SCAN_LAYER/...` [depth, ...] into loop form `name_<i>/...`."""
  params = dict(params)
  stacked = params.pop(name)[SCAN_LAYER]
  depth = jax.tree.leaves(stacked)[0].shape[0]
  for i in range(depth):
    params[f"{name}_{i}"] = jax.tree.map(lambda a, i=i: a[i], stacked)
  return params
