"""What the image-tokenizer objectives (KL, VQ) share: PSNR, uint8 images, the PatchGAN terms, and
the `generate` / `visualize` functions that turn a reconstruction function into what `--mode eval`
and `--mode sample` show.

Shape letters: B batch, H/W height/width.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from ardiff_jax.tokenizers import losses


def psnr(x: jax.Array, y: jax.Array) -> jax.Array:
  """PSNR in dB per image for images in [-1, 1] (peak-to-peak 2). [B,H,W,C] x2 -> [B]."""
  mse = jnp.mean(jnp.square(jnp.clip(x, -1, 1) - jnp.clip(y, -1, 1)), axis=(1, 2, 3))
  return 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-12))


def to_uint8(x: jax.Array) -> jax.Array:
  """[-1, 1] float -> uint8 [0, 255]."""
  return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def adversarial_terms(disc: losses.PatchDiscriminator, disc_params, x: jax.Array,
                      x_rec: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(generator hinge loss −mean D(x̂), discriminator hinge loss) for one joint update.

  The generator term sees the discriminator through stop-gradient and the discriminator term sees
  the reconstruction through stop-gradient, so each part receives only its own gradient (Adam is
  per-parameter: this equals two optimizers up to the joint clipping norm).
  """
  frozen = jax.lax.stop_gradient(disc_params)
  g_loss = losses.generator_hinge_loss(disc.apply({"params": frozen}, x_rec))
  d_loss = losses.hinge_d_loss(disc.apply({"params": disc_params}, x),
                               disc.apply({"params": disc_params}, jax.lax.stop_gradient(x_rec)))
  return g_loss, d_loss


def reconstruction_views(reconstruct: Callable[[object, jax.Array], jax.Array]):
  """(generate, visualize) of a tokenizer from reconstruct(params, x [B,H,W,3]) -> x̂ in [-1, 1].

  generate: what `--mode eval` scores, the reconstructions of held-out images (rFID style).
  visualize: originals next to their reconstructions, 8 pairs per grid row, with PSNR.
  """

  def generate(params, frozen, batch, rng):
    del frozen, rng
    return to_uint8(reconstruct(params, batch["image"].astype(jnp.float32)))

  def visualize(params, batch, rng):
    del rng
    x = batch["image"].astype(jnp.float32)
    x_rec = reconstruct(params, x)
    pairs = jnp.stack([x, x_rec], axis=1).reshape((-1,) + x.shape[1:])
    return {"images": to_uint8(pairs), "labels": jnp.repeat(batch["label"], 2), "grid_columns": 16,
            "psnr": psnr(x, x_rec)}

  return generate, visualize
