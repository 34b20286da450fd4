"""LlamaGen's class-conditional GPT (reference/llamagen_star.md §1.2), over VQ codes or continuous tokens.

Sequence: [class token, x_1 … x_{L−1}] (teacher forcing); the hidden state at position i is the
condition for token i: with `vocab_size` > 0 (LlamaGen) the tokens are codes, embedded by a
`tok_embeddings` table [V, D] and predicted by the bias-free, zero-initialised `output` layer
(logits [B, L, V]); with `vocab_size` = 0 they are continuous [B, L, C], embedded by a linear
layer and modelled by MAR's DiffLoss head (the condition-refinement paper's "GPT").
Block (Llama): h += Drop(W_o · Attn(RoPE₂D(RMSNorm(h)))), h += Drop(W₂(SiLU(W₁ x) ⊙ W₃ x)) with
x = RMSNorm(h); RMSNorm eps 1e-5 in float32; bias-free projections, fused W_qkv; SwiGLU hidden
int(2·4D/3) rounded up to a multiple of 256. 2D RoPE: half of each head's pairs rotate with the
row index, half with the column index (base 10000), on *interleaved* pairs (x[2i], x[2i+1]);
the class-token prefix gets the all-zero table (cos = sin = 0), LlamaGen's quirk that zeroes its
query and key. Class table: num_classes + 1 rows, the last one the null class for CFG.
Dropout: token-embedding 0.1, residual 0.1 (after W_o), FFN 0.1 (once, after W₂), no
attention-probability dropout. Under a bf16 compute dtype the projections run in bf16 while the
residual stream, the norms and the attention logits stay float32, as under LlamaGen's autocast.
Init: Linear and embeddings N(0, 0.02).
Decoding uses a static per-layer KV cache (`decode_step`), equal to the full causal forward.

Codebook-vector inputs (`input_dim` = C > 0; DD2 App. E.4): the tokens fed are codebook vectors
[B, L, C] (a VQ code's entry, or any point near one), embedded by `tok_mlp` (Linear C→D, SiLU,
Linear D→D; DD2 names "an MLP", the shape is ours) instead of the table. With `vocab_size` > 0
the output stays the V-way `output` layer: the teacher a one-step generator's continuous tokens
can condition (`methods/dd2_adapt.py` fits the MLP to the table); with `vocab_size` = 0 the
DiffLoss head predicts the next vector (DD2's AR-diffusion model, `methods/dd2_tune.py`).

Random order (`random_order=True`, MAR Table 1's "AR, random order, causal"): the sequence is
[class, x_{o_1} … x_{o_{L−1}}] for a permutation o per image; each input is rotated by RoPE at its
own grid position (the class token keeps the zero row) and gets a learned embedding of the
position it must predict next (`target_pos_embed[o_k]`, our choice after σ-GPT / RandAR: a
causal model cannot otherwise know which token comes next). The conditions are returned in grid
order, so the loss and the head do not see the permutation.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ardiff_jax.models import layers, vit
from ardiff_jax.models.diffloss import SimpleMLPAdaLN

_init = nn.initializers.normal(0.02)

PRESETS: dict[str, dict] = {
    # layers / width / heads (LlamaGen c2i sizes); the DiffLoss head as MAR's B/L/H/H.
    "gpt_b": dict(depth=12, width=768, num_heads=12, head_depth=6, head_width=1024),
    "gpt_l": dict(depth=24, width=1024, num_heads=16, head_depth=8, head_width=1280),
    "gpt_xl": dict(depth=36, width=1280, num_heads=20, head_depth=12, head_width=1536),
    "gpt_xxl": dict(depth=48, width=1536, num_heads=24, head_depth=12, head_width=1536),
    "gpt_3b": dict(depth=24, width=3200, num_heads=32, head_depth=12, head_width=1536),
    # CPU sizes (ours).
    "gpt_small": dict(depth=4, width=128, num_heads=4, head_depth=2, head_width=128),
    "gpt_tiny": dict(depth=1, width=32, num_heads=2, head_depth=1, head_width=32),
}


def make_gpt(preset: str, *, token_dim: int, seq_len: int, num_classes: int, **overrides) -> "GPT":
  if preset not in PRESETS:
    raise ValueError(f"unknown GPT preset {preset!r}; valid presets: {sorted(PRESETS)}")
  return GPT(token_dim=token_dim, seq_len=seq_len, num_classes=num_classes,
             **{**PRESETS[preset], **overrides})


def middle_block(depth: int) -> int:
  """The 1-based block ST-AR reads features from by default: depth // 2 (6 of GPT-B's 12), ≥ 1."""
  return max(depth // 2, 1)


def ffn_hidden(width: int, multiple_of: int = 256) -> int:
  hidden = int(2 * 4 * width / 3)
  return multiple_of * math.ceil(hidden / multiple_of)


def rope_2d_table(grid: int, head_dim: int, cls_tokens: int = 1, base: float = 10000.0) -> np.ndarray:
  """[cls_tokens + grid², head_dim/2, 2] (cos, sin) per interleaved pair; zero rows for the prefix."""
  half = head_dim // 2
  freqs = 1.0 / (base ** (np.arange(0, half, 2)[: half // 2].astype(np.float64) / half))
  t = np.arange(grid, dtype=np.float64)
  f = np.outer(t, freqs)                                            # [grid, half/2]
  grid_f = np.concatenate([np.broadcast_to(f[:, None, :], (grid, grid, half // 2)),
                           np.broadcast_to(f[None, :, :], (grid, grid, half // 2))], axis=-1)
  table = np.stack([np.cos(grid_f), np.sin(grid_f)], axis=-1).reshape(grid * grid, half, 2)
  return np.concatenate([np.zeros((cls_tokens, half, 2)), table]).astype(np.float32)


def apply_rope(x: jax.Array, table: jax.Array) -> jax.Array:
  """x [B, T, H, hd] rotated pairwise by table [T, hd/2, 2] or, one row set per image,
  [B, T, hd/2, 2] (interleaved pairs, gpt-fast style)."""
  xs = x.astype(jnp.float32).reshape(x.shape[:-1] + (-1, 2))
  table = table[None] if table.ndim == 3 else table
  cos, sin = table[:, :, None, :, 0], table[:, :, None, :, 1]
  out = jnp.stack([xs[..., 0] * cos - xs[..., 1] * sin, xs[..., 1] * cos + xs[..., 0] * sin], -1)
  return out.reshape(x.shape).astype(x.dtype)


class RMSNorm(nn.Module):
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x):
    w = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                   (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (y * w).astype(x.dtype)


def _dense(features, axes, name, dtype):
  return vit.dense(features, axes, name, dtype, use_bias=False, init=_init)


class TokenMLP(nn.Module):
  """Codebook vectors [..., C] -> token embeddings [..., D]: Linear, SiLU, Linear (N(0, 0.02))."""
  width: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = vit.dense(self.width, (None, "mlp"), "fc1", self.dtype, init=_init)(x.astype(self.dtype))
    return vit.dense(self.width, ("mlp", "embed"), "fc2", self.dtype, init=_init)(nn.silu(h))


class Block(nn.Module):
  width: int
  num_heads: int
  dropout: float = 0.1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, rope, cache=None, cache_index=None, deterministic=True, key_mask=None):
    """x [B, T, D] float32 (the residual stream); rope [T, hd/2, 2] or [B, T, hd/2, 2]. The
    projections compute in `dtype`, the residual adds stay float32 (as torch autocast does), and
    attention logits accumulate in float32. Without a cache: causal attention over the T positions,
    and with `key_mask` [B, T] bool (False: no query may attend to that key, ST-AR's attention
    masking; one mask for every head) on top of the causal mask. With cache (k, v) [B, S, H, hd]:
    writes this step's keys/values at `cache_index` and attends to positions ≤ cache_index + t.
    Returns (x, new cache)."""
    b, t, _ = x.shape
    hd = self.width // self.num_heads
    h = RMSNorm(name="attention_norm")(x)
    qkv = _dense(3 * self.width, ("embed", "heads"), "wqkv", self.dtype)(h)
    q, k, v = (a.reshape(b, t, self.num_heads, hd) for a in jnp.split(qkv, 3, axis=-1))
    q, k = apply_rope(q, rope), apply_rope(k, rope)
    if cache is None:
      keys, values = k, v
      allowed = jnp.tril(jnp.ones((t, t), bool))[None, None]
      if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]
    else:
      ck, cv = cache
      keys = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, cache_index, 0, 0))
      values = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, cache_index, 0, 0))
      cache = (keys, values)
      q_pos = cache_index + jnp.arange(t)
      allowed = (jnp.arange(keys.shape[1])[None, :] <= q_pos[:, None])[None, None]
    probs = vit.attention_weights(q, keys, allowed)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), values).reshape(b, t, self.width)
    out = _dense(self.width, ("heads", "embed"), "wo", self.dtype)(out)
    x = x + nn.Dropout(self.dropout)(out, deterministic=deterministic)
    h = RMSNorm(name="ffn_norm")(x)
    hidden = ffn_hidden(self.width)
    g = nn.silu(_dense(hidden, ("embed", "mlp"), "w1", self.dtype)(h)) * \
        _dense(hidden, ("embed", "mlp"), "w3", self.dtype)(h)
    g = _dense(self.width, ("mlp", "embed"), "w2", self.dtype)(g)
    x = x + nn.Dropout(self.dropout)(g, deterministic=deterministic)   # LlamaGen: once, after w2
    return nn.with_logical_constraint(x, ("batch", "length", "embed")), cache


class GPT(nn.Module):
  """(tokens [B, L] int codes | [B, L, C] floats, labels [B]) -> conditions [B, L, D]; `logits`
  (codes) or `head` (continuous) turns them into predictions."""
  token_dim: int                 # C of continuous tokens (unused for codes)
  seq_len: int
  num_classes: int
  vocab_size: int = 0            # > 0: VQ codes in [0, V) (LlamaGen); 0: continuous tokens
  input_dim: int = 0             # > 0: codebook vectors [.., C] in, via tok_mlp (DD2)
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  dropout: float = 0.1           # token-embedding, residual and FFN dropout
  head_depth: int = 6            # DiffLoss MLP (MAR's head; the condition-refinement paper's "GPT-XL")
  head_width: int = 1024
  random_order: bool = False     # learn `target_pos_embed` and train/sample in random orders
  remat: str = "none"            # layers.REMAT_POLICIES, for the transformer blocks
  scan_layers: bool = False      # one nn.scan over the blocks (parameters stacked on "layers")
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    if self.vocab_size and self.random_order:
      raise ValueError("random_order is implemented for continuous tokens only")
    if not self.vocab_size:
      self.diffloss = SimpleMLPAdaLN(self.token_dim, self.head_width, self.head_depth, self.dtype)
    if self.random_order:
      self.target_pos_embed = self.param(
          "target_pos_embed", nn.with_logical_partitioning(_init, ("length", "embed")),
          (self.seq_len, self.width))
    self.cls_embedding = nn.Embed(self.num_classes + 1, self.width, name="cls_embedding",
                                  embedding_init=nn.with_logical_partitioning(_init, ("vocab", "embed")))
    if self.input_dim:
      self.tok_mlp = TokenMLP(self.width, self.dtype, name="tok_mlp")
    elif self.vocab_size:
      self.tok_embeddings = nn.Embed(
          self.vocab_size, self.width, name="tok_embeddings",
          embedding_init=nn.with_logical_partitioning(_init, ("vocab", "embed")))
    else:
      self.tok_embeddings = _dense(self.width, (None, "embed"), "tok_embeddings", self.dtype)
    if self.vocab_size:
      self.output = vit.dense(self.vocab_size, ("embed", "vocab"), "output", self.dtype,
                              use_bias=False, init=nn.initializers.zeros_init())
    kwargs = dict(width=self.width, num_heads=self.num_heads, dropout=self.dropout, dtype=self.dtype)
    if self.scan_layers:   # per layer: rope, cache index and flag broadcast, the KV cache sliced
      self.layers = layers.scanned_stack(Block, kwargs, self.depth, self.remat,
                                         (nn.broadcast, 0, nn.broadcast, nn.broadcast), "layers")
    else:
      block = layers.remat_block(Block, self.remat, static_argnums=(5,))
      self.layers = [block(**kwargs, name=f"layers_{i}") for i in range(self.depth)]
    self.norm = RMSNorm(name="norm")
    self.tok_dropout = nn.Dropout(self.dropout)
    grid = int(round(math.sqrt(self.seq_len)))
    if grid * grid != self.seq_len:
      raise ValueError(f"seq_len={self.seq_len} is not a square token grid")
    self.rope = jnp.asarray(rope_2d_table(grid, self.width // self.num_heads))

  def embed(self, tokens, labels, deterministic):
    """[class, x_1 … x_{T−1}] embeddings: labels [B] (num_classes = null), tokens [B, T−1, C]."""
    x = jnp.concatenate([self.embed_class(labels), self.embed_tokens(tokens)], axis=1)
    return self.tok_dropout(x, deterministic=deterministic)

  def __call__(self, tokens, labels, deterministic: bool = True, order=None):
    """Teacher forcing: tokens [B, L] (codes) or [B, L, C] -> z [B, L, D] float32 in grid order,
    z_p conditioning token p on the tokens before it in `order` [B, L] (a permutation per image;
    None = raster)."""
    if order is None:
      x = self.embed(tokens[:, :-1], labels, deterministic)
      rope = self.rope[: x.shape[1]]
      order = jnp.broadcast_to(jnp.arange(self.seq_len), tokens.shape[:1] + (self.seq_len,))
      raster = True
    else:
      seq = jnp.take_along_axis(tokens, order[:, :-1, None], axis=1)
      x = self.embed(seq, labels, deterministic)
      rope = self.rope_rows(jnp.concatenate([jnp.full_like(order[:, :1], -1), order[:, :-1]], 1))
      raster = False
    if self.random_order:
      x = x + self.target_embed(order)
    x, _, _ = self._run_layers(x, rope, None, None, deterministic)
    z = self.norm(x)
    if raster:
      return z
    return jnp.take_along_axis(z, jnp.argsort(order, axis=1)[..., None], axis=1)

  def _run_layers(self, x, rope, cache, cache_index, deterministic, key_mask=None, capture=0):
    """All blocks: x [B, T, D] -> (x, new cache or None, x after block `capture` or None).
    `cache` as `init_cache` makes it; `key_mask` [B, T] (every block) or [depth, B, T] (one per
    block) bool, see `Block`; `capture` is 1-based (0: nothing captured)."""
    if self.scan_layers:
      if key_mask is not None or capture:
        raise ValueError("attention key masks and intermediate features need the unscanned "
                         "blocks: set scan_layers=False")
      x, cache = self.layers(x, rope, cache, cache_index, deterministic)
      return x, cache, None
    new_cache, captured = [], None
    for i, layer in enumerate(self.layers):
      mask = key_mask[i] if key_mask is not None and key_mask.ndim == 3 else key_mask
      x, c = layer(x, rope, None if cache is None else cache[i], cache_index, deterministic, mask)
      new_cache.append(c)
      if i + 1 == capture:
        captured = x
    return x, None if cache is None else new_cache, captured

  def hidden_states(self, codes, labels, deterministic: bool = True, key_mask=None, capture: int = 0):
    """Raster teacher forcing with the states ST-AR reads: codes [B, L] (or continuous [B, L, C]),
    labels [B], key_mask None | [B, L] | [depth, B, L] bool over the input slots [class, x_1 …
    x_{L−1}] (True: may be attended to) -> {"last": [B, L, D] the last block's output (before the
    final RMSNorm), "z": the conditions norm(last) that `logits` reads, "mid": the output of block
    `capture` (1-based), present when capture > 0}."""
    if not 0 <= capture <= self.depth:
      raise ValueError(f"capture={capture}: blocks are numbered 1..{self.depth}")
    x = self.embed(codes[:, :-1], labels, deterministic)
    last, _, mid = self._run_layers(x, self.rope[: x.shape[1]], None, None, deterministic,
                                    key_mask, capture)
    out = {"last": last, "z": self.norm(last)}
    if capture:
      out["mid"] = mid
    return out

  def rope_rows(self, positions):
    """RoPE rows [.., hd/2, 2] of the tokens at grid `positions` (−1: the class token's zero row)."""
    return self.rope[positions + 1]

  def target_embed(self, positions):
    """[B, T, D]: the learned embedding of the grid position each input slot predicts next."""
    return self.target_pos_embed[positions].astype(jnp.float32)

  def head(self, x_t, t, z):
    """The DiffLoss MLP: (x_t [N, C], t [N], z [N, D]) -> [N, 2C]."""
    return self.diffloss(x_t, t, z)

  def logits(self, z):
    """Next-code logits [..., V] (float32) from conditions z [..., D] (codes only)."""
    return self.output(z).astype(jnp.float32)

  def init_all(self, batch: int = 1):
    labels = jnp.zeros((batch,), jnp.int32)
    if self.input_dim:
      tokens = jnp.zeros((batch, self.seq_len, self.input_dim))
    elif self.vocab_size:
      tokens = jnp.zeros((batch, self.seq_len), jnp.int32)
    else:
      tokens = jnp.zeros((batch, self.seq_len, self.token_dim))
    z = self(tokens, labels)
    if self.vocab_size:
      return self.logits(z)
    return self.head(jnp.zeros((batch, self.token_dim)), jnp.zeros((batch,), jnp.int32), z[:, 0])

  def init_cache(self, batch: int, dtype=jnp.float32):
    """Per-layer (k, v) [B, L+1, H, hd]: the class token, L−1 teacher tokens and one spare slot,
    so the decode loop can run a uniform L steps. A list of pairs; with scan_layers one pair of
    [depth, B, L+1, H, hd] arrays."""
    hd = self.width // self.num_heads
    shape = (batch, self.seq_len + 1, self.num_heads, hd)
    if self.scan_layers:
      return (jnp.zeros((self.depth,) + shape, dtype), jnp.zeros((self.depth,) + shape, dtype))
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(self.depth)]

  def decode_step(self, x_emb, index, cache, rope=None):
    """One cached step: x_emb [B, T, D] at sequence slots index..index+T−1 -> (z [B, T, D], cache).
    `rope` [B, T, hd/2, 2] gives each image's rows (random order); None: raster rows."""
    if rope is None:
      rope = jax.lax.dynamic_slice_in_dim(self.rope, index, x_emb.shape[1], axis=0)
    x_emb, new_cache, _ = self._run_layers(x_emb, rope, cache, index, True)
    return self.norm(x_emb), new_cache

  # The residual stream is float32 whatever the compute dtype (LlamaGen under bf16 autocast: the
  # embeddings are float32 and each residual add promotes the bf16 branch output to float32).
  def embed_class(self, labels):
    return self.cls_embedding(labels)[:, None].astype(jnp.float32)

  def embed_tokens(self, tokens):
    """tokens [B, T] int codes or [B, T, C] -> embeddings [B, T, D] float32."""
    if self.input_dim:
      return self.tok_mlp(tokens.astype(jnp.float32)).astype(jnp.float32)
    if self.vocab_size:
      return self.tok_embeddings(tokens).astype(jnp.float32)
    return self.tok_embeddings(tokens.astype(self.dtype)).astype(jnp.float32)
