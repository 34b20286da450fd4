"""The FID InceptionV3 in Flax: the network of TensorFlow's 2015-12-05 graph, as pytorch-fid ports it.

Identical in structure to pytorch-fid's `fid_inception_v3` (torchvision's Inception3 with aux logits
removed, 1008 classes and the FID patches): in the A, C and E_1 blocks the 3×3 average pool ignores
the zero padding (TensorFlow's `count_include_pad=False` behaviour); the last E block (Mixed_7c)
max-pools instead of average-pooling. Every conv is bias-free and followed by BatchNorm(eps=1e-3)
and ReLU. Inputs are uint8-range images scaled to [0, 1], resized to 299×299 bilinearly with half-pixel
centres and no antialiasing (torch's `interpolate(..., align_corners=False)`), then mapped to [-1, 1].

Outputs: `pool` [B, 2048] (FID and precision/recall features), `logits` [B, 1008] and
`logits_unbiased` [B, 1008] (the fc without its bias: what the original Inception-score code and
torch-fidelity feed to the softmax). Weights: `convert/inception.py` turns the standard
`pt_inception-2015-12-05-6726825d.pth` file into the `.npz` that `load_inception` reads.
"""
from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

INPUT_SIZE = 299
NUM_CLASSES = 1008


class BasicConv(nn.Module):
  """conv (no bias) -> BatchNorm(eps 1e-3, running statistics) -> ReLU. torch name: `<x>.conv`, `<x>.bn`."""
  features: int
  kernel: tuple[int, int]
  strides: int = 1
  padding: Any = 0

  @nn.compact
  def __call__(self, x):
    pad = self.padding
    if isinstance(pad, int):
      pad = (pad, pad)
    x = nn.Conv(self.features, self.kernel, strides=self.strides,
                padding=((pad[0], pad[0]), (pad[1], pad[1])), use_bias=False, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3_same(x):
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, (1, 1), name="branch1x1")(x)
    b5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
    b5 = BasicConv(64, (5, 5), padding=2, name="branch5x5_2")(b5)
    b3 = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = BasicConv(96, (3, 3), padding=1, name="branch3x3dbl_2")(b3)
    b3 = BasicConv(96, (3, 3), padding=1, name="branch3x3dbl_3")(b3)
    bp = BasicConv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, (3, 3), strides=2, name="branch3x3")(x)
    bd = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(96, (3, 3), padding=1, name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = BasicConv(192, (1, 1), name="branch1x1")(x)
    b7 = BasicConv(c7, (1, 1), name="branch7x7_1")(x)
    b7 = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = BasicConv(192, (1, 1), name="branch_pool")(_avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
    b3 = BasicConv(320, (3, 3), strides=2, name="branch3x3_2")(b3)
    b7 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """`max_pool=True` is the FID graph's Mixed_7c quirk (max instead of average pool)."""
  max_pool: bool = False

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(320, (1, 1), name="branch1x1")(x)
    b3 = BasicConv(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], -1)
    bd = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(384, (3, 3), padding=1, name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                          BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], -1)
    if self.max_pool:
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_3x3_same(x)
    bp = BasicConv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def preprocess(images: jax.Array) -> jax.Array:
  """[B,H,W,3] in [0, 255] (uint8 or float) -> [B,299,299,3] in [-1, 1], pytorch-fid's resize."""
  x = images.astype(jnp.float32) / 255.0
  if x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
    x = jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, x.shape[3]), "bilinear",
                         antialias=False)
  return 2.0 * x - 1.0


class InceptionV3(nn.Module):
  """uint8-range images [B,H,W,3] -> {"pool": [B,2048], "logits": [B,1008], "logits_unbiased": ...}."""

  @nn.compact
  def __call__(self, images):
    x = preprocess(images)
    x = BasicConv(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = BasicConv(64, (3, 3), padding=1, name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    x = InceptionC(128, name="Mixed_6b")(x)
    x = InceptionC(160, name="Mixed_6c")(x)
    x = InceptionC(160, name="Mixed_6d")(x)
    x = InceptionC(192, name="Mixed_6e")(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(name="Mixed_7b")(x)
    x = InceptionE(max_pool=True, name="Mixed_7c")(x)
    pool = x.mean(axis=(1, 2))
    fc = nn.Dense(NUM_CLASSES, name="fc")
    logits = fc(pool)
    return {"pool": pool, "logits": logits,
            "logits_unbiased": logits - fc.variables["params"]["bias"]}


def init_variables(rng: jax.Array | None = None, image_size: int = INPUT_SIZE) -> dict:
  """Randomly initialised {"params", "batch_stats"} (shapes only matter: real weights are loaded)."""
  rng = jax.random.key(0) if rng is None else rng
  return InceptionV3().init(rng, jnp.zeros((1, image_size, image_size, 3), jnp.uint8))


def save_variables(path: str, variables: dict) -> None:
  """Flat `.npz` with keys like `params/Mixed_5b/branch1x1/conv/kernel`."""
  flat = traverse_util.flatten_dict(jax.device_get(variables), sep="/")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  np.savez(path, **{k: np.asarray(v, np.float32) for k, v in flat.items()})


def load_inception(path: str) -> dict:
  """Variables from a converted `.npz`, checked against the model's structure and shapes."""
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"Inception weights {path!r} do not exist. Convert the standard FID weights with "
        "`python -m ardiff_jax.convert.inception pt_inception-2015-12-05-6726825d.pth "
        f"{path}` (the .pth file is pytorch-fid's release asset) or unset eval.inception_weights")
  expected = traverse_util.flatten_dict(jax.eval_shape(init_variables), sep="/")
  with np.load(path) as f:
    got = {k: f[k] for k in f.files}
  missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
  bad = [f"{k}: file {got[k].shape} vs model {expected[k].shape}"
         for k in set(expected) & set(got) if got[k].shape != expected[k].shape]
  if missing or extra or bad:
    raise ValueError(f"{path!r} is not a converted FID Inception: missing {missing[:5]}, "
                     f"unexpected {extra[:5]}, shape mismatches {bad[:5]}")
  return traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in got.items()}, sep="/")
