"""VQ tokenizer on CIFAR-10 (32 px) from an image folder: the tokenizer of `configs/llamagen_cifar10.py`.

LlamaGen's VQ architecture at f = 4: 32×32 -> 8×8 codes (64 tokens), l2-normalised codes of 8
dims. vq_small (ours; width 64, K 4,096) by default, vq_tiny (width 32, one residual block per
level, K 1,024) for CPU budgets. LlamaGen's losses: l2 pixel, codebook and commitment (β 0.25),
LPIPS (weight 1.0; 0 with a note in the log unless `tokenizer.lpips_vgg16` and
`tokenizer.lpips_lin` name the user's files), PatchGAN hinge from half-way (LlamaGen: from 20k
iterations; as `configs/kl_cifar10.py`). Adam(0.9, 0.95) without weight decay as LlamaGen, with
the CIFAR-10 KL tokenizer's lr 4e-4 after a warmup of an eighth of the run (at most 500 steps).
Point `path` at the folder holding `train/<class>/*.jpg` and `test/<class>/*.jpg`.
Args: steps, batch, path, preset (vq_small | vq_tiny), disc (the PatchGAN; False skips it).
"""
from ardiff_jax import configlib
from ardiff_jax.methods.vq_tokenizer import tokenizer_base_config
from ardiff_jax.presets import use_cifar10_tokenizer_run


def get_config(arg=None):
  a = configlib.parse_arg(arg, steps=20000, batch=128, path="data/cifar10", preset="vq_small",
                          disc=True)
  if a.preset not in ("vq_small", "vq_tiny"):
    raise ValueError(f"preset={a.preset!r}: the CIFAR-10 VQ presets are vq_small and vq_tiny")
  c = tokenizer_base_config(a.preset)
  use_cifar10_tokenizer_run(c, steps=a.steps, batch=a.batch, path=a.path, disc=a.disc,
                            warmup=min(500, a.steps // 8))
  c.sample.num_samples = c.sample.batch_size = 64
  return c
