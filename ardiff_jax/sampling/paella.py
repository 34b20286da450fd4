"""Paella's token-renoising sampler and the MaskGIT baseline (reference/dd2_paella.md §3.5, §5).

Both run a fixed number of steps in one `lax.scan` over fixed shapes, with no host sync. The model
is seen only through `logits_fn(x, t, cfg) -> logits [B, h, w, V]`: the predictor at noise level t
[B] with classifier-free guidance of weight cfg (a scalar) already mixed in, ℓ_u + w(ℓ_c − ℓ_u).

Renoise (Paella v2, Alg. 1, `src_distributed/utils.py` `sample`). u_init [B, h, w] holds uniform
random codes and x starts as u_init (or `init_x`). For i = 0 … S−1 at t_i = linspace(t_start,
t_end, S + 1)[i]:
  1. ℓ = logits_fn(x, t_i, w_i), with w_i = linspace(cfg_start, cfg_end, S)[i] (1 from step
     `cfg_steps` on: the conditional logits alone);
  2. x ~ Categorical(softmax(ℓ / τ_i)) at every position, τ_i = linspace(τ_start, τ_end, S)[i]:
     nothing is kept from the previous x and nothing is ranked by confidence;
  3. for i < S − 1 (`renoise_steps`), each token goes back to its u_init code with probability
     t_{i+1} (a uniform draw u ≤ t_{i+1}, as the official `add_noise`).
`keep` (a bool [B, h, w], with `init_x`) re-imposes init_x's tokens after every step: inpainting
(keep the known region) and, with t_start < 1, variations. Our addition: the official sampler
starts from init_x but keeps nothing.

Mask-and-freeze (MaskGIT `parallel_decode.decode`, the comparison's baseline): x starts all
[MASK] (id V, one past the codebook). At step i of S, every masked position draws a code from
softmax(ℓ), known ones keep theirs; with ratio (i + 1)/S and mask_len = floor(N₀·cos(π/2·ratio))
clamped to [1, n_unknown − 1] (N₀ the unknown count at the start), the mask_len least confident
newly drawn tokens, confidence = log p(drawn) + choice_temperature·(1 − ratio)·Gumbel, go back to
[MASK]; known tokens never do. The last step's draws fill what is left. The noise level fed to
the predictor is the current masked fraction (training feeds the masking ratio, `methods/paella.py`).

Shape letters: B batch, h/w the code grid, V codebook size.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

LogitsFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def noise_levels(steps: int, t_start: float = 1.0, t_end: float = 0.0) -> jax.Array:
  """[S + 1] levels t_0 = t_start … t_S = t_end; step i predicts at t_i, renoises at t_{i+1}."""
  return jnp.linspace(t_start, t_end, steps + 1, dtype=jnp.float32)


def initial_codes(rng: jax.Array, shape: tuple[int, int, int], vocab: int) -> jax.Array:
  """u_init: uniform random codes int32 [B, h, w], the sampler's fixed start."""
  return jax.random.randint(rng, shape, 0, vocab, jnp.int32)


def renoise(rng: jax.Array, codes: jax.Array, t: jax.Array, start: jax.Array
            ) -> tuple[jax.Array, jax.Array]:
  """Each code [B, h, w] replaced by its `start` code with probability t [B] (u ≤ t, u ~ U[0, 1)).
  -> (codes [B, h, w], the replaced positions bool [B, h, w])."""
  replaced = jax.random.uniform(rng, codes.shape) <= t.reshape((-1,) + (1,) * (codes.ndim - 1))
  return jnp.where(replaced, start, codes), replaced


def draw_codes(rng: jax.Array, logits: jax.Array, temperature: jax.Array) -> jax.Array:
  """A categorical draw of softmax(logits / τ) at every position: logits [B, h, w, V] -> int32
  [B, h, w]."""
  return jax.random.categorical(rng, logits.astype(jnp.float32) / temperature, axis=-1
                                ).astype(jnp.int32)


def step_schedule(steps: int, start: float, end: float) -> jax.Array:
  """[S] values linear from start to end (the temperature and CFG schedules)."""
  return jnp.linspace(start, end, steps, dtype=jnp.float32)


def guidance_schedule(steps: int, cfg: tuple[float, float], cfg_steps: int | None) -> jax.Array:
  """[S] CFG weights: linear cfg[0] → cfg[1], then 1 (no guidance) from step `cfg_steps` on."""
  w = step_schedule(steps, *cfg)
  if cfg_steps is not None:
    w = jnp.where(jnp.arange(steps) < cfg_steps, w, 1.0)
  return w


def sample_renoise(logits_fn: LogitsFn, rng: jax.Array, shape: tuple[int, int, int], vocab: int, *,
                   steps: int = 12, temperature: tuple[float, float] = (0.7, 0.3),
                   cfg: tuple[float, float] = (8.0, 8.0), cfg_steps: int | None = None,
                   t_start: float = 1.0, t_end: float = 0.0, renoise_steps: int | None = None,
                   init_x: jax.Array | None = None, keep: jax.Array | None = None) -> jax.Array:
  """Paella's sampler (module docstring). shape = (B, h, w) -> codes int32 [B, h, w]."""
  if keep is not None and (init_x is None or keep.shape != tuple(shape)):
    raise ValueError(f"keep (inpainting) marks tokens of init_x to keep: give init_x as well, and "
                     f"both of shape {tuple(shape)}")
  r_init, r_loop = jax.random.split(rng)
  u_init = initial_codes(r_init, shape, vocab)
  x = u_init if init_x is None else init_x.astype(jnp.int32)
  levels = noise_levels(steps, t_start, t_end)
  temps = step_schedule(steps, *temperature)
  weights = guidance_schedule(steps, cfg, cfg_steps)
  last_renoise = steps - 1 if renoise_steps is None else renoise_steps
  ones = jnp.ones(shape[:1], jnp.float32)

  def step(x, i):
    r_draw, r_noise = jax.random.split(jax.random.fold_in(r_loop, i))
    x = draw_codes(r_draw, logits_fn(x, levels[i] * ones, weights[i]), temps[i])
    noised, _ = renoise(r_noise, x, levels[i + 1] * ones, u_init)
    x = jnp.where(i < last_renoise, noised, x)
    if keep is not None:
      x = jnp.where(keep, init_x, x)
    return x, None

  x, _ = jax.lax.scan(step, x, jnp.arange(steps))
  return x


def cosine_mask_ratio(ratio: jax.Array) -> jax.Array:
  """MaskGIT's cosine schedule: the share of tokens still masked at progress `ratio` ∈ [0, 1]."""
  return jnp.cos(0.5 * jnp.pi * ratio)


def sample_mask_freeze(logits_fn: LogitsFn, rng: jax.Array, shape: tuple[int, int, int], vocab: int,
                       *, steps: int = 12, temperature: float = 1.0, choice_temperature: float = 4.5,
                       cfg: tuple[float, float] = (8.0, 8.0), cfg_steps: int | None = None
                       ) -> jax.Array:
  """MaskGIT's mask-and-freeze decoding (module docstring). shape = (B, h, w) -> int32 [B, h, w];
  the [MASK] id is `vocab`."""
  b = shape[0]
  n = shape[1] * shape[2]
  weights = guidance_schedule(steps, cfg, cfg_steps)
  x0 = jnp.full((b, n), vocab, jnp.int32)
  # floor(N₀·cos(π/2·(i + 1)/S)) with N₀ = N (all masked), in float64 on the host. A departure
  # from MaskGIT's float32, where cos(π/3) rounds below 1/2 and the floor drops a token at the
  # exact boundaries (e.g. 31 rather than 32 of 64 still masked after step 8 of 12).
  lengths = jnp.asarray(np.floor(n * np.cos(0.5 * np.pi * (np.arange(steps) + 1.0) / steps)),
                        jnp.float32)

  def step(x, i):
    r_draw, r_choice = jax.random.split(jax.random.fold_in(rng, i))
    unknown = x == vocab                                                     # [B, N]
    level = jnp.mean(unknown.astype(jnp.float32), axis=-1)                   # [B]
    logits = logits_fn(x.reshape(shape), level, weights[i]).reshape(b, n, -1).astype(jnp.float32)
    drawn = jax.random.categorical(r_draw, logits / temperature, axis=-1).astype(jnp.int32)
    drawn = jnp.where(unknown, drawn, x)
    log_p = jnp.take_along_axis(jax.nn.log_softmax(logits / temperature, axis=-1),
                                drawn[..., None], axis=-1)[..., 0]
    ratio = (i + 1.0) / steps
    mask_len = jnp.maximum(1.0, jnp.minimum(jnp.sum(unknown, -1, keepdims=True) - 1.0, lengths[i]))
    gumbel = jax.random.gumbel(r_choice, log_p.shape)
    confidence = jnp.where(unknown, log_p + choice_temperature * (1.0 - ratio) * gumbel, jnp.inf)
    cutoff = jnp.take_along_axis(jnp.sort(confidence, axis=-1),
                                 mask_len.astype(jnp.int32), axis=-1)         # [B, 1]
    remask = confidence < cutoff
    x = jnp.where((i < steps - 1) & remask, vocab, drawn)
    return x, None

  x, _ = jax.lax.scan(step, x0, jnp.arange(steps))
  return x.reshape(shape)
