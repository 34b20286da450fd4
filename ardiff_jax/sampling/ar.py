"""Causal AR sampling with the DiffLoss head: prefill the class token, then one token per step
against a static KV cache, all in one `lax.scan` (no host sync).

Step i samples token i from the head conditioned on z_i, then feeds it back to get z_{i+1}.
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


def sample_tokens(model: GPT, params, labels: jax.Array, rng: jax.Array, *,
                  diffusion: GaussianDiffusion, cfg_scale: float = 1.0, cfg_schedule: str = "constant",
                  temperature: float = 1.0, use_cfg: bool | None = None,
                  clip_x0: float = 0.0, refine_fn=None) -> jax.Array:
  """labels int32 [B] -> tokens [B, L, C] in raster order. `refine_fn(z [n, D], labels [n]
  (num_classes = null), positions [n], fit weights [n], rng) -> z` (condition refinement, runtime mode) acts on
  every step's conditions before the head."""
  b, l, c = labels.shape[0], model.seq_len, model.token_dim
  apply = lambda *a, **kw: model.apply({"params": params}, *a, **kw)
  head_fn = lambda x, t, z: apply(x, t, z, method=GPT.head)
  use_cfg = cfg_scale != 1.0 if use_cfg is None else use_cfg
  cond = jnp.concatenate([labels, jnp.full_like(labels, model.num_classes)]) if use_cfg else labels
  cache = apply(cond.shape[0], method=GPT.init_cache)
  z, cache = apply(apply(cond, method=GPT.embed_class), 0, cache, method=GPT.decode_step)

  def step(carry, i):
    z, cache, tokens, key = carry                       # z [B', D]: the condition of token i
    key, sub = jax.random.split(key)
    if use_cfg:
      scale = cfg_scale if cfg_schedule == "constant" else 1.0 + (cfg_scale - 1.0) * (i + 1) / l
    else:
      scale = None
    if refine_fn is not None:
      z = refine_fn(z, cond, jnp.full(cond.shape, i), jnp.ones(cond.shape),
                    jax.random.fold_in(sub, 1))
    x = diffloss_sample(head_fn, c, diffusion, z, sub, temperature, scale, clip_x0)   # [B, C]
    tokens = jax.lax.dynamic_update_slice(tokens, x[:, None].astype(tokens.dtype), (0, i, 0))
    x_in = jnp.concatenate([x, x]) if use_cfg else x
    z_next, cache = apply(apply(x_in[:, None], method=GPT.embed_tokens), i + 1, cache,
                          method=GPT.decode_step)
    return (z_next[:, 0], cache, tokens, key), None

  init = (z[:, 0], cache, jnp.zeros((b, l, c), jnp.float32), rng)
  (_, _, tokens, _), _ = jax.lax.scan(step, init, jnp.arange(l))
  return tokens
