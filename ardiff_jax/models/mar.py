"""MAR backbone (Li et al. 2024, §3.2–3.3; reference/mar.md §2.2): a bidirectional MAE-style
encoder/decoder over continuous tokens that outputs one condition z per position for DiffLoss.

Encoder: z_proj (C -> D) of the tokens, `buffer_size` leading slots filled with the class
embedding (a learned `fake_latent` for the null class), + encoder_pos_embed_learned, z_proj_ln,
then the masked positions are dropped and the remaining ones run through pre-LN ViT blocks.
Decoder: decoder_embed (D -> D), the encoder outputs scattered back into a full sequence filled with
the learned mask_token, + decoder_pos_embed_learned, blocks, then the buffer is dropped and
diffusion_pos_embed_learned added: z [B, L, D].

Fixed shapes under jit: the visible set varies with the mask ratio, so the encoder sees a gathered,
padded set of `encoder_len` slots (buffer and visible tokens first, in position order), and the
padding is masked out as attention keys. Outputs at real slots equal those of the unpadded encoder.
Init (MAR `initialize_weights`): embeddings, tokens and positional embeddings N(0, 0.02); Linear
xavier-uniform with zero bias; LayerNorm (1, 0). The DiffLoss head has its own init.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from ardiff_jax.models import layers, vit
from ardiff_jax.models.diffloss import SimpleMLPAdaLN

_normal = nn.initializers.normal(0.02)

PRESETS: dict[str, dict] = {
    # width, encoder/decoder depth, heads, DiffLoss MLP blocks × width (reference/mar.md §2.2).
    "mar_base": dict(width=768, enc_depth=12, dec_depth=12, num_heads=12, head_depth=6, head_width=1024),
    "mar_large": dict(width=1024, enc_depth=16, dec_depth=16, num_heads=16, head_depth=8, head_width=1280),
    "mar_huge": dict(width=1280, enc_depth=20, dec_depth=20, num_heads=16, head_depth=12, head_width=1536),
    # CPU sizes (ours): the digits demo and the tests.
    "mar_small": dict(width=128, enc_depth=2, dec_depth=2, num_heads=4, head_depth=2, head_width=128,
                      buffer_size=4),
    "mar_tiny": dict(width=32, enc_depth=1, dec_depth=1, num_heads=2, head_depth=1, head_width=32,
                     buffer_size=4),
}


class MAR(nn.Module):
  """tokens [B, L, C], mask [B, L] (True = masked), class embedding [B, D] -> z [B, L, D]."""
  token_dim: int
  seq_len: int
  num_classes: int
  width: int = 768
  enc_depth: int = 12
  dec_depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  dropout: float = 0.1          # attention and projection dropout
  buffer_size: int = 64
  head_depth: int = 6
  head_width: int = 1024
  remat: str = "none"           # layers.REMAT_POLICIES, for the encoder and decoder blocks
  scan_layers: bool = False     # one nn.scan per stack (parameters stacked on a "layers" axis)
  dtype: jnp.dtype = jnp.float32

  def _blocks(self, name: str, depth: int):
    """The `depth` ViT blocks of one stack: a list (loop) or one scanned module."""
    kwargs = dict(dim=self.width, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                  dropout=self.dropout, dtype=self.dtype)
    if self.scan_layers:
      return layers.scanned_stack(vit.Block, kwargs, depth, self.remat,
                                  (nn.broadcast, nn.broadcast), name)
    block = layers.remat_block(vit.Block, self.remat, static_argnums=(3,))
    return [block(**kwargs, name=f"{name}_{i}") for i in range(depth)]

  def _run(self, blocks, x, key_mask, deterministic):
    if self.scan_layers:
      return blocks(x, key_mask, deterministic)[0]
    for blk in blocks:
      x = blk(x, key_mask, deterministic)
    return x

  def setup(self):
    d, n = self.width, self.seq_len + self.buffer_size
    self.class_emb = nn.Embed(self.num_classes, d, embedding_init=nn.with_logical_partitioning(
        _normal, ("vocab", "embed")), name="class_emb")
    self.fake_latent = self.param("fake_latent", nn.with_logical_partitioning(_normal, (None, "embed")), (1, d))
    self.z_proj = vit.dense(d, (None, "embed"), "z_proj", self.dtype)
    self.z_proj_ln = vit.layer_norm("z_proj_ln", self.dtype)
    pos = lambda name, length: self.param(
        name, nn.with_logical_partitioning(_normal, (None, "length", "embed")), (1, length, d))
    self.encoder_pos_embed_learned = pos("encoder_pos_embed_learned", n)
    self.encoder_blocks = self._blocks("encoder_blocks", self.enc_depth)
    self.encoder_norm = vit.layer_norm("encoder_norm", self.dtype)
    self.decoder_embed = vit.dense(d, ("embed", "embed"), "decoder_embed", self.dtype)
    self.mask_token = self.param("mask_token", nn.with_logical_partitioning(_normal, (None, None, "embed")), (1, 1, d))
    self.decoder_pos_embed_learned = pos("decoder_pos_embed_learned", n)
    self.decoder_blocks = self._blocks("decoder_blocks", self.dec_depth)
    self.decoder_norm = vit.layer_norm("decoder_norm", self.dtype)
    self.diffusion_pos_embed_learned = pos("diffusion_pos_embed_learned", self.seq_len)
    self.diffloss = SimpleMLPAdaLN(self.token_dim, self.head_width, self.head_depth, self.dtype)

  def class_embedding(self, labels: jax.Array, use_null: jax.Array | None = None) -> jax.Array:
    """[B] labels -> [B, D]; rows where `use_null` is True get the fake latent (CFG's null class)."""
    emb = self.class_emb(labels)
    if use_null is None:
      return emb
    return jnp.where(use_null[:, None], self.fake_latent.astype(emb.dtype), emb)

  def null_embedding(self, batch: int) -> jax.Array:
    return jnp.broadcast_to(self.fake_latent, (batch, self.width))

  def __call__(self, tokens, mask, class_emb, encoder_len: int | None = None,
               deterministic: bool = True) -> jax.Array:
    b, l, _ = tokens.shape
    buf = self.buffer_size
    encoder_len = buf + l if encoder_len is None else encoder_len
    # --- encoder (MAR forward_mae_encoder)
    x = self.z_proj(tokens.astype(self.dtype))
    x = jnp.concatenate([jnp.broadcast_to(class_emb[:, None].astype(x.dtype), (b, buf, self.width)), x], 1)
    x = self.z_proj_ln(x + self.encoder_pos_embed_learned)
    masked = jnp.concatenate([jnp.zeros((b, buf), bool), mask.astype(bool)], axis=1)
    # Visible slots first, each group in position order; keep `encoder_len` of them.
    idx = jnp.argsort(masked.astype(jnp.int32), axis=1, stable=True)[:, :encoder_len]
    x = jnp.take_along_axis(x, idx[..., None], axis=1)
    valid = ~jnp.take_along_axis(masked, idx, axis=1)
    x = self._run(self.encoder_blocks, x, valid, deterministic)
    x = self.encoder_norm(x)
    # --- decoder (MAR forward_mae_decoder)
    x = self.decoder_embed(x)
    mask_token = self.mask_token.astype(x.dtype)
    x = jnp.where(valid[..., None], x, mask_token)
    full = jnp.broadcast_to(mask_token, (b, l + buf, self.width))
    full = full.at[jnp.arange(b)[:, None], idx].set(x)
    full = full + self.decoder_pos_embed_learned
    full = self._run(self.decoder_blocks, full, None, deterministic)
    full = self.decoder_norm(full)
    return full[:, buf:] + self.diffusion_pos_embed_learned

  def head(self, x_t, t, z):
    """The DiffLoss MLP: (x_t [N, C], t [N], z [N, D]) -> [N, 2C]."""
    return self.diffloss(x_t, t, z)

  def init_all(self, batch: int = 1):
    """Touches every submodule once, so `init(rng, method=MAR.init_all)` creates all parameters."""
    labels = jnp.zeros((batch,), jnp.int32)
    emb = self.class_embedding(labels, jnp.zeros((batch,), bool))
    z = self(jnp.zeros((batch, self.seq_len, self.token_dim)), jnp.zeros((batch, self.seq_len), bool), emb)
    return self.head(jnp.zeros((batch, self.token_dim)), labels, z[:, 0])


def make_mar(preset: str, *, token_dim: int, seq_len: int, num_classes: int, **overrides) -> MAR:
  if preset not in PRESETS:
    raise ValueError(f"unknown MAR preset {preset!r}; valid presets: {sorted(PRESETS)}")
  return MAR(token_dim=token_dim, seq_len=seq_len, num_classes=num_classes,
             **{**PRESETS[preset], **overrides})


def training_encoder_len(seq_len: int, buffer_size: int, mask_ratio_min: float) -> int:
  """Encoder slots needed in training: the buffer plus the most tokens a mask ratio ≥ min leaves."""
  return buffer_size + seq_len - math.ceil(seq_len * mask_ratio_min)


def sample_orders(rng: jax.Array, batch: int, seq_len: int) -> jax.Array:
  """[B, L] int32: an independent uniformly random permutation of the positions per image."""
  return jnp.argsort(jax.random.uniform(rng, (batch, seq_len)), axis=1).astype(jnp.int32)


def mask_by_order(orders: jax.Array, num_masked: jax.Array) -> jax.Array:
  """[B, L] bool: the first `num_masked` positions of each image's order are masked."""
  ranks = jnp.argsort(orders, axis=1)
  return ranks < num_masked


def sample_mask_ratio(rng: jax.Array, mask_ratio_min: float = 0.7, std: float = 0.25) -> jax.Array:
  """One ratio per batch from N(1, std²) truncated to [mask_ratio_min, 1] (MAR's scipy truncnorm)."""
  return 1.0 + std * jax.random.truncated_normal(rng, (mask_ratio_min - 1.0) / std, 0.0)


def patchify(latents: jax.Array, patch: int) -> jax.Array:
  """[B, h, w, C] -> [B, (h/p)(w/p), p·p·C], row-major positions, channel-major within a patch (MAR)."""
  b, h, w, c = latents.shape
  x = latents.reshape(b, h // patch, patch, w // patch, patch, c)
  x = x.transpose(0, 1, 3, 5, 2, 4)                     # b, h', w', c, p, p
  return x.reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpatchify(tokens: jax.Array, patch: int, channels: int) -> jax.Array:
  """Inverse of `patchify`: [B, L, p·p·C] -> [B, h, w, C] for a square token grid."""
  b, l, _ = tokens.shape
  side = int(round(math.sqrt(l)))
  x = tokens.reshape(b, side, side, channels, patch, patch).transpose(0, 1, 4, 2, 5, 3)
  return x.reshape(b, side * patch, side * patch, channels)


@dataclasses.dataclass(frozen=True)
class ARSchedule:
  """MAR's cosine schedule over N AR steps, fixed in advance (it depends only on L and N).

  Step k predicts the positions order[starts[k] : ends[k]]; `cfg_mask_len[k]` is the clamped
  mask_len that MAR's linear CFG schedule reads (1 at the last step, where all the rest is predicted).
  """
  starts: tuple[int, ...]
  ends: tuple[int, ...]
  cfg_mask_len: tuple[int, ...]

  @property
  def max_per_step(self) -> int:
    return max(e - s for s, e in zip(self.starts, self.ends))


def cosine_schedule(seq_len: int, num_steps: int) -> ARSchedule:
  """mask_len_k = max(1, min(remaining − 1, ⌊L·cos(π/2·(k+1)/N)⌋)); the last step predicts the rest."""
  starts, ends, cfg_len = [], [], []
  remaining = seq_len
  for k in range(num_steps):
    mask_len = max(1, min(remaining - 1, math.floor(seq_len * math.cos(math.pi / 2 * (k + 1) / num_steps))))
    start = 0 if k == num_steps - 1 else mask_len
    starts.append(start)
    ends.append(remaining)
    cfg_len.append(mask_len)
    remaining = start
  return ARSchedule(tuple(starts), tuple(ends), tuple(cfg_len))
