"""DD2 stage 1 on CIFAR-10 (`methods/dd2_tune.py`): AR-diffusion tuning of the adapted teacher
(`configs/dd2_adapt_cifar10.py` run, `teacher`) with the ground-truth-score loss on sequences the
teacher samples each step (`presets.use_dd2_tune`, short run: lr 3e-4 after 100 warmup steps, a
head 256 wide and 3 deep; teacher CFG 2.0, top-p 1.0). `gts=False`: the Monte-Carlo target.
Chain: ... -> dd2_adapt_cifar10 (`teacher`) -> this -> dd2_cifar10.
Args: steps, batch, vq, teacher, path, tok, gts.
"""
from ardiff_jax import configlib
from ardiff_jax.presets import dd2_cifar10_base, use_dd2_tune


def get_config(arg=None):
  a = configlib.parse_arg(arg, steps=2000, batch=64, vq="workdirs/vq_cifar10",
                          teacher="workdirs/dd2_adapt_cifar10", path="data/cifar10", tok="vq_small",
                          gts=True)
  c = dd2_cifar10_base(a.steps, a.batch, a.vq, a.path, a.tok)
  use_dd2_tune(c, a.teacher, a.gts, short_run=True)
  return c
