"""Causal AR with diffusion loss on CIFAR-10, from the same cached latents as `configs/mar_cifar10.py`.

The same 16 tokens of 16 dims in raster order (or `order=random`), gpt_small (4 Llama blocks of
width 128, DiffLoss head 2×128: about the size of mar_small), MAR's optimisation and the same run
settings as mar_cifar10 (`presets.use_cifar10_run`), so the two compare at an equal budget.
Args: steps, batch, kl, path, tok (kl_small | kl_tiny), cpu, order (raster | random),
condref (off | probe | loss | runtime: condition refinement, methods/condref.py).
"""
from ardiff_jax import configlib
from ardiff_jax.methods.ar_diffusion import ar_base_config
from ardiff_jax.presets import use_16_token_condref, use_cifar10_latents, use_cifar10_run


def get_config(arg=None):
  a = configlib.parse_arg(arg, steps=40000, batch=256, kl="workdirs/kl_cifar10", path="data/cifar10",
                          tok="kl_small", cpu=False, order="raster", condref="off")
  c = ar_base_config("gpt_small", a.batch)
  use_cifar10_latents(c, c.ar, kl=a.kl, path=a.path, preset=a.tok)
  use_cifar10_run(c, c.ar, steps=a.steps, batch=a.batch, cpu=a.cpu)
  c.ar.order = a.order
  if a.condref != "off":
    use_16_token_condref(c, a.condref)
  return c
