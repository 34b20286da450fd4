"""Samplers of DD2's AR-diffusion model (reference/dd2_paella.md §1.5): a causal GPT over
codebook vectors whose DiffLoss head predicts a rectified-flow velocity per token.

`sample_euler_ar`: raster order with the KV cache; token i starts at ε_i ~ N(0, I_C) and takes
`steps` Euler steps from t = 1 to 0, x ← x + (t' − t)·v(x, t, z_i) (dx/dt = v on the path
x_t = x_0 + t·v), then is fed back as the next input (continuous: the model was trained on
vectors). `nearest_codes` snaps the tokens to the codebook for the VQ decoder.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ardiff_jax.models.gpt import GPT

TIME_SCALE = 1000.0   # the DiffLoss head's time embedding reads t·1000 (its timesteps' range)


def head_velocity(model: GPT, params, x: jax.Array, t: jax.Array, z: jax.Array) -> jax.Array:
  """v(x_t, t | z): x [N, C], t [N] in [0, 1], z [N, D] -> [N, C] (the head's first C outputs)."""
  out = model.apply({"params": params}, x, t * TIME_SCALE, z, method=GPT.head)
  return out[..., : x.shape[-1]]


def sample_euler_ar(model: GPT, params, labels: jax.Array, rng: jax.Array, steps: int = 10
                    ) -> jax.Array:
  """labels int32 [B] -> tokens float32 [B, L, C] in raster order."""
  b, c = labels.shape[0], model.token_dim
  apply = lambda *a, **kw: model.apply({"params": params}, *a, **kw)
  cache = apply(b, method=GPT.init_cache)
  z, cache = apply(apply(labels, method=GPT.embed_class), 0, cache, method=GPT.decode_step)
  times = jnp.linspace(1.0, 0.0, steps + 1)

  def token(z_i, key):
    def euler(x, k):
      t, t_next = times[k], times[k + 1]
      v = head_velocity(model, params, x, jnp.full((b,), t), z_i)
      return x + (t_next - t) * v, None
    x, _ = jax.lax.scan(euler, jax.random.normal(key, (b, c)), jnp.arange(steps))
    return x

  def step(carry, i):
    z, cache, key = carry
    key, sub = jax.random.split(key)
    x = token(z, sub)
    z_next, cache = apply(apply(x[:, None], method=GPT.embed_tokens), i + 1, cache,
                          method=GPT.decode_step)
    return (z_next[:, 0], cache, key), x

  _, tokens = jax.lax.scan(step, (z[:, 0], cache, rng), jnp.arange(model.seq_len))
  return jnp.swapaxes(tokens, 0, 1)


def nearest_codes(tokens: jax.Array, table: jax.Array) -> jax.Array:
  """tokens [..., C], table [V, C] -> int32 [...]: the nearest entry under the l2 distance."""
  d = (jnp.sum(jnp.square(tokens), -1, keepdims=True) - 2 * tokens @ table.T
       + jnp.sum(jnp.square(table), -1))
  return jnp.argmin(d, axis=-1).astype(jnp.int32)


def one_step_generate(model: GPT, params, eps: jax.Array, labels: jax.Array,
                      deterministic: bool = True, rngs=None) -> jax.Array:
  """DD2's one-step generator G (§1.6): eps [B, L, C] ~ N(0, I), labels [B] -> tokens [B, L, C].

  One causal forward: the trunk reads the shifted noise sequence [class, ε_1 … ε_{L−1}], so its
  state z_i depends on ε_<i only, and the head takes one Euler step from t = 1:
  x_i = ε_i − v(ε_i, t = 1 | z_i)."""
  b, l, c = eps.shape
  z = model.apply({"params": params}, eps, labels, deterministic=deterministic, rngs=rngs)
  v = head_velocity(model, params, eps.reshape(b * l, c), jnp.ones((b * l,)), z.reshape(b * l, -1))
  return eps - v.reshape(b, l, c)
