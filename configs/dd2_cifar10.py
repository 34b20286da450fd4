"""DD2 stage 2 on CIFAR-10 (`methods/dd2.py`): a one-step generator distilled from the adapted
teacher (`configs/dd2_adapt_cifar10.py` run, `teacher`), G and ψ from the stage-1 run
(`configs/dd2_tune_cifar10.py`, `tune`), at DD2's LlamaGen settings with the short-run warmups
(`presets.use_dd2_distil`: K = 5, rates 1e-4 / 2e-4 from 1e-6 over 100 G / 500 ψ iterations,
progressive EMA). Ours: 1,000 G iterations at batch 64 (DD2: 12k at 1024).
Chain: ... -> dd2_adapt_cifar10 (`teacher`) -> dd2_tune_cifar10 (`tune`) -> this.
Args: steps, batch, vq, teacher, tune, path, tok, init_g, init_psi (False: that network from a
fresh initialisation, the Tab. 4 ablation).
"""
from ardiff_jax import configlib
from ardiff_jax.presets import dd2_cifar10_base, use_dd2_distil


def get_config(arg=None):
  a = configlib.parse_arg(arg, steps=1000, batch=64, vq="workdirs/vq_cifar10",
                          teacher="workdirs/dd2_adapt_cifar10", tune="workdirs/dd2_tune_cifar10",
                          path="data/cifar10", tok="vq_small", init_g=True, init_psi=True)
  c = dd2_cifar10_base(a.steps, a.batch, a.vq, a.path, a.tok)
  use_dd2_distil(c, a.teacher, a.tune, a.init_g, a.init_psi, short_run=True)
  return c
