"""MAR's KL-16 tokenizer recipe on ImageNet 256 (reference/mar.md §4).

LDM AutoencoderKL kl-f16 architecture as released by MAR (encoder attention at 16×16, decoder
attention only in the mid block; 16×16×16 latents, scale 0.2325), trained with LDM's kl-f16 loss
(L1 + LPIPS 1.0 + KL 1e-6 + hinge PatchGAN from step 50001, disc weight 0.5) at batch 256 and lr
1e-4, as the MAR authors report. LPIPS needs the user's files (`--config.tokenizer.lpips_vgg16=
vgg16-397923af.pth --config.tokenizer.lpips_lin=vgg.pth`); without them it is off, and the log says so.
Data: `tfds` imagenet2012 prepared by the user (`--config.data.path=<tfds data_dir>`).
"""
from ardiff_jax import configlib
from ardiff_jax.methods.kl_tokenizer import tokenizer_base_config
from ardiff_jax.presets import use_imagenet_images


def get_config(arg=None):
  a = configlib.parse_arg(arg, steps=500000, batch=256)
  c = tokenizer_base_config("kl16")
  c.tokenizer.latent_scale = 0.2325

  use_imagenet_images(c.data)

  c.train.num_steps = a.steps
  c.train.batch_size = a.batch
  c.train.log_every = 100
  c.train.ckpt_every = 5000
  c.train.ema_decay = 0.9999
  c.train.compute_dtype = "bfloat16"
  c.optim.lr = 1e-4
  c.tokenizer.disc_enabled = True
  c.tokenizer.disc_start = 50001
  c.sample.batch_size = 16
  c.bench.steps = 10
  return c
