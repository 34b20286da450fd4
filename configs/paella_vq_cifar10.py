"""Paella's f = 4 VQGAN on CIFAR-10 (32 px) from an image folder: 32×32 -> 8×8 codes (64 tokens).

Paella's (`tokenizers/paella_vq.py`, reference/dd2_paella.md §3.2): the architecture, pixel
unshuffle/shuffle by 2 and one stride-2 level (f = 4), gated ResBlocks, a BatchNorm'd 4-dim
latent searched in a plain (not l2-normalised) codebook, commitment β 0.25.
Ours: the codebook drawn from N(0, 1) at init (`init`; see `configs/paella_vq_digits.py`), the
size (paella_small: width 128 (levels 64 and 128), 4 bottleneck blocks, K 4,096;
paella_tiny: width 64, 2 blocks, K 1,024, for CPU budgets), and the training, since Paella ships
no VQGAN training script: the LlamaGen tokenizer's losses as `configs/vq_cifar10.py` (l2 pixel,
codebook and commitment, LPIPS weight 1.0, 0 with a note in the log unless `tokenizer.lpips_vgg16`
and `tokenizer.lpips_lin` name the user's files, PatchGAN hinge from half-way), Adam(0.9, 0.95)
without weight decay, lr 4e-4 after a warmup of an eighth of the run (at most 500 steps).
Point `path` at the folder holding `train/<class>/*.jpg` and `test/<class>/*.jpg`.
Args: steps, batch, path, preset (paella_small | paella_tiny), disc (the PatchGAN; False skips it),
init (the codebook's init: normal, ours and the default, or uniform, pytorch-tools';
`tokenizers/paella_vq.py`).
"""
from ardiff_jax import configlib
from ardiff_jax.methods.vq_tokenizer import tokenizer_base_config
from ardiff_jax.presets import use_cifar10_tokenizer_run


def get_config(arg=None):
  a = configlib.parse_arg(arg, steps=20000, batch=128, path="data/cifar10", preset="paella_small",
                          disc=True, init="normal")
  if a.preset not in ("paella_small", "paella_tiny"):
    raise ValueError(f"preset={a.preset!r}: the CIFAR-10 Paella VQ presets are paella_small and "
                     "paella_tiny")
  c = tokenizer_base_config(a.preset)
  c.tokenizer.overrides = dict(codebook_init=a.init)
  use_cifar10_tokenizer_run(c, steps=a.steps, batch=a.batch, path=a.path, disc=a.disc,
                            warmup=min(500, a.steps // 8))
  c.sample.num_samples = c.sample.batch_size = 64
  return c
