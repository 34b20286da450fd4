"""E_φ, condition refinement's inverse encoder (methods/condref.py): from a ground-truth token and
its position to the condition the DiffLoss head would want for it."""
import flax.linen as nn
import jax.numpy as jnp

from ardiff_jax.models import vit


class InverseEncoder(nn.Module):
  """E_φ(x_gt [n, C], position [n]) -> ideal condition [n, D]: a residual MLP with a learned
  position table (LayerNorm, GELU, xavier-uniform, as the ViT blocks)."""
  cond_dim: int
  seq_len: int
  width: int = 256
  depth: int = 2

  @nn.compact
  def __call__(self, x, positions):
    table = self.param("pos_embed", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, "embed")), (self.seq_len, self.width))
    h = vit.dense(self.width, (None, "embed"), "in_proj")(x.astype(jnp.float32)) + table[positions]
    for i in range(self.depth):
      h = h + vit.dense(self.width, ("embed", "mlp"), f"mlp_{i}")(
          nn.gelu(vit.layer_norm(f"norm_{i}")(h), approximate=False))
    return vit.dense(self.cond_dim, ("embed", None), "out_proj")(vit.layer_norm("norm_out")(h))
