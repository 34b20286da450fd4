"""DD2 stage 1 beyond the paper, on the bundled digits: AR-diffusion tuning of a continuous-token
teacher, the causal AR + DiffLoss run of `configs/ar_diffusion_digits.py` (`teacher`, raster
order, with the same `kl` and `tiny`), into a velocity head on its trunk (`methods/dd2_tune.py`
with `dd2.teacher_kind=ar_diffusion`): the GTS target is the teacher's own denoiser, its
ε-prediction at the VP step of equal SNR with its CFG (2.0) and temperature
(`methods/dd2_teacher.py`); sequences are drawn by its 50-step DDPM sampler inside each step.
Ours, as `configs/dd2_tune_digits.py`: 2,000 steps at lr 3e-4 after 100 warmup steps, batch 64,
head 256 wide and 3 deep.
Chain: kl_digits -> cache -> ar_diffusion_digits (`teacher`) -> this -> dd2_ar_digits.
Args: steps, batch, kl, teacher, gts, tiny.
"""
from ardiff_jax import configlib
from ardiff_jax.presets import ar_diffusion_digits_base, use_dd2_tune


def get_config(arg=None):
  a = configlib.parse_arg(arg, steps=2000, batch=64, kl="workdirs/demo/kl",
                          teacher="workdirs/demo/ar_diffusion", gts=True, tiny=False)
  c = ar_diffusion_digits_base(a.steps, a.batch, a.kl, a.tiny)
  use_dd2_tune(c, a.teacher, a.gts, short_run=True, kind="ar_diffusion")
  if a.tiny:
    c.dd2.head_width, c.dd2.head_depth = 32, 1
    c.dd2.euler_steps = 2
    c.optim.warmup_steps = 1
  return c
