"""Training losses of the KL autoencoder (LDM's `LPIPSWithDiscriminator`; LPIPS is `lpips.py`).

Shape letters: B batch, H/W height/width, C channels, h'/w' discriminator patch grid.

LDM's (`ldm/modules/losses/contperceptual.py`) generator objective is

  rec   = |x - x_rec| + perceptual_weight * LPIPS(x, x_rec)             per element
  nll   = sum_elements(rec / exp(logvar) + logvar) / B                   logvar a learned scalar
  kl    = sum_{h,w,C} KL(q(z|x) || N(0, I)) / B                          (kl.kl_to_standard_normal)
  loss  = nll + kl_weight * kl + d_weight * disc_factor * (-mean(D(x_rec)))

and the discriminator minimises the hinge loss. The caller adds the LPIPS term (per image, times
the number of elements) to the per-image sum of `reconstruction_loss` before `nll_loss`.
Every loss is computed in fp32.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ardiff_jax.tokenizers.kl import group_norm

Dtype = Any

_KERNEL_INIT = nn.with_logical_partitioning(
    nn.initializers.normal(0.02), (None, None, "conv_in", "conv_out"))
_BIAS_INIT = nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",))


def reconstruction_loss(x: jax.Array, x_rec: jax.Array, kind: str = "l1") -> jax.Array:
  """Per-sample reconstruction error SUMMED over H, W, C. [B,H,W,C] x2 -> [B].

  LDM sums over pixels and averages over the batch (so the loss scale grows with image size and
  the KL weight 1e-6 is relative to that sum); we keep the sum and leave the batch mean to the
  caller.
  `kind`: "l1" (|x - x_rec|, LDM's choice) or "l2" ((x - x_rec)^2).
  """
  diff = x.astype(jnp.float32) - x_rec.astype(jnp.float32)
  if kind == "l1":
    err = jnp.abs(diff)
  elif kind == "l2":
    err = jnp.square(diff)
  else:
    raise ValueError(f"unknown reconstruction loss kind {kind!r}; valid kinds: ['l1', 'l2']")
  return jnp.sum(err, axis=tuple(range(1, err.ndim)))


def nll_loss(rec: jax.Array, logvar: jax.Array, num_elements: int) -> jax.Array:
  """Laplace/Gaussian NLL with a learned scalar log-scale, per sample. rec [B], logvar [] -> [B].

  LDM computes sum_elements(rec_elem / exp(logvar) + logvar); with a scalar logvar that equals
  rec_sum / exp(logvar) + logvar * num_elements, where `rec` is the per-sample sum from
  `reconstruction_loss` and num_elements = H * W * C.
  """
  logvar = jnp.asarray(logvar, jnp.float32)
  return rec.astype(jnp.float32) / jnp.exp(logvar) + logvar * num_elements


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """Discriminator hinge loss 0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_rec)))). -> []."""
  loss_real = jnp.mean(jax.nn.relu(1.0 - logits_real.astype(jnp.float32)))
  loss_fake = jnp.mean(jax.nn.relu(1.0 + logits_fake.astype(jnp.float32)))
  return 0.5 * (loss_real + loss_fake)


def generator_hinge_loss(logits_fake: jax.Array) -> jax.Array:
  """Generator adversarial loss -mean(D(x_rec)). -> []."""
  return -jnp.mean(logits_fake.astype(jnp.float32))


def adaptive_disc_weight(nll_grad: Any, g_grad: Any, max_weight: float = 1e4) -> jax.Array:
  """LDM's adaptive GAN weight ||d nll / d W|| / (||d g / d W|| + 1e-4), clipped to [0, 1e4].

  W is the decoder's last layer (decoder/conv_out/kernel); the gradients are pytrees or arrays.
  The result carries no gradient (LDM detaches it). Multiply by `disc_weight` (0.5 in kl-f16).
  """
  def norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(tree)))
  weight = jnp.clip(norm(nll_grad) / (norm(g_grad) + 1e-4), 0.0, max_weight)
  return jax.lax.stop_gradient(weight)


class PatchDiscriminator(nn.Module):
  """pix2pix NLayerDiscriminator (as in taming/LDM): PatchGAN logits. [B,H,W,C] -> [B,h',w',1].

  conv4x4 s2 + LeakyReLU(0.2); (n_layers - 1) x [conv4x4 s2, norm, LeakyReLU]; conv4x4 s1, norm,
  LeakyReLU; conv4x4 s1 -> 1 channel. All with padding 1, so 32 px -> 2x2 logits for n_layers 3.

  Deviation from LDM: LDM uses BatchNorm (and N(0, 0.02) init). BatchNorm keeps running statistics
  as mutable state; we use a stateless `norm` ("group": GroupNorm(norm_groups), or "none") so the
  params stay a plain pytree that EMA, sharding and checkpoints treat like any other. Kernels use
  LDM's N(0, 0.02) init. Convs followed by a norm have no bias, as in pix2pix.
  """
  ndf: int = 64
  n_layers: int = 3
  norm: str = "group"
  norm_groups: int = 32
  dtype: Dtype = jnp.float32

  def _conv(self, features: int, strides: int, use_bias: bool, name: str) -> nn.Conv:
    return nn.Conv(features, (4, 4), strides=(strides, strides), padding=((1, 1), (1, 1)),
                   use_bias=use_bias, dtype=self.dtype, param_dtype=jnp.float32,
                   kernel_init=_KERNEL_INIT, bias_init=_BIAS_INIT, name=name)

  def _norm_act(self, h: jax.Array, name: str) -> jax.Array:
    if self.norm == "group":
      h = group_norm(h, self.norm_groups, name).astype(self.dtype)
    return nn.leaky_relu(h, 0.2)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.norm not in ("group", "none"):
      raise ValueError(f"unknown discriminator norm {self.norm!r}; valid norms: ['group', 'none']")
    with_bias = self.norm == "none"
    h = nn.leaky_relu(self._conv(self.ndf, 2, True, "conv_0")(x.astype(self.dtype)), 0.2)
    for n in range(1, self.n_layers + 1):
      # The last of these keeps the resolution (stride 1), as in pix2pix.
      stride = 2 if n < self.n_layers else 1
      h = self._conv(self.ndf * min(2**n, 8), stride, with_bias, f"conv_{n}")(h)
      h = self._norm_act(h, f"norm_{n}")
    logits = self._conv(1, 1, True, f"conv_{self.n_layers + 1}")(h)
    return logits.astype(jnp.float32)
