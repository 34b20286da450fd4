"""Paella on the bundled digits, from the codes of a `configs/paella_vq_digits.py` run.

Chain: train `configs/paella_vq_digits.py` into `vq` (default `workdirs/demo/paella_vq`), cache its
codes (`--mode cache`), then train this config. 32 px digits -> 8×8 codes from 1,024 (f = 4).
paella_small (ours: two levels of widths 64 and 128 on the 4×4 grid after the patch-2 unshuffle,
'CT' and 'CTA', 2 blocks each) with one class token as the condition; Paella's objective (uniform
renoising, η-weighted label-smoothed cross-entropy) and 12-step renoise sampler (temperature
0.7 → 0.3); the short-run optimisation of `presets.use_short_cpu_run` (lr 1e-3 after 200 warmup
steps, CFG 2.0) with Paella's AdamW (0.9, 0.999, weight decay 0.01) and clip 1.0.
`noise=mask`: the MaskGIT baseline (absorbing [MASK] noise, mask-and-freeze sampling);
`cond=text`: captions "a handwritten digit {d}" through the byte-level text path instead of the
class token; `cond=byt5` with `--config.paella.byt5_path=DIR`: through a pretrained ByT5 encoder.
Args: steps, batch, vq (the tokenizer run), noise (uniform | mask), cond (class | text | byt5),
tiny (a seconds-long smoke run for the tests).
"""
from ardiff_jax import configlib
from ardiff_jax.methods.paella import paella_base_config
from ardiff_jax.presets import use_paella_digits_codes, use_short_cpu_run


def get_config(arg=None):
  a = configlib.parse_arg(arg, steps=2000, batch=64, vq="workdirs/demo/paella_vq", noise="uniform",
                          cond="class", tiny=False)
  c = paella_base_config("paella_small", a.batch)
  c.paella.noise = a.noise
  c.paella.cond = a.cond
  c.paella.class_names = tuple(str(d) for d in range(10))
  c.paella.caption_template = "a handwritten digit {}"
  use_paella_digits_codes(c, c.paella, a.vq, a.tiny)
  use_short_cpu_run(c, a.steps, a.tiny)
  if a.tiny:
    c.paella.preset = "paella_tiny"
    c.paella.steps = 4
  return c
