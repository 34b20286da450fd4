"""DD2 stage 2 beyond the paper, on the bundled digits: a one-step generator of continuous KL
tokens distilled (`methods/dd2.py`) from the causal AR + DiffLoss teacher of
`configs/ar_diffusion_digits.py` (`teacher`), G and ψ from the stage-1 run of
`configs/dd2_tune_ar_digits.py` (`tune`); the teacher's score from its head's ε-prediction
(`methods/dd2_teacher.py`). Settings as `configs/dd2_digits.py` (K = 5, rates 1e-4 / 2e-4 from
1e-6, progressive EMA, 1,000 G iterations at batch 64).
Chain: kl_digits -> cache -> ar_diffusion_digits (`teacher`) -> dd2_tune_ar_digits (`tune`) ->
this.
Args: steps, batch, kl, teacher, tune, init_g, init_psi, tiny.
"""
from ardiff_jax import configlib
from ardiff_jax.presets import ar_diffusion_digits_base, use_dd2_distil


def get_config(arg=None):
  a = configlib.parse_arg(arg, steps=1000, batch=64, kl="workdirs/demo/kl",
                          teacher="workdirs/demo/ar_diffusion", tune="workdirs/demo/dd2_tune_ar",
                          init_g=True, init_psi=True, tiny=False)
  c = ar_diffusion_digits_base(a.steps, a.batch, a.kl, a.tiny)
  use_dd2_distil(c, a.teacher, a.tune, a.init_g, a.init_psi, short_run=True, kind="ar_diffusion")
  if a.tiny:
    c.dd2.head_width, c.dd2.head_depth = 32, 1
    c.dd2.guidance_updates, c.dd2.noise_draws = 2, 2
    c.optim.warmup_steps, c.dd2.guidance_warmup = 1, 1
  return c
