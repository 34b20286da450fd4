"""MAR on the bundled digits, from the demo tokenizer's cached latents: the demo's generator.

Chain (what `make demo` runs): train `configs/kl_digits.py` into `workdirs/demo/kl`, cache its
posteriors (`--mode cache`), then train this config. 32 px digits -> 8×8×4 latents -> 2×2 patches:
16 tokens of 16 dims. mar_small (width 128, 2+2 blocks, 16 buffer slots, head 2×128).
Departures from MAR's ImageNet recipe, for a minutes-long CPU run: lr 1e-3 rather than 1e-4·B/256,
EMA 0.999 (MAR's 0.9999 needs ~100k steps), 16 AR steps and 50 DDPM steps when sampling.
Args: steps, batch, kl (the tokenizer run), tiny (a seconds-long smoke run for the tests).
"""
import ml_collections

from ardiff_jax import configlib
from ardiff_jax.methods.mar import mar_base_config
from ardiff_jax.tokenizers.train import tokenizer_config


def get_config(arg=None):
  a = configlib.parse_arg(arg, steps=3000, batch=64, kl="workdirs/demo/kl", tiny=False)
  c = mar_base_config("mar_small", a.batch)
  c.tokenizer = tokenizer_config("kl_tiny")
  c.tokenizer.overrides = dict(enc_ch=16, dec_ch=16, resolution=32)
  c.tokenizer.latent_scale = 0.0          # 1/std of the cached latents (measured by --mode cache)
  c.mar.tokenizer_workdir = a.kl
  c.mar.patch_size = 2
  c.mar.num_ar_steps = 16
  c.mar.num_sampling_steps = "50"

  c.data.source = "cached"
  c.data.path = a.kl + "/cache"
  c.data.image_size = 32
  c.data.random_flip = False               # digits are not mirror-symmetric
  c.eval.data = ml_collections.ConfigDict(configlib.base_config().data.to_dict())
  c.eval.data.source = "digits"
  c.eval.data.image_size = 32
  c.eval.data.random_flip = False

  c.train.num_steps = a.steps
  c.train.log_every = 100
  c.train.ckpt_every = 1000
  c.train.ema_decay = 0.999
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 200
  c.sample.num_samples = 100
  c.sample.batch_size = 100
  c.sample.cfg_scale = 2.0
  c.eval.num_samples = 1000
  c.eval.batch_size = 100
  if a.tiny:
    c.mar.preset = "mar_tiny"
    c.tokenizer.overrides = dict(enc_ch=16, dec_ch=16, enc_ch_mult=(1, 2), dec_ch_mult=(1, 2),
                                 enc_attn_resolutions=(), resolution=16)
    c.data.image_size = c.eval.data.image_size = 16
    c.mar.patch_size = 1
    c.mar.num_ar_steps, c.mar.num_sampling_steps = 4, "5"
    c.train.num_steps, c.train.batch_size, c.train.log_every, c.train.ckpt_every = 3, 16, 1, 3
    c.sample.num_samples, c.sample.batch_size = 20, 16
    c.eval.num_samples, c.eval.batch_size = 40, 16
  return c
