"""LlamaGen's class-conditional sampler over VQ codes (reference/llamagen_star.md §1.4,
`autoregressive/models/generate.py`): prefill the class token, then one code per step against a
static KV cache, all in one `lax.scan` (no host sync).

Classifier-free guidance (when cfg_scale > 1, as LlamaGen) stacks the null class (row
`num_classes`) as a second half of the batch and mixes in logit space, ℓ = ℓ_u + s(ℓ_c − ℓ_u);
with `cfg_interval` ≥ 0 the decode steps after that index use ℓ_c alone (the prefilled first code
is always guided). Each step divides the logits by the temperature, keeps the top-k and the
top-p nucleus (`filter_logits`), and draws from the softmax.

Shape letters: B batch, L codes per image (h·w, raster order), V vocabulary.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ardiff_jax.models.gpt import GPT


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """LlamaGen's `top_k_top_p_filtering` on logits [N, V] (float32): top_k > 0 sets every logit
  below the k-th largest to −inf (ties kept); top_p < 1 sorts the rest, and removes every token
  whose cumulative softmax mass *before* it already exceeds top_p (so the first token past the
  threshold stays, and at least one token always does)."""
  logits = logits.astype(jnp.float32)
  if top_k > 0:
    k = min(int(top_k), logits.shape[-1])
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove_sorted = jnp.concatenate([jnp.zeros_like(cumulative[..., :1], bool),
                                     cumulative[..., :-1] > top_p], axis=-1)
    remove = jnp.take_along_axis(remove_sorted, jnp.argsort(order, axis=-1), axis=-1)
    logits = jnp.where(remove, -jnp.inf, logits)
  return logits


def draw(rng: jax.Array, logits: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
  """One code per row from logits [N, V]: temperature, then the filters, then a categorical draw
  (LlamaGen's `sample`; the temperature is floored at 1e-5 as there). -> int32 [N]."""
  logits = filter_logits(logits / max(float(temperature), 1e-5), top_k, top_p)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def sample_codes(model: GPT, params, labels: jax.Array, rng: jax.Array, *, cfg_scale: float = 1.0,
                 cfg_interval: int = -1, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, token_table: jax.Array | None = None,
                 prefix: jax.Array | None = None) -> jax.Array:
  """labels int32 [B] -> codes int32 [B, L] in raster order. `token_table` [V, C]: the model
  reads codebook vectors (`GPT.input_dim`), so each drawn code is fed as its row. `prefix` int32
  [B, P]: the first P codes are given (prefilled with the class token in one cached step) and
  only codes P … L − 1 are drawn (DD2's teacher completing a one-step generator's tokens)."""
  b, l = labels.shape[0], model.seq_len
  given = 0 if prefix is None else prefix.shape[1]
  apply = lambda *a, **kw: model.apply({"params": params}, *a, **kw)
  use_cfg = cfg_scale > 1.0
  cond = jnp.concatenate([labels, jnp.full_like(labels, model.num_classes)]) if use_cfg else labels

  def guided(logits, step):
    """[B', V] -> [B, V]: the CFG mix (or the conditional half) at code index `step`."""
    if not use_cfg:
      return logits
    cond_l, uncond_l = logits[:b], logits[b:]
    mixed = uncond_l + (cond_l - uncond_l) * cfg_scale
    if cfg_interval < 0:
      return mixed
    # LlamaGen's decode loop counts from the second code: index `step` is decode step step − 1.
    return jnp.where(step - 1 > cfg_interval, cond_l, mixed)

  cache = apply(cond.shape[0], method=GPT.init_cache)
  first = apply(cond, method=GPT.embed_class)                         # [B', 1, D]
  if given:
    fed = jnp.concatenate([prefix, prefix]) if use_cfg else prefix
    fed = fed if token_table is None else token_table[fed]
    first = jnp.concatenate([first, apply(fed, method=GPT.embed_tokens)], axis=1)
  z, cache = apply(first, 0, cache, method=GPT.decode_step)

  def step(carry, i):
    z, cache, codes, key = carry                        # z [B', D]: the condition of code i
    key, sub = jax.random.split(key)
    code = draw(sub, guided(apply(z, method=GPT.logits), i), temperature, top_k, top_p)   # [B]
    codes = codes.at[:, i].set(code)
    fed = jnp.concatenate([code, code]) if use_cfg else code
    fed = fed[:, None] if token_table is None else token_table[fed][:, None]
    z_next, cache = apply(apply(fed, method=GPT.embed_tokens), i + 1, cache,
                          method=GPT.decode_step)
    return (z_next[:, 0], cache, codes, key), None

  codes = jnp.zeros((b, l), jnp.int32)
  if given:
    codes = codes.at[:, :given].set(prefix.astype(jnp.int32))
  init = (z[:, -1], cache, codes, rng)
  (_, _, codes, _), _ = jax.lax.scan(step, init, jnp.arange(given, l))
  return codes
