"""KL tokenizer on scikit-learn's bundled digits (32 px, RGB): the demo's tokenizer.

kl_tiny at width 16: stride 4, so 32×32 images become 8×8×4 latents. 400 steps at batch 32 take
about 1.5 minutes on a 2-core CPU and reach 32.6 dB held-out PSNR (600 steps: 34.4 dB; the MAR
demo's samples are as good either way, README).
Args (`configs/kl_digits.py:steps=300,ch=32`): steps, batch, size (image side), ch (base width of
encoder and decoder), tiny (a seconds-long smoke run on a 16 px, two-level model, used by tests).
"""
from ardiff_jax import configlib
from ardiff_jax.methods.kl_tokenizer import tokenizer_base_config
from ardiff_jax.presets import use_digits_tokenizer_run


def get_config(arg=None):
  a = configlib.parse_arg(arg, steps=400, batch=32, size=32, ch=16, tiny=False)
  c = tokenizer_base_config("kl_tiny")
  c.tokenizer.latent_scale = 1.0
  c.tokenizer.overrides = dict(enc_ch=a.ch, dec_ch=a.ch, resolution=a.size)

  use_digits_tokenizer_run(c, steps=a.steps, batch=a.batch, size=a.size)
  if a.tiny:
    c.train.num_steps, c.train.batch_size, c.train.log_every = 4, 16, 2
    c.train.ckpt_every = 2
    c.sample.num_samples = c.sample.batch_size = 16
    c.cache.batch_size = 64
    c.bench.steps, c.bench.warmup_steps = 2, 1
    c.data.image_size = 16
    # Two levels, 16 channels, no attention: compiles in a few seconds on a 2-core CPU.
    c.tokenizer.overrides = dict(enc_ch=16, dec_ch=16, enc_ch_mult=(1, 2), dec_ch_mult=(1, 2),
                                 enc_attn_resolutions=(), resolution=16)
  return c
