"""MAR on CIFAR-10 from the cached latents of `configs/kl_cifar10.py` (kl_small: 8×8×4).

2×2 patches: 16 tokens of 16 dims (KL-16's token width). mar_small with MAR's optimisation at
batch 256 (lr 1e-4·B/256 = 1e-4, 100 warmup epochs shortened to 5 for a run of `steps` steps),
EMA 0.9999; 64 AR steps, 100 DDPM steps, linear CFG. Scored by FD-clf on the CIFAR-10 feature net.
Chain: train kl_cifar10 into `kl`, `--mode cache` it, then train here.
"""
import ml_collections

from ardiff_jax import configlib
from ardiff_jax.evals.features import use_cifar_feature_net
from ardiff_jax.methods.mar import mar_base_config
from ardiff_jax.tokenizers.train import tokenizer_config

CIFAR_TRAIN = 50_000


def get_config(arg=None):
  a = configlib.parse_arg(arg, steps=40000, batch=256, kl="workdirs/kl_cifar10", path="data/cifar10")
  c = mar_base_config("mar_small", a.batch)
  c.tokenizer = tokenizer_config("kl_small")
  c.tokenizer.latent_scale = 0.0            # 1/std of the cache
  c.mar.tokenizer_workdir = a.kl
  c.mar.patch_size = 2
  c.data.source = "cached"
  c.data.path = a.kl + "/cache"
  c.data.image_size = 32
  c.eval.data = ml_collections.ConfigDict(configlib.base_config().data.to_dict())
  c.eval.data.source = "folder"
  c.eval.data.path = a.path
  use_cifar_feature_net(c.eval.feature_net)
  c.train.num_steps = a.steps
  c.optim.warmup_steps = 5 * CIFAR_TRAIN // a.batch
  c.train.log_every = 200
  c.train.ckpt_every = 5000
  c.sample.cfg_scale = 3.0
  c.sample.num_samples = c.sample.batch_size = 100
  c.eval.num_samples = 10000
  c.eval.batch_size = 250
  return c
