"""MAR's per-token diffusion head: `SimpleMLPAdaLN` and the `DiffLoss` train/sample wrappers.

SimpleMLPAdaLN (MAR §4.1, reference/mar.md §2.4), for a token x_t [N, C] at time t [N] given the
backbone's condition z [N, D]:
  y = MLP(sinusoid_256(t)) + Linear(z)                         (conditioning, width w)
  h = Linear(x_t);  per block: h += gate · MLP(LN(h)·(1 + scale) + shift), (shift, scale, gate) = Linear(SiLU(y))
  out = Linear(LN₀(h)·(1 + scale) + shift) -> [N, 2C] (ε̂ and the variance interpolation v)
Init: xavier-uniform Linear with zero bias, the two time-MLP weights N(0, 0.02), zero for every
AdaLN output layer and the final linear, so the head starts as ε̂ = 0, v = 0.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from ardiff_jax.diffusion import gaussian

_xavier = nn.initializers.xavier_uniform()
_zeros = nn.initializers.zeros


def timestep_embedding(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
  """t [N] -> [N, dim]: cos of the half-frequencies, then sin (DiT's convention)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _modulate(x, shift, scale):
  return x * (1 + scale) + shift


class _ResBlock(nn.Module):
  width: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, y):
    mod = nn.Dense(3 * self.width, kernel_init=_zeros, dtype=self.dtype, name="adaLN_modulation")(nn.silu(y))
    shift, scale, gate = jnp.split(mod, 3, axis=-1)
    h = _modulate(nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="in_ln")(x), shift, scale)
    h = nn.Dense(self.width, kernel_init=_xavier, dtype=self.dtype, name="mlp_in")(h)
    h = nn.Dense(self.width, kernel_init=_xavier, dtype=self.dtype, name="mlp_out")(nn.silu(h))
    return x + gate * h


class SimpleMLPAdaLN(nn.Module):
  """(x_t [N, C], t [N], z [N, D]) -> [N, 2C]."""
  in_channels: int
  width: int
  depth: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, t, z):
    dense = lambda n, name, init=_xavier: nn.Dense(n, kernel_init=init, dtype=self.dtype, name=name)
    normal = nn.initializers.normal(0.02)
    temb = dense(self.width, "time_mlp_in", normal)(timestep_embedding(t))
    temb = dense(self.width, "time_mlp_out", normal)(nn.silu(temb))
    y = temb + dense(self.width, "cond_embed")(z)
    h = dense(self.width, "input_proj")(x)
    for i in range(self.depth):
      h = _ResBlock(self.width, self.dtype, name=f"res_block_{i}")(h, y)
    shift, scale = jnp.split(dense(2 * self.width, "final_adaLN", _zeros)(nn.silu(y)), 2, axis=-1)
    h = _modulate(nn.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False, dtype=self.dtype,
                               name="final_ln")(h), shift, scale)
    return dense(2 * self.in_channels, "final_linear", _zeros)(h).astype(jnp.float32)


def diffloss_loss(head_fn, diffusion: gaussian.GaussianDiffusion, z: jax.Array, target: jax.Array,
                  mask: jax.Array, rng: jax.Array, batch_mul: int = 4):
  """MAR's `forward_loss`: tokens [N, C] with conditions z [N, D] and loss mask [N].

  head_fn(x_t [M, C], t [M], z [M, D]) -> [M, 2C] is the SimpleMLPAdaLN with its parameters bound.
  Each token is repeated `batch_mul` times (MAR's diffusion_batch_mul = 4), every copy with its own
  uniform t ∈ {0..T−1} and noise. Returns (Σ loss·mask / Σ mask, {"mse", "vb"} over masked copies).
  """
  # The copies are laid out as MAR's `repeat` (the whole set, batch_mul times). The constraints
  # keep the head's rows split over the data-parallel devices under jit (a tiled axis otherwise
  # ends up replicated: every device would run the head on the whole global batch); with
  # partitionable threefry the random draws do not depend on that split.
  rows = lambda a: nn.with_logical_constraint(a, ("batch",) + (None,) * (a.ndim - 1))
  z, target, mask = (rows(jnp.tile(a, (batch_mul,) + (1,) * (a.ndim - 1))) for a in (z, target, mask))
  t_rng, n_rng = jax.random.split(rng)
  t = rows(jax.random.randint(t_rng, target.shape[:1], 0, diffusion.num_timesteps))
  noise = rows(jax.random.normal(n_rng, target.shape, jnp.float32))
  terms = diffusion.training_losses(lambda x, tt: head_fn(x, tt, z), target.astype(jnp.float32),
                                    t, noise)
  mask = mask.astype(jnp.float32)
  denom = jnp.maximum(mask.sum(), 1.0)
  masked_mean = lambda v: jnp.sum(v * mask) / denom
  return masked_mean(terms["loss"]), {"mse": masked_mean(terms["mse"]), "vb": masked_mean(terms["vb"])}


def diffloss_sample(head_fn, in_channels: int, diffusion: gaussian.GaussianDiffusion, z: jax.Array,
                    rng: jax.Array, temperature=1.0, cfg_scale=None, clip_x0: float = 0.0) -> jax.Array:
  """Samples tokens [N, C] given conditions z [N, D] by ancestral DDPM on `diffusion` (respaced).

  With `cfg_scale` (a scalar, possibly traced), z is [2M, D] = (conditional; unconditional) and the
  result is [M, C]. MAR's `forward_with_cfg` feeds both halves the first half's x_t at every step,
  guides ε only, ε = ε_u + s(ε_c − ε_u), and keeps the conditional half's variance channels; the
  unconditional half's own chain is never read, so the chain here runs on the first half alone.
  With s = 1 this equals sampling z[:M] without guidance, noise for noise.
  """
  c = in_channels
  n_rng, s_rng = jax.random.split(rng)
  if cfg_scale is None:
    noise = jax.random.normal(n_rng, (z.shape[0], c), jnp.float32)
    return diffusion.p_sample_loop(lambda x, t: head_fn(x, t, z), noise, s_rng, temperature, clip_x0)
  half_n = z.shape[0] // 2
  noise = jax.random.normal(n_rng, (half_n, c), jnp.float32)

  def guided(x, t):
    out = head_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), z)
    eps_c, eps_u = out[:half_n, :c], out[half_n:, :c]
    return jnp.concatenate([eps_u + cfg_scale * (eps_c - eps_u), out[:half_n, c:]], axis=-1)

  return diffusion.p_sample_loop(guided, noise, s_rng, temperature, clip_x0)
