"""Causal AR with diffusion loss on ImageNet 256 from cached KL-16 moments.

`configs/ar_diffusion_imagenet256.py:model=xl` picks LlamaGen's GPT-B/L/XL (12/768/12,
24/1024/16, 36/1280/20; the condition-refinement paper's "GPT-XL") with MAR's DiffLoss head
(6×1024, 8×1280, 12×1536) on KL-16 tokens ×0.2325, raster order. Optimisation as MAR's
(`latent_tokens.generator_base_config`): batch 2048, lr 8e-4, 100-epoch warmup then constant,
AdamW(0.9, 0.95) wd 0.02, clip 3.0, EMA 0.9999, 400 epochs. CFG on ε, constant scale.
"""
from ardiff_jax import configlib
from ardiff_jax.methods.ar_diffusion import ar_base_config
from ardiff_jax.presets import use_imagenet_kl16

MODELS = ("b", "l", "xl")


def get_config(arg=None):
  a = configlib.parse_arg(arg, model="xl", batch=2048, epochs=400, kl="workdirs/kl16",
                          cache="workdirs/kl16/cache")
  if a.model not in MODELS:
    raise ValueError(f"model={a.model!r}: choose one of {MODELS}")
  c = ar_base_config(f"gpt_{a.model}", a.batch)
  use_imagenet_kl16(c, c.ar, kl=a.kl, cache=a.cache, batch=a.batch, epochs=a.epochs)
  c.sample.cfg_scale = 3.0
  return c
