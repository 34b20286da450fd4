"""DD2's teacher adaptation on CIFAR-10 (`methods/dd2_adapt.py`): the LlamaGen run of
`configs/llamagen_cifar10.py:cpu=True` (`teacher`, with the same `vq` and `tok`) made to read the
tokenizer's codebook vectors, its code table replaced by a fitted MLP, then fine-tuned with the
AR loss (`presets.use_dd2_adapt`: lr 1e-4 after 100 warmup steps; DD2 runs 200k iterations).
Chain: vq_cifar10 (`vq`) -> cache -> llamagen_cifar10:cpu=True (`teacher`) -> this ->
dd2_tune_cifar10 -> dd2_cifar10.
Args: steps, batch, vq, teacher, path (the image folder for evaluation), tok (the tokenizer's
preset).
"""
from ardiff_jax import configlib
from ardiff_jax.presets import dd2_cifar10_base, use_dd2_adapt


def get_config(arg=None):
  a = configlib.parse_arg(arg, steps=1000, batch=64, vq="workdirs/vq_cifar10",
                          teacher="workdirs/llamagen_cifar10", path="data/cifar10", tok="vq_small")
  c = dd2_cifar10_base(a.steps, a.batch, a.vq, a.path, a.tok)
  use_dd2_adapt(c, a.teacher, short_run=True)
  return c
