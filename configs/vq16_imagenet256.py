"""LlamaGen's VQ-16 tokenizer recipe on ImageNet 256 (reference/llamagen_star.md §1.1).

VQ-16 (71,883,403 parameters: ch 128, ch_mult 1,1,2,2,4, attention at 16×16, z 256, codebook
16,384 × 8, l2-normalised), l2 + LPIPS (1.0) + codebook (β 0.25) losses, the PatchGAN hinge terms
(3 layers, ndf 64, weight 0.5) from step 20,000, batch 128, constant lr 1e-4, Adam(0.9, 0.95)
without weight decay (LlamaGen's code; its paper says AdamW 0.05), 40 epochs, bf16 compute.
LPIPS needs the user's files (`--config.tokenizer.lpips_vgg16=vgg16-397923af.pth
--config.tokenizer.lpips_lin=vgg.pth`); without them it is off, and the log says so.
Not reproduced here: LlamaGen's random crop of 80–100% of the image (our pipeline centre-crops
and flips). Data: `tfds` imagenet2012 prepared by the user
(`--config.data.path=<tfds data_dir>`).
Args: epochs, batch.
"""
from ardiff_jax import configlib
from ardiff_jax.methods.vq_tokenizer import tokenizer_base_config
from ardiff_jax.presets import IMAGENET_TRAIN_IMAGES, use_imagenet_images


def get_config(arg=None):
  a = configlib.parse_arg(arg, epochs=40, batch=128)
  c = tokenizer_base_config("vq16")
  use_imagenet_images(c.data)
  c.train.batch_size = a.batch
  c.train.num_steps = a.epochs * IMAGENET_TRAIN_IMAGES // a.batch
  c.train.log_every = 100
  c.train.ckpt_every = 5000
  c.train.compute_dtype = "bfloat16"
  c.optim.lr = 1e-4
  c.sample.batch_size = 16
  c.cache.ten_crop = True          # LlamaGen's code extraction: ten crops of a 1.1× centre crop
  c.cache.batch_size = 32
  c.cache.splits = ("train",)
  return c
