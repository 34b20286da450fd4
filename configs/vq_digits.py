"""VQ tokenizer on scikit-learn's bundled digits (32 px, RGB): the discrete demo's tokenizer.

vq_tiny (ours) at width 16 (as the KL demo tokenizer): LlamaGen's VQ architecture, f = 8 (32×32
-> 4×4 codes; the digits are 8×8 images upsampled, so a code covers 2×2 of their pixels) or f = 4
(8×8 codes), K = 1024 codes of 8 dims, l2-normalised; l2 + codebook + commitment losses, no GAN
(a minutes-long run), no LPIPS (`presets.use_digits_tokenizer_run`). Adam(0.9, 0.95), lr 1e-3 with 100
warmup steps. f = 8 is the default: LlamaGen on its 16 codes trains 4.5× faster per step and its
samples score better than on the f = 4 codes at the same budget (README).
Args: steps, batch, size (image side), ch (base width), k (codebook size), f (4 | 8), tiny (a
seconds-long smoke run on a 16 px, two-level model, used by tests).
"""
from ardiff_jax import configlib
from ardiff_jax.methods.vq_tokenizer import tokenizer_base_config
from ardiff_jax.presets import use_digits_tokenizer_run, use_tiny_vq_tokenizer_run


def get_config(arg=None):
  a = configlib.parse_arg(arg, steps=600, batch=32, size=32, ch=16, k=1024, f=8, tiny=False)
  if a.f not in (4, 8):
    raise ValueError(f"f={a.f}: the digits VQ tokenizer downsamples by 4 or 8")
  c = tokenizer_base_config("vq_tiny")
  c.tokenizer.overrides = dict(ch=a.ch, resolution=a.size, codebook_size=a.k)
  if a.f == 8:   # one more level: 32 px -> 4×4 codes, attention at the lowest level
    c.tokenizer.overrides.update(ch_mult=(1, 2, 2, 2), attn_resolutions=(a.size // 8,))
  c.tokenizer.disc_enabled = False

  use_digits_tokenizer_run(c, steps=a.steps, batch=a.batch, size=a.size)
  if a.tiny:
    use_tiny_vq_tokenizer_run(c)
    c.tokenizer.overrides = dict(ch=16, ch_mult=(1, 2), attn_resolutions=(), resolution=16,
                                 codebook_size=64, z_channels=16)
  return c
