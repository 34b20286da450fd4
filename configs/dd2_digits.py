"""DD2 stage 2 on the bundled digits: a one-step generator distilled (`methods/dd2.py`) from the
adapted teacher (`configs/dd2_adapt_digits.py` run, `teacher`), G and ψ both initialised from the
stage-1 run (`configs/dd2_tune_digits.py`, `tune`).
DD2's LlamaGen settings: K = 5 ψ iterations per G iteration, peak rates 2e-4 (ψ) and 1e-4 (G),
both warmed up from 1e-6, Adam (0.9, 0.95) without weight decay, SiD α = 1, the teacher's CFG
2.0 and top-p 1.0, G's EMA at the progressive rate min(0.9999, (i + 1)/(i + 10)), sampled from
the EMA. Ours: 1,000 G iterations (5,000 ψ) at batch 64 (DD2: 12k / 60k at batch 1024); warmups
of 100 G and 500 ψ iterations (DD2 warms ψ up over 40k of its 60k); no top-k (digits have 1,024
codes; see `configs/dd2_tune_digits.py`).
Chain: vq_digits -> cache -> llamagen_digits -> dd2_adapt_digits (`teacher`) -> dd2_tune_digits
(`tune`) -> this.
Args: steps, batch, vq, teacher, tune, f (as the tokenizer), init_g, init_psi (False: that network
from a fresh initialisation, DD2's Tab. 4 ablation), tiny (a seconds-long smoke run).
"""
from ardiff_jax import configlib
from ardiff_jax.presets import dd2_digits_base, use_dd2_distil


def get_config(arg=None):
  a = configlib.parse_arg(arg, steps=1000, batch=64, vq="workdirs/demo/vq",
                          teacher="workdirs/demo/dd2_adapt", tune="workdirs/demo/dd2_tune", f=8,
                          init_g=True, init_psi=True, tiny=False)
  c = dd2_digits_base(a.steps, a.batch, a.vq, a.f, a.tiny)
  use_dd2_distil(c, a.teacher, a.tune, a.init_g, a.init_psi, short_run=True)
  if a.tiny:
    c.dd2.head_width, c.dd2.head_depth = 32, 1
    c.dd2.guidance_updates, c.dd2.noise_draws = 2, 2
    c.optim.warmup_steps, c.dd2.guidance_warmup = 1, 1
  return c
