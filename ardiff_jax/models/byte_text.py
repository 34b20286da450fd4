"""A small byte-level text encoder: the text path of the embedded Paella demo, trained with it.

Paella v2 reads captions through ByT5-XL's encoder (`last_hidden_state`, 2560 wide); a frozen
3B-parameter encoder is no CPU demo, so the embedded default trains this one beside the
predictor. Its input is ByT5's tokenisation exactly (`byte_ids`: UTF-8 byte + 3, then </s> = 1,
padded with 0), so a pretrained ByT5 can replace it without touching the data path.

    ids [B, T] -> Embed(259, D) + learned positions [T, D] -> depth × pre-LN ViT block
      (bidirectional, padding keys masked) -> LayerNorm -> [B, T, D] float32

Ours: learned absolute positions (ByT5 has T5's relative position buckets), the ViT block of
`models/vit.py` (T5 uses RMSNorm and a gated GELU), width and depth of a demo.
Shape letters: B batch, T bytes (with </s> and padding), D width.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ardiff_jax.data import captions
from ardiff_jax.models import vit

# ByT5's tokenisation lives with the data (a pipeline batches caption ids); named here as well.
PAD_ID, EOS_ID, BYTE_OFFSET, VOCAB = captions.PAD_ID, captions.EOS_ID, captions.BYTE_OFFSET, captions.VOCAB
byte_ids = captions.byte_ids


class ByteTextEncoder(nn.Module):
  """ids int32 [B, T] (ByT5 ids) -> hidden states float32 [B, T, D]; padding never attended to."""
  width: int = 128
  depth: int = 2
  num_heads: int = 4
  max_len: int = 32
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, ids: jax.Array, deterministic: bool = True) -> jax.Array:
    del deterministic  # no dropout in the demo encoder
    if ids.shape[-1] > self.max_len:
      raise ValueError(f"text of {ids.shape[-1]} ids, but the encoder's max_len is {self.max_len}")
    embed = self.param("embedding", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), ("vocab", "embed")), (VOCAB, self.width), jnp.float32)
    pos = self.param("positions", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, "embed")), (self.max_len, self.width), jnp.float32)
    x = (embed[ids] + pos[:ids.shape[-1]]).astype(self.dtype)
    keys = ids != PAD_ID
    for i in range(self.depth):
      x = vit.Block(self.width, self.num_heads, dtype=self.dtype, name=f"block_{i}")(x, keys)
    return vit.layer_norm("norm", self.dtype)(x).astype(jnp.float32)
