"""MAR's sampler (`sample_tokens`, reference/mar.md §3) as one jit-able function with a `lax.scan`.

Start with every position masked and one random order per image. AR step k re-runs the encoder
and decoder on the current tokens, takes the conditions z of the positions order[starts[k]:ends[k]]
(the cosine schedule, fixed in advance), and samples those tokens with the DiffLoss head by
ancestral DDPM on the respaced process. Classifier-free guidance doubles the batch with the null
class (`fake_latent`), guides ε only, with scale 1 + (s − 1)(L − mask_len)/L (`linear`) or s
(`constant`). Temperature scales the per-step diffusion noise only.

Fixed shapes: each step gathers `max_per_step` positions per image (padding slots write to a
scratch position that is dropped), so the head runs on B·max_per_step tokens, not B·L.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ardiff_jax.diffusion.gaussian import GaussianDiffusion
from ardiff_jax.models.diffloss import diffloss_sample
from ardiff_jax.models.mar import MAR, ARSchedule, mask_by_order, sample_orders

CFG_SCHEDULES = ("linear", "constant")


def cfg_at(cfg_scale: float, schedule: str, mask_len: jax.Array, seq_len: int) -> jax.Array:
  if schedule == "linear":
    return 1.0 + (cfg_scale - 1.0) * (seq_len - mask_len) / seq_len
  if schedule == "constant":
    return jnp.asarray(cfg_scale, jnp.float32)
  raise ValueError(f"cfg_schedule={schedule!r}: expected one of {CFG_SCHEDULES}")


def sample_tokens(model: MAR, params, labels: jax.Array, rng: jax.Array, *,
                  diffusion: GaussianDiffusion, schedule: ARSchedule, cfg_scale: float = 1.0,
                  cfg_schedule: str = "linear", temperature: float = 1.0,
                  use_cfg: bool | None = None, clip_x0: float = 0.0,
                  refine_fn=None) -> jax.Array:
  """labels int32 [B] -> tokens [B, L, C].

  `cfg_scale` is static; guidance (the doubled batch) runs when `use_cfg`, by default when
  cfg_scale ≠ 1 (with scale 1 both paths give the same tokens). `refine_fn(z [n, D], labels [n]
  (num_classes = null), positions [n]) -> z` (condition refinement, runtime mode: a fixed map,
  row by row) acts on the conditions of every step before the head.
  """
  b, l, c = labels.shape[0], model.seq_len, model.token_dim
  apply = lambda *a, **kw: model.apply({"params": params}, *a, **kw)
  head_fn = lambda x, t, z: apply(x, t, z, method=MAR.head)
  use_cfg = cfg_scale != 1.0 if use_cfg is None else use_cfg
  cls = apply(labels, method=MAR.class_embedding)
  cond_labels = labels
  if use_cfg:
    cls = jnp.concatenate([cls, apply(b, method=MAR.null_embedding)])
    cond_labels = jnp.concatenate([labels, jnp.full_like(labels, model.num_classes)])
  order_rng, loop_rng = jax.random.split(rng)
  orders = sample_orders(order_rng, b, l)
  k_max = schedule.max_per_step
  slots = jnp.arange(k_max)
  xs = tuple(jnp.asarray(v, jnp.int32) for v in (schedule.starts, schedule.ends, schedule.cfg_mask_len))

  def step(carry, x):
    tokens, key = carry                                   # tokens [B, L+1, C]; slot L is scratch
    start, end, cfg_len = x
    key, sub = jax.random.split(key)
    cur = tokens[:, :l]
    mask = mask_by_order(orders, end)                     # the positions not generated yet
    tok_in, mask_in = (jnp.concatenate([cur, cur]), jnp.concatenate([mask, mask])) if use_cfg else (cur, mask)
    z = apply(tok_in, mask_in, cls)                       # [B', L, D]
    valid = slots < (end - start)                          # [K]
    gather_pos = jnp.take(orders, jnp.minimum(start + slots, l - 1), axis=1)      # [B, K]
    write_pos = jnp.where(valid[None], gather_pos, l)
    if use_cfg:
      gather_pos = jnp.concatenate([gather_pos, gather_pos])
    zsel = jnp.take_along_axis(z, gather_pos[..., None], axis=1).reshape(-1, z.shape[-1])
    if refine_fn is not None:
      zsel = refine_fn(zsel, jnp.repeat(cond_labels, k_max), gather_pos.reshape(-1))
    scale = cfg_at(cfg_scale, cfg_schedule, cfg_len, l) if use_cfg else None
    new = diffloss_sample(head_fn, c, diffusion, zsel, sub, temperature, scale, clip_x0)
    new = new.reshape(b, k_max, c)
    tokens = tokens.at[jnp.arange(b)[:, None], write_pos].set(new.astype(tokens.dtype))
    return (tokens, key), None

  init = jnp.zeros((b, l + 1, c), jnp.float32)
  (tokens, _), _ = jax.lax.scan(step, (init, loop_rng), xs)
  return tokens[:, :l]
