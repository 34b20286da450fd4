"""KL tokenizer on CIFAR-10 (32 px) from an image folder.

Point `data.path` at the folder holding `train/<class>/*.jpg` and `test/<class>/*.jpg`, e.g. after
`mkdir -p data && tar xzf cifar10-jpg.tar.gz -C data`: `--config.data.path=data/cifar10`.
kl_small: stride 4, 32×32 -> 8×8×4 latents (tokens for MAR/AR on CIFAR-10).
Args: steps, batch, path, preset (kl_small | kl_tiny: a quarter of kl_small's width and half its
depth, for CPU budgets), disc (the PatchGAN from half-way, as LDM; False skips it).
"""
from ardiff_jax import configlib
from ardiff_jax.presets import use_cifar10_tokenizer_run
from ardiff_jax.methods.kl_tokenizer import tokenizer_base_config


def get_config(arg=None):
  a = configlib.parse_arg(arg, steps=20000, batch=128, path="data/cifar10", preset="kl_small",
                          disc=True)
  c = tokenizer_base_config(a.preset)
  c.train.ema_decay = 0.999
  use_cifar10_tokenizer_run(c, steps=a.steps, batch=a.batch, path=a.path, disc=a.disc, warmup=500)
  return c
