"""Causal AR sampling with the DiffLoss head: prefill the class token, then one token per step
against a static KV cache, all in one `lax.scan` (no host sync).

Step i samples the token at grid position o_i (raster: o_i = i; a random-order model: a random
permutation per image) from the head conditioned on z_i, then feeds it back (RoPE at its own
position, plus the embedding of o_{i+1} for a random-order model) to get z_{i+1}.
Classifier-free guidance stacks the null class (row `num_classes`) as a second half and guides ε
only, as MAR does, with a constant scale or the linear ramp 1 + (s − 1)(i + 1)/L.
Temperature scales the per-step diffusion noise only.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ardiff_jax.diffusion.gaussian import GaussianDiffusion
from ardiff_jax.models.diffloss import diffloss_sample
from ardiff_jax.models.gpt import GPT
from ardiff_jax.models.mar import sample_orders


def sample_tokens(model: GPT, params, labels: jax.Array, rng: jax.Array, *,
                  diffusion: GaussianDiffusion, cfg_scale: float = 1.0, cfg_schedule: str = "constant",
                  temperature: float = 1.0, use_cfg: bool | None = None,
                  clip_x0: float = 0.0, refine_fn=None) -> jax.Array:
  """labels int32 [B] -> tokens [B, L, C] in grid order (generated in raster order, or in a random
  order per image when `model.random_order`). `refine_fn(z [n, D], labels [n] (num_classes =
  null), positions [n]) -> z` (condition refinement, runtime mode: a fixed map, row by row) acts on
  every step's conditions before the head."""
  b, l, c = labels.shape[0], model.seq_len, model.token_dim
  apply = lambda *a, **kw: model.apply({"params": params}, *a, **kw)
  head_fn = lambda x, t, z: apply(x, t, z, method=GPT.head)
  use_cfg = cfg_scale != 1.0 if use_cfg is None else use_cfg
  cond = jnp.concatenate([labels, jnp.full_like(labels, model.num_classes)]) if use_cfg else labels
  if model.random_order:
    order_rng, rng = jax.random.split(rng)
    orders = sample_orders(order_rng, b, l)
  else:
    orders = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
  double = (lambda a: jnp.concatenate([a, a])) if use_cfg else (lambda a: a)
  orders_in = double(orders)                                   # [B', L]

  def inputs(emb, next_pos):
    """The embeddings fed at one step: + the next position's embedding for a random-order model."""
    return emb + apply(next_pos[:, None], method=GPT.target_embed) if model.random_order else emb

  cache = apply(cond.shape[0], method=GPT.init_cache)
  first = inputs(apply(cond, method=GPT.embed_class), orders_in[:, 0])
  z, cache = apply(first, 0, cache, apply(jnp.full((cond.shape[0], 1), -1), method=GPT.rope_rows),
                   method=GPT.decode_step)

  def step(carry, i):
    z, cache, tokens, key = carry                       # z [B', D]: the condition of token o_i
    key, sub = jax.random.split(key)
    pos = orders_in[:, i]
    if use_cfg:
      scale = cfg_scale if cfg_schedule == "constant" else 1.0 + (cfg_scale - 1.0) * (i + 1) / l
    else:
      scale = None
    if refine_fn is not None:
      z = refine_fn(z, cond, pos)
    x = diffloss_sample(head_fn, c, diffusion, z, sub, temperature, scale, clip_x0)   # [B, C]
    tokens = tokens.at[jnp.arange(b), orders[:, i]].set(x.astype(tokens.dtype))
    emb = inputs(apply(double(x)[:, None], method=GPT.embed_tokens),
                 orders_in[:, jnp.minimum(i + 1, l - 1)])
    z_next, cache = apply(emb, i + 1, cache, apply(pos[:, None], method=GPT.rope_rows),
                          method=GPT.decode_step)
    return (z_next[:, 0], cache, tokens, key), None

  init = (z[:, 0], cache, jnp.zeros((b, l, c), jnp.float32), rng)
  (_, _, tokens, _), _ = jax.lax.scan(step, init, jnp.arange(l))
  return tokens
