"""Paella on CIFAR-10 from the codes of a `configs/paella_vq_cifar10.py` run.

32 px -> 8×8 codes (f = 4) from the tokenizer's K (paella_small 4,096, paella_tiny 1,024).
paella_small (ours: widths 64 and 128, 'CT' and 'CTA', 2 blocks per level, 4 heads) with
Paella's objective, optimiser (AdamW 1e-4, β 0.9/0.999, weight decay 0.01, clip 1.0) and 12-step
renoise sampler.
- `cond=class`: one class token (dropped with probability 0.1 for CFG);
- `cond=text`: captions "a photo of a {class}" through ByT5's byte ids and a byte-level encoder
  trained with the predictor (Paella's text path at demo size; the empty caption, with
  probability 0.05, is the unconditional input);
- `cond=byt5`: the same captions through a pretrained ByT5 encoder read from the local Hugging
  Face checkpoint folder `byt5` (Paella's text path; nothing is downloaded).
CFG 8.0 for text, as Paella; 2.0 for classes.
`noise=mask`: the MaskGIT baseline at the same budget. `cpu`: the short-run settings of
`presets.use_short_cpu_run` (lr 1e-3 after 200 warmup steps, raw weights), as the other CIFAR-10
generators. Both evaluate 10,000 samples against the 10,000 test images.
Chain: train paella_vq_cifar10 into `vq` (with the same `tok` preset), `--mode cache` it, then
train here.
Args: steps, batch, vq, path (the image folder for evaluation), tok (paella_small | paella_tiny),
cond (class | text | byt5), byt5 (the ByT5 checkpoint folder), noise (uniform | mask), cpu.
"""
from ardiff_jax import configlib
from ardiff_jax.methods.paella import paella_base_config
from ardiff_jax.presets import use_cifar10_codes, use_cifar10_eval, use_short_cpu_run


def get_config(arg=None):
  a = configlib.parse_arg(arg, steps=40000, batch=256, vq="workdirs/paella_vq_cifar10",
                          path="data/cifar10", tok="paella_small", cond="class", byt5="",
                          noise="uniform", cpu=False)
  c = paella_base_config("paella_small", a.batch)
  c.paella.cond = a.cond
  c.paella.byt5_path = a.byt5
  c.paella.noise = a.noise
  use_cifar10_codes(c, c.paella, vq=a.vq, path=a.path, preset=a.tok)
  if a.cpu:
    use_short_cpu_run(c, a.steps, tiny=False)
  else:
    c.train.num_steps = a.steps
    c.optim.warmup_steps = min(10000, a.steps // 10)
    c.train.log_every = 200
    c.train.ckpt_every = 5000
    c.sample.num_samples = c.sample.batch_size = 100
  c.sample.cfg_scale = 2.0 if a.cond == "class" else 8.0
  use_cifar10_eval(c)
  return c
