"""Optimizer and learning-rate schedule from an `optim` config section: the engine's (`train/`)
for every method's parameters, and a method's own for a network it trains inside its loss (DD2's
guidance network).

AdamW with a weight-decay mask (the method decides which parameters decay: MAR decays neither
biases, norms nor the diffusion head), linear warmup followed by a constant or cosine schedule,
and global-norm clipping: over all parameters, or, when the method names auxiliary parameters
(condition refinement's inverse encoder), over the model's and the auxiliary ones separately, so
that training an instrument beside a model never rescales the model's update. The gradient norm
itself is logged by the train step, before clipping.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ardiff_jax.models.layers import matrix_like


def make_schedule(cfg: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """Linear warmup from `cfg.warmup_start` to `cfg.lr` over `cfg.warmup_steps`, then constant or
  cosine decay."""
  warmup = int(cfg.warmup_steps)
  if cfg.schedule == "constant":
    after = optax.constant_schedule(cfg.lr)
  elif cfg.schedule == "cosine":
    after = optax.cosine_decay_schedule(cfg.lr, max(num_steps - warmup, 1),
                                        alpha=cfg.min_lr / cfg.lr if cfg.lr else 0.0)
  else:
    raise ValueError(f"optim.schedule={cfg.schedule!r}: expected 'constant' or 'cosine'")
  if warmup <= 0:
    return after
  # MAR updates the lr per iteration with lr·step/warmup from step 0; the first update uses lr/warmup
  # rather than 0 so that step 0 is not wasted.
  start = float(cfg.get("warmup_start", 0.0))
  ramp = lambda step: start + (cfg.lr - start) * jnp.minimum(step + 1, warmup) / warmup
  return optax.join_schedules([ramp, after], [warmup])


def default_decay_mask(params: Any) -> Any:
  """Decay every parameter with 2 or more dimensions (kernels, embeddings); not biases or norms."""
  return jax.tree_util.tree_map_with_path(matrix_like, params)


def make_optimizer(cfg: ml_collections.ConfigDict, num_steps: int,
                   decay_mask: Callable[[Any], Any] = default_decay_mask,
                   auxiliary: Callable[[Any], Any] | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW after clipping; `auxiliary`: params -> bool tree, True for parameters clipped by their
  own global norm (None: one norm over everything)."""
  schedule = make_schedule(cfg, num_steps)
  parts = []
  if cfg.grad_clip_norm and cfg.grad_clip_norm > 0:
    clip = optax.clip_by_global_norm(cfg.grad_clip_norm)
    if auxiliary is not None:
      groups = lambda params: jax.tree.map(lambda a: "auxiliary" if a else "model", auxiliary(params))
      clip = optax.multi_transform({"model": clip, "auxiliary": clip}, groups)
    parts.append(clip)
  parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=decay_mask))
  return optax.chain(*parts), schedule
