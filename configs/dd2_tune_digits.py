"""DD2 stage 1 on the bundled digits: AR-diffusion tuning of the adapted teacher
(`configs/dd2_adapt_digits.py` run, `teacher`) with the ground-truth-score loss
(`methods/dd2_tune.py`): its trunk over codebook vectors plus a DiffLoss head (width 256, 3
blocks: ours, at the trunk's scale) predicting a rectified-flow velocity, trained on sequences the
teacher samples each step (CFG 2.0 and top-p 1.0, DD2's LlamaGen settings; no top-k: the paper
gives 900 in one place and 8,000 in another for LlamaGen's 16,384 codes, and digits have 1,024).
Ours: 2,000 steps at lr 3e-4 after 100 warmup steps, batch 64 (DD2: 100k at 1e-4, batch 512).
`gts=False`: the Monte-Carlo target ε − x_0 (the paper's ablation).
Chain: vq_digits -> cache -> llamagen_digits -> dd2_adapt_digits (`teacher`) -> this.
Args: steps, batch, vq, teacher, f (as the tokenizer), gts, tiny (a seconds-long smoke run).
"""
from ardiff_jax import configlib
from ardiff_jax.presets import dd2_digits_base, use_dd2_tune


def get_config(arg=None):
  a = configlib.parse_arg(arg, steps=2000, batch=64, vq="workdirs/demo/vq",
                          teacher="workdirs/demo/dd2_adapt", f=8, gts=True, tiny=False)
  c = dd2_digits_base(a.steps, a.batch, a.vq, a.f, a.tiny)
  use_dd2_tune(c, a.teacher, a.gts, short_run=True)
  if a.tiny:
    c.dd2.head_width, c.dd2.head_depth = 32, 1
    c.dd2.euler_steps = 2
    c.optim.warmup_steps = 1
  return c
