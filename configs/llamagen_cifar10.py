"""LlamaGen on CIFAR-10 from the codes of a `configs/vq_cifar10.py` run.

32 px -> 8×8 codes (f = 4): 64 tokens from the tokenizer's K (vq_small 4,096, vq_tiny 1,024).
gpt_small (4 Llama blocks of width 128, 4 heads: the causal-AR comparison's trunk) with
LlamaGen's code table and zero-initialised logit head, LlamaGen's optimisation (AdamW 0.9/0.95,
weight decay 0.05, clip 1.0, constant lr 1e-4·B/256 without warmup), CFG 2.0 (the paper's GPT-B
scale). `cpu` switches to the short-run settings (`presets.use_short_cpu_run`: lr 1e-3 after 200
warmup steps, raw weights, CFG 2) of the CPU comparison with `configs/mar_cifar10.py` and
`configs/ar_diffusion_cifar10.py`; both evaluate 10,000 samples against the 10,000 test images
(`presets.use_cifar10_eval`).
Chain: train vq_cifar10 into `vq` (with the same `tok` preset), `--mode cache` it, then train here.
`st_ar=True`: ST-AR's self-guided training at the same budget (`presets.use_st_ar`; two views
per image: the codes of the image and of its mirror image).
Args: steps, batch, vq, path (the image folder for evaluation), tok (vq_small | vq_tiny), cpu, st_ar.
"""
from ardiff_jax import configlib
from ardiff_jax.methods.llamagen import llamagen_base_config
from ardiff_jax.presets import use_cifar10_codes, use_cifar10_eval, use_short_cpu_run, use_st_ar


def get_config(arg=None):
  a = configlib.parse_arg(arg, steps=40000, batch=256, vq="workdirs/vq_cifar10",
                          path="data/cifar10", tok="vq_small", cpu=False, st_ar=False)
  c = llamagen_base_config("gpt_small", a.batch)
  use_cifar10_codes(c, c.llamagen, vq=a.vq, path=a.path, preset=a.tok)
  if a.cpu:
    use_short_cpu_run(c, a.steps, tiny=False)
  else:
    c.train.num_steps = a.steps
    c.train.log_every = 200
    c.train.ckpt_every = 5000
    c.sample.cfg_scale = 2.0
    c.sample.num_samples = c.sample.batch_size = 100
  use_cifar10_eval(c)
  if a.st_ar:
    use_st_ar(c, short_run=a.cpu)
  return c
