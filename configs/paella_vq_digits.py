"""Paella's f = 4 VQGAN on scikit-learn's bundled digits (32 px, RGB): 32×32 -> 8×8 codes.

Paella's (`tokenizers/paella_vq.py`, reference/dd2_paella.md §3.2): the architecture, pixel
unshuffle/shuffle by 2 and one stride-2 level (f = 4), gated ResBlocks, a BatchNorm'd 4-dim
latent searched in a plain (not l2-normalised) codebook, commitment β 0.25.
Ours: the codebook drawn from N(0, 1) at init (`init`; 600 steps: 96 of 1,024 codes in use and
37.4 dB train-batch PSNR, against 12 codes and 29.8 dB from pytorch-tools' uniform(±1/K)), the
size (paella_tiny: width 64 (levels 32 and 64), 2 bottleneck blocks, K 1024), and the
training, since Paella ships no VQGAN training script: the LlamaGen tokenizer's losses (l2 pixel,
codebook and commitment; no LPIPS, as `presets.use_digits_tokenizer_run` explains), no GAN by
default (a minutes-long run; `disc` turns the PatchGAN on from half-way), Adam(0.9, 0.95), lr 1e-3
with 100 warmup steps.
Args: steps, batch, size (image side), ch (c_hidden), blocks (bottleneck ResBlocks), k (codebook
size), init (the codebook's init: normal, ours and the default, or uniform, pytorch-tools'),
disc (the PatchGAN), tiny (a seconds-long smoke run on a 16 px, width-16 model, for tests).
"""
from ardiff_jax import configlib
from ardiff_jax.methods.vq_tokenizer import tokenizer_base_config
from ardiff_jax.presets import use_digits_tokenizer_run, use_tiny_vq_tokenizer_run


def get_config(arg=None):
  a = configlib.parse_arg(arg, steps=600, batch=32, size=32, ch=64, blocks=2, k=1024, disc=False,
                          init="normal", tiny=False)
  c = tokenizer_base_config("paella_tiny")
  c.tokenizer.overrides = dict(c_hidden=a.ch, bottleneck_blocks=a.blocks, codebook_size=a.k,
                               codebook_init=a.init)
  c.tokenizer.disc_enabled = a.disc
  c.tokenizer.disc_start = a.steps // 2

  use_digits_tokenizer_run(c, steps=a.steps, batch=a.batch, size=a.size)
  if a.tiny:
    use_tiny_vq_tokenizer_run(c)
    c.tokenizer.disc_start = 2
    c.tokenizer.overrides = dict(c_hidden=16, bottleneck_blocks=1, codebook_size=64)
  return c
