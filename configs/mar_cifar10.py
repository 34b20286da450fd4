"""MAR on CIFAR-10 from the cached latents of a `configs/kl_cifar10.py` run.

2×2 patches of the 8×8×4 latents: 16 tokens of 16 dims (KL-16's token width). mar_small with MAR's
optimisation at batch 256 (lr 1e-4·B/256 = 1e-4, the 100 warmup epochs shortened to 5 for a run of
`steps` steps), EMA 0.9999; 16 AR steps (one per token at most), 100 DDPM steps, linear CFG 3.
Scored by FD-clf on the CIFAR-10 feature net. `cpu` switches to the short-run settings
(`presets.use_cpu_run`) used for the CPU comparison with `configs/ar_diffusion_cifar10.py`.
Chain: train kl_cifar10 into `kl` (with the same `tok` preset), `--mode cache` it, then train here.
Args: steps, batch, kl, path (the image folder for evaluation), tok (kl_small | kl_tiny), cpu,
condref (off | probe | loss | runtime: condition refinement, methods/condref.py).
"""
from ardiff_jax import configlib
from ardiff_jax.presets import use_16_token_condref, use_cifar10_latents, use_cifar10_run
from ardiff_jax.methods.mar import mar_base_config


def get_config(arg=None):
  a = configlib.parse_arg(arg, steps=40000, batch=256, kl="workdirs/kl_cifar10", path="data/cifar10",
                          tok="kl_small", cpu=False, condref="off")
  c = mar_base_config("mar_small", a.batch)
  use_cifar10_latents(c, c.mar, kl=a.kl, path=a.path, preset=a.tok)
  use_cifar10_run(c, c.mar, steps=a.steps, batch=a.batch, cpu=a.cpu)
  c.mar.num_ar_steps = 16
  if a.condref != "off":
    use_16_token_condref(c, a.condref)
  return c
