"""Causal AR with diffusion loss on the digits demo tokenizer's cached latents.

The same tokens as `configs/mar_digits.py` (16 tokens of 16 dims), raster order, gpt_small
(4 Llama blocks of width 128, head 2×128). Departures from the ImageNet recipe, for a short CPU
run: lr 1e-3, EMA 0.999, 50 DDPM steps when sampling.
Args: steps, batch, kl (the tokenizer run), tiny (a seconds-long smoke run for the tests),
condref (off | probe | loss | runtime: condition refinement, methods/condref.py),
order (raster | random).
"""
from ardiff_jax import configlib
from ardiff_jax.presets import ar_diffusion_digits_base, use_16_token_condref


def get_config(arg=None):
  a = configlib.parse_arg(arg, steps=1500, batch=64, kl="workdirs/demo/kl", tiny=False,
                          condref="off", order="raster")
  c = ar_diffusion_digits_base(a.steps, a.batch, a.kl, a.tiny)
  use_16_token_condref(c, a.condref)
  c.ar.order = a.order
  return c
