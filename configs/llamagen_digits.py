"""LlamaGen on the bundled digits, from the codes of a `configs/vq_digits.py` run: the discrete demo.

Chain (`make demo-llamagen`): train `configs/vq_digits.py` into `vq` (default
`workdirs/demo/vq`), cache its codes (`--mode cache`), then train this config. 32 px digits ->
4×4 codes from 1,024: 16 tokens (`f=4`: 8×8 codes, 64 tokens; `f` must be the tokenizer run's).
gpt_small (4 Llama blocks of width 128, 4 heads) with LlamaGen's code table and zero-initialised
logit head; LlamaGen's optimisation (AdamW 0.9/0.95, weight decay 0.05, clip 1.0) with the
short-run departures of `presets.use_short_cpu_run` (lr 1e-3 after 200 warmup steps, CFG 2.0).
`st_ar=True`: ST-AR's self-guided training (`presets.use_st_ar`); its two views are the codes of
the digit and of its mirror image (the only two the cache holds), so this is a test bed, not
an augmentation a digits model would want.
Args: steps, batch, vq (the tokenizer run), f (4 | 8, as the tokenizer), tiny (a seconds-long
smoke run for the tests), st_ar.
"""
from ardiff_jax import configlib
from ardiff_jax.methods.llamagen import llamagen_base_config
from ardiff_jax.presets import use_digits_codes, use_short_cpu_run, use_st_ar


def get_config(arg=None):
  a = configlib.parse_arg(arg, steps=2000, batch=64, vq="workdirs/demo/vq", f=8, tiny=False, st_ar=False)
  c = llamagen_base_config("gpt_small", a.batch)
  use_digits_codes(c, c.llamagen, a.vq, a.tiny, a.f)
  use_short_cpu_run(c, a.steps, a.tiny)
  if a.tiny:
    c.llamagen.preset = "gpt_tiny"
  if a.st_ar:
    use_st_ar(c, short_run=True)
  return c
