"""Training objective of the KL tokenizer (LDM AutoencoderKL, network in tokenizers/kl.py), as a `Method`.

Loss (LDM `LPIPSWithDiscriminator`):
  L = mean_B[ rec/exp(s) + s·HWC ] + w_kl · mean_B[ KL(q(z|x) ‖ N(0, I)) ]
      + 1[step ≥ disc_start] · ( w_d · L_G^hinge + L_D^hinge )
with rec the per-image sum over its HWC elements of |x − x̂| (or squared error) + w_p·LPIPS(x, x̂)
(LDM adds the per-image LPIPS to every element), s a learned scalar log-variance, and the
posterior *sampled* for the reconstruction. LPIPS reads the user's weights
(`tokenizer.lpips_vgg16`, `tokenizer.lpips_lin`); without them w_p is 0 and the log says so once
(`reconstruction.perceptual_loss`). The discriminator and the autoencoder share one
optimizer update: the generator term sees the discriminator through stop-gradient and the
discriminator term sees the reconstruction through stop-gradient, so each part receives only its
own gradient (Adam is per-parameter, so this equals two optimizers up to the joint clipping norm).
LDM scales the adversarial term by an adaptive weight ‖∇L_rec‖/‖∇L_G‖ at the decoder's last
layer; we use the fixed `tokenizer.disc_weight` instead and say so here.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ardiff_jax import configlib
from ardiff_jax.methods import Method
from ardiff_jax.methods import reconstruction as rec_lib
from ardiff_jax.tokenizers import kl as kl_lib
from ardiff_jax.tokenizers import losses


def build_autoencoder(tcfg: ml_collections.ConfigDict,
                      compute_dtype: str = "float32") -> kl_lib.AutoencoderKL:
  """The AutoencoderKL of a `tokenizer` config section (its preset and overrides)."""
  return kl_lib.make_autoencoder(tcfg.preset, dtype=jnp.dtype(compute_dtype), **configlib.overrides(tcfg))


def make_method(config: ml_collections.ConfigDict) -> Method:
  tcfg = config.tokenizer
  ae = build_autoencoder(tcfg, config.train.compute_dtype)
  disc = losses.PatchDiscriminator(ndf=tcfg.disc_ndf, n_layers=tcfg.disc_layers) if tcfg.disc_enabled else None
  size = config.data.image_size
  perceptual_loss = rec_lib.lazy_perceptual_loss(tcfg, size)

  def init_params(rng):
    x = jnp.zeros((1, size, size, 3), jnp.float32)
    r_ae, r_sample, r_disc = jax.random.split(rng, 3)
    params = {"ae": ae.init(r_ae, x, r_sample)["params"],
              "logvar": jnp.full((), tcfg.logvar_init, jnp.float32)}
    if disc is not None:
      params["disc"] = disc.init(r_disc, x)["params"]
    return params

  def loss_fn(params, batch, rng, step, extras):
    x = batch["image"].astype(jnp.float32)
    x_rec, moments = ae.apply({"params": params["ae"]}, x, rng)
    x_rec = x_rec.astype(jnp.float32)
    num_elements = int(np.prod(x.shape[1:]))
    rec = losses.reconstruction_loss(x, x_rec, tcfg.rec_loss)               # [B]
    metrics = {"rec_loss": jnp.mean(rec) / num_elements}
    perceptual = perceptual_loss()
    if perceptual is not None:
      p_loss = perceptual(x, x_rec)                                         # [B]
      rec = rec + tcfg.perceptual_weight * p_loss * num_elements
      metrics["perceptual_loss"] = jnp.mean(p_loss)
    nll = losses.nll_loss(rec, params["logvar"], num_elements=num_elements)  # [B]
    kl = kl_lib.kl_to_standard_normal(moments)                              # [B]
    loss = jnp.mean(nll) + tcfg.kl_weight * jnp.mean(kl)
    metrics.update(kl=jnp.mean(kl), logvar=params["logvar"], psnr=jnp.mean(rec_lib.psnr(x, x_rec)))
    if disc is not None:
      on = (step >= tcfg.disc_start).astype(jnp.float32)
      g_loss, d_loss = rec_lib.adversarial_terms(disc, params["disc"], x, x_rec)
      loss = loss + on * (tcfg.disc_weight * g_loss + d_loss)
      metrics.update(g_loss=g_loss, d_loss=d_loss)
    return loss, metrics, extras

  cache_ae = build_autoencoder(tcfg, tcfg.get("cache_dtype", "float32"))

  def encode(params, images):
    """What `--mode cache` stores: posterior moments [B,h,w,2E] from the encoder run in
    `tokenizer.cache_dtype` (float32 unless asked: the tokens a generator regresses keep every
    bit), whatever the training compute dtype."""
    return cache_ae.apply({"params": params["ae"]}, images, method=cache_ae.encode)

  def reconstruct(params, x):
    """[B,H,W,3] in [-1, 1] -> decode(posterior mode(encode(x))), clipped to [-1, 1]."""
    x_rec = ae.apply({"params": params["ae"]}, kl_lib.posterior_mode(encode(params, x)),
                     method=ae.decode)
    return jnp.clip(x_rec.astype(jnp.float32), -1, 1)

  generate, visualize = rec_lib.reconstruction_views(reconstruct)

  return Method(name="kl_tokenizer", model=ae, init_params=init_params, loss_fn=loss_fn,
                batch_keys=("image",), visualize=visualize, encode=encode, generate=generate,
                generate_from="images")


def tokenizer_config(preset: str = "kl_tiny") -> ml_collections.ConfigDict:
  """Defaults of the `tokenizer` config section (LDM kl-f16 loss settings unless noted)."""
  t = ml_collections.ConfigDict()
  t.preset = preset
  t.overrides = ml_collections.ConfigDict()   # AutoencoderKL fields to change in the preset
  t.rec_loss = "l1"
  t.perceptual_weight = 1.0                  # LPIPS; 0 (logged) while the files below are unset
  t.lpips_vgg16 = ""                         # torchvision's vgg16-397923af.pth (user-supplied)
  t.lpips_lin = ""                           # LPIPS's vgg.pth: the linear layers (user-supplied)
  t.kl_weight = 1e-6
  t.logvar_init = 0.0
  t.disc_enabled = False
  t.disc_start = 50001
  t.disc_weight = 0.5
  t.disc_ndf = 64
  t.disc_layers = 3
  t.latent_scale = 1.0                       # 0.2325 for KL-16 (MAR); consumers multiply tokens by it
  t.cache_dtype = "float32"                  # the encoder's compute dtype in --mode cache (MAR's
                                             # main_cache.py: float32; "bfloat16" loses ~5 bits)
  return t


def tokenizer_base_config(preset: str) -> ml_collections.ConfigDict:
  """A full config for training a KL tokenizer with LDM's optimisation defaults.

  LDM trains its autoencoders with Adam(β = 0.5, 0.9), no weight decay and no EMA, and reconstructs
  and encodes with the raw weights; `sample.use_ema` and `cache.use_ema` follow (an EMA of a short
  run lags the raw weights by several dB of PSNR). Dataset configs fill in data, steps and lr.
  """
  c = configlib.base_config()
  c.method = "kl_tokenizer"
  c.tokenizer = tokenizer_config(preset)
  c.optim.b1, c.optim.b2 = 0.5, 0.9
  c.optim.weight_decay = 0.0
  c.sample.use_ema = False   # also what --mode eval scores
  c.cache.use_ema = False
  return c
