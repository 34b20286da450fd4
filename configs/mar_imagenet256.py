"""MAR on ImageNet 256 from cached KL-16 moments: the paper's recipe (reference/mar.md §2, §3, §5).

`configs/mar_imagenet256.py:model=large` picks MAR-B/L/H (208M / 479M / 943M with the head).
Tokens: KL-16 posterior samples ×0.2325, patch 1: 256 tokens × 16. Batch 2048, lr 8e-4
(1e-4·B/256), 100-epoch warmup then constant, AdamW(0.9, 0.95) wd 0.02, clip 3.0, EMA 0.9999,
400 epochs (800 for Table 4: `epochs=800`). Sampling: 64 AR steps (256 for the headline FIDs:
`--config.mar.num_ar_steps=256`), 100 DDPM steps, linear CFG 2.9/3.0/3.2 for B/L/H.
Chain: train `configs/kl16_imagenet256.py` (or convert MAR's kl16.ckpt into such a run), cache it
with `--mode cache` into `cache`, then train here with `kl=<tokenizer run>`.
"""
from ardiff_jax import configlib
from ardiff_jax.presets import use_imagenet_kl16
from ardiff_jax.methods.mar import mar_base_config

CFG = {"base": 2.9, "large": 3.0, "huge": 3.2}


def get_config(arg=None):
  a = configlib.parse_arg(arg, model="base", batch=2048, epochs=400, kl="workdirs/kl16",
                          cache="workdirs/kl16/cache")
  if a.model not in CFG:
    raise ValueError(f"model={a.model!r}: choose one of {sorted(CFG)}")
  c = mar_base_config(f"mar_{a.model}", a.batch)
  use_imagenet_kl16(c, c.mar, kl=a.kl, cache=a.cache, batch=a.batch, epochs=a.epochs)
  c.sample.cfg_scale = CFG[a.model]
  c.bench.steps = 10
  return c
