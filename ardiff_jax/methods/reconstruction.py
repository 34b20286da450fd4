"""What the image-tokenizer objectives (KL, VQ) share: PSNR, uint8 images, the LPIPS and PatchGAN
terms, and the `generate` / `visualize` functions that turn a reconstruction function into what `--mode eval`
and `--mode sample` show.

Shape letters: B batch, H/W height/width.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from ardiff_jax.tokenizers import losses
from ardiff_jax.tokenizers import lpips


def psnr(x: jax.Array, y: jax.Array) -> jax.Array:
  """PSNR in dB per image for images in [-1, 1] (peak-to-peak 2). [B,H,W,C] x2 -> [B]."""
  mse = jnp.mean(jnp.square(jnp.clip(x, -1, 1) - jnp.clip(y, -1, 1)), axis=(1, 2, 3))
  return 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-12))


def to_uint8(x: jax.Array) -> jax.Array:
  """[-1, 1] float -> uint8 [0, 255]."""
  return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def perceptual_loss(tcfg: ml_collections.ConfigDict, image_size: int
                    ) -> Callable[[jax.Array, jax.Array], jax.Array] | None:
  """(x, x̂) [B,H,W,3] -> LPIPS [B] with the user's weights, or None: the perceptual term is off.

  Off when `tcfg.perceptual_weight` is 0 (or absent: a run saved before LPIPS existed trained
  without it), and, with a warning, when `tcfg.lpips_vgg16` / `tcfg.lpips_lin` are unset, since
  LPIPS weights are never bundled or downloaded. A path that is set but wrong is an error. The
  LPIPS weights enter the jitted step as constants: they are not trained and not checkpointed.
  Objectives call this when their loss is first built (`lazy_perceptual_loss`), so restoring a
  tokenizer to encode or decode never reads VGG16.
  """
  if not tcfg.get("perceptual_weight", 0.0):
    return None
  if not (tcfg.get("lpips_vgg16", "") and tcfg.get("lpips_lin", "")):
    logging.warning(
        "tokenizer.perceptual_weight=%s, but tokenizer.lpips_vgg16 and tokenizer.lpips_lin are not "
        "both set: training without the perceptual term (weight 0). To train with LPIPS, point them "
        "at torchvision's vgg16-397923af.pth and LPIPS's vgg.pth (never downloaded here).",
        tcfg.perceptual_weight)
    return None
  if image_size < 16:
    raise ValueError(f"data.image_size={image_size}: LPIPS's VGG16 pools four times and needs at "
                     "least 16 px; set tokenizer.perceptual_weight=0 for smaller images")
  variables = jax.device_put(lpips.load_variables(
      tcfg.lpips_vgg16, tcfg.lpips_lin, vgg16_field="tokenizer.lpips_vgg16",
      lin_field="tokenizer.lpips_lin"))
  net = lpips.LPIPS()
  return lambda x, x_rec: net.apply(variables, x, x_rec)


def lazy_perceptual_loss(tcfg: ml_collections.ConfigDict, image_size: int):
  """() -> `perceptual_loss(tcfg, image_size)`, computed on the first call only (so the warning of
  an unset LPIPS is logged once per run)."""
  return functools.cache(lambda: perceptual_loss(tcfg, image_size))


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
