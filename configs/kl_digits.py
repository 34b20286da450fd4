"""KL tokenizer on scikit-learn's bundled digits (32 px, RGB): the demo's tokenizer.

kl_tiny: stride 4, so 32×32 images become 8×8×4 latents. Runs on a 2-core CPU in minutes.
Args (`configs/kl_digits.py:steps=500,tiny`): steps, batch, tiny (a seconds-long smoke run on
a 16 px, two-level model, used by the tests).
"""
from ardiff_jax import configlib
from ardiff_jax.tokenizers.train import tokenizer_config


def get_config(arg=None):
  a = configlib.parse_arg(arg, steps=1500, batch=64, tiny=False)
  c = configlib.base_config()
  c.method = "kl_tokenizer"
  c.tokenizer = tokenizer_config("kl_tiny")
  c.tokenizer.latent_scale = 1.0

  c.data.source = "digits"
  c.data.image_size = 32
  c.data.random_flip = False       # digits are not mirror-symmetric

  c.train.num_steps = a.steps
  c.train.batch_size = a.batch
  c.train.log_every = 50
  c.train.ckpt_every = 500
  c.train.ema_decay = 0.999        # short run: 0.9999 would leave the EMA near its init
  # LDM trains its autoencoders with Adam(0.5, 0.9) and no weight decay.
  c.optim.lr = 1e-3
  c.optim.b1, c.optim.b2 = 0.5, 0.9
  c.optim.weight_decay = 0.0
  c.optim.warmup_steps = 100

  c.sample.num_samples = 64
  c.sample.batch_size = 64
  c.bench.steps = 10
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
