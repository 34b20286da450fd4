"""DD2's teacher adaptation on the bundled digits: the LlamaGen run of `configs/llamagen_digits.py`
(`teacher`, built with the same `f` and `tiny`) made to read codebook vectors
(`methods/dd2_adapt.py`): its code table replaced by an MLP over the VQ's 8-wide vectors, fitted
by L2 to the table (2,000 full-batch Adam steps at 1e-3), then the whole model fine-tuned with the
AR loss on vectors.
Ours: 1,000 fine-tuning steps at lr 1e-4 after 100 warmup steps (DD2 runs 200k for LlamaGen-L and
does not give the rate), the teacher's other settings (batch 64, AdamW 0.9/0.95, weight decay
0.05, clip 1.0, CFG 2.0).
Chain: `configs/vq_digits.py` (`vq`) -> cache -> `configs/llamagen_digits.py` (`teacher`) -> this.
Args: steps, batch, vq, teacher, f (as the tokenizer), tiny (a seconds-long smoke run).
"""
from ardiff_jax import configlib
from ardiff_jax.presets import dd2_digits_base, use_dd2_adapt


def get_config(arg=None):
  a = configlib.parse_arg(arg, steps=1000, batch=64, vq="workdirs/demo/vq",
                          teacher="workdirs/demo/llamagen", f=8, tiny=False)
  c = dd2_digits_base(a.steps, a.batch, a.vq, a.f, a.tiny)
  use_dd2_adapt(c, a.teacher, short_run=True)
  if a.tiny:
    c.dd2.fit_steps, c.dd2.fit_lr = 300, 3e-3
    c.optim.warmup_steps = 1
  return c
