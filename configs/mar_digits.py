"""MAR on the bundled digits, from the demo tokenizer's cached latents: the demo's generator.

Chain (what `make demo` runs): train `configs/kl_digits.py` into `workdirs/demo/kl`, cache its
posteriors (`--mode cache`), then train this config. 32 px digits -> 8×8×4 latents -> 2×2 patches:
16 tokens of 16 dims. mar_small (width 128, 2+2 blocks, 4 buffer slots, head 2×128).
Departures from MAR's ImageNet recipe, for a minutes-long CPU run (`presets.use_cpu_run`):
lr 1e-3 rather than 1e-4·B/256, raw weights rather than the EMA, 16 AR steps and 50 DDPM steps
when sampling, x̂_0 clipped to ±5. 1,000 steps (about 3 minutes on a 2-core CPU) keep `make demo`
within 10 minutes; the condition-refinement ablation in the README ran `steps=1500`.
Args: steps, batch, kl (the tokenizer run), tiny (a seconds-long smoke run for the tests),
condref (off | probe | loss | runtime: condition refinement, methods/condref.py).
"""
from ardiff_jax import configlib
from ardiff_jax.presets import (use_16_token_condref, use_digits_latents,
                                           use_cpu_run)
from ardiff_jax.methods.mar import mar_base_config


def get_config(arg=None):
  a = configlib.parse_arg(arg, steps=1000, batch=64, kl="workdirs/demo/kl", tiny=False,
                          condref="off")
  c = mar_base_config("mar_small", a.batch)
  use_digits_latents(c, c.mar, a.kl, a.tiny)
  c.mar.num_ar_steps = 16

  use_cpu_run(c, c.mar, a.steps, a.tiny)
  use_16_token_condref(c, a.condref)
  if a.tiny:
    c.mar.preset = "mar_tiny"
    c.mar.num_ar_steps = 4
  return c
