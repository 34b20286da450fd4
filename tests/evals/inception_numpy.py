"""A float64 NumPy forward pass of pytorch-fid's FID InceptionV3, independent of the Flax model.

Written from torchvision's `Inception3` block definitions and pytorch-fid's `FIDInceptionA`,
`FIDInceptionC`, `FIDInceptionE_1` and `FIDInceptionE_2` patches, in NHWC layout with HWIO kernels.
Nothing here calls ardiff_jax: the only thing read from the Flax side is the variables dict, by
name (`params/<block>/<layer>/conv/kernel`, `.../bn/{scale,bias}`, `batch_stats/.../bn/{mean,var}`).
Every layer also asserts its kernel size and output channels against the torchvision definition, so
a layer with the right name but the wrong shape is caught here rather than broadcast through.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

BN_EPS = 1e-3
INPUT_SIZE = 299


def _pair(v):
  return (v, v) if isinstance(v, int) else tuple(v)


def _pads(padding):
  """int | (ph, pw) | ((top, bottom), (left, right)) -> ((top, bottom), (left, right))."""
  ph, pw = _pair(padding)
  return _pair(ph), _pair(pw)


def conv2d(x, w, stride=1, padding=0):
  """x [B, H, W, Cin] (*) w [kh, kw, Cin, Cout] -> [B, Ho, Wo, Cout]: cross-correlation with zero padding.

  im2col: the kh*kw shifted (and strided) views of the padded input, concatenated along channels in
  (di, dj, c) order, times the kernel reshaped to [kh*kw*Cin, Cout] in the same order.
  """
  (pt, pb), (pl, pr) = _pads(padding)
  sh, sw = _pair(stride)
  kh, kw, cin, cout = w.shape
  assert x.shape[-1] == cin, (x.shape, w.shape)
  xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  ho, wo = (xp.shape[1] - kh) // sh + 1, (xp.shape[2] - kw) // sw + 1
  cols = np.concatenate([xp[:, di:di + sh * (ho - 1) + 1:sh, dj:dj + sw * (wo - 1) + 1:sw, :]
                         for di in range(kh) for dj in range(kw)], axis=-1)
  return cols @ w.reshape(kh * kw * cin, cout)


def batch_norm(x, scale, bias, mean, var, eps=BN_EPS):
  """Inference BatchNorm with running statistics, per channel (last axis)."""
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def relu(x):
  return np.maximum(x, 0.0)


def _windows(xp, size, stride, ho, wo):
  """The size×size window elements of padded xp, each as a [B, Ho, Wo, C] slice."""
  for di in range(size):
    for dj in range(size):
      yield xp[:, di:di + stride * (ho - 1) + 1:stride, dj:dj + stride * (wo - 1) + 1:stride, :]


def avg_pool_3x3(x, count_include_pad):
  """3×3 average pool, stride 1, zero padding 1 (same size). count_include_pad=False divides each sum
  by the number of window elements inside the image (4 at a corner, 6 on an edge, 9 inside)."""
  h, w = x.shape[1:3]
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  total = sum(_windows(xp, 3, 1, h, w))
  if count_include_pad:
    return total / 9.0
  valid = np.pad(np.ones((1, h, w, 1)), ((0, 0), (1, 1), (1, 1), (0, 0)))
  return total / sum(_windows(valid, 3, 1, h, w))


def max_pool_3x3(x, stride, padding):
  """3×3 max pool: stride 1 with padding 1 (the padding is -inf, never selected), or stride 2 VALID."""
  h, w = x.shape[1:3]
  xp = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), constant_values=-np.inf)
  ho, wo = (h + 2 * padding - 3) // stride + 1, (w + 2 * padding - 3) // stride + 1
  return np.maximum.reduce(list(_windows(xp, 3, stride, ho, wo)))


def resize_bilinear(x, out_h, out_w):
  """torch `F.interpolate(mode="bilinear", align_corners=False)` on [B, H, W, C]: source coordinate
  (i + 0.5) * in / out - 0.5, clamped below at 0; the upper neighbour clamped to the last pixel."""
  def matrix(n_in, n_out):
    src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = src - i0
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), i0), 1.0 - frac)
    np.add.at(m, (np.arange(n_out), i1), frac)
    return m
  x = np.einsum("oh,bhwc->bowc", matrix(x.shape[1], out_h), x)
  return np.einsum("pw,bhwc->bhpc", matrix(x.shape[2], out_w), x)


class Params:
  """Read-only float64 view of a Flax variables dict {"params", "batch_stats"} under a scope."""

  def __init__(self, variables: Mapping, scope: tuple[str, ...] = ()):
    self.variables = variables
    self.scope = scope

  def sub(self, name: str) -> "Params":
    return Params(self.variables, self.scope + (name,))

  def get(self, collection: str, *path: str) -> np.ndarray:
    node = self.variables[collection]
    for key in self.scope + path:
      node = node[key]
    return np.asarray(node, np.float64)


def basic_conv(x, p: Params, name, out, kernel, stride=1, padding=0):
  """torchvision's BasicConv2d: conv (bias=False) -> BatchNorm(eps=0.001) -> ReLU."""
  w = p.get("params", name, "conv", "kernel")
  assert w.shape[:2] == tuple(kernel) and w.shape[3] == out and w.shape[2] == x.shape[-1], (
      f"{p.scope + (name,)}: kernel {w.shape}, expected {kernel} x {x.shape[-1]} -> {out}")
  y = conv2d(x, w, stride, padding)
  y = batch_norm(y, p.get("params", name, "bn", "scale"), p.get("params", name, "bn", "bias"),
                 p.get("batch_stats", name, "bn", "mean"), p.get("batch_stats", name, "bn", "var"))
  return relu(y)


def inception_a(x, p: Params, pool_features):
  """FIDInceptionA: 1x1 | 1x1->5x5 | 1x1->3x3->3x3 | avgpool(no pad count)->1x1."""
  b1 = basic_conv(x, p, "branch1x1", 64, (1, 1))
  b5 = basic_conv(x, p, "branch5x5_1", 48, (1, 1))
  b5 = basic_conv(b5, p, "branch5x5_2", 64, (5, 5), padding=2)
  bd = basic_conv(x, p, "branch3x3dbl_1", 64, (1, 1))
  bd = basic_conv(bd, p, "branch3x3dbl_2", 96, (3, 3), padding=1)
  bd = basic_conv(bd, p, "branch3x3dbl_3", 96, (3, 3), padding=1)
  bp = basic_conv(avg_pool_3x3(x, count_include_pad=False), p, "branch_pool", pool_features, (1, 1))
  return np.concatenate([b1, b5, bd, bp], axis=-1)


def inception_b(x, p: Params):
  """InceptionB: 3x3 s2 | 1x1->3x3->3x3 s2 | maxpool 3x3 s2 (all VALID)."""
  b3 = basic_conv(x, p, "branch3x3", 384, (3, 3), stride=2)
  bd = basic_conv(x, p, "branch3x3dbl_1", 64, (1, 1))
  bd = basic_conv(bd, p, "branch3x3dbl_2", 96, (3, 3), padding=1)
  bd = basic_conv(bd, p, "branch3x3dbl_3", 96, (3, 3), stride=2)
  return np.concatenate([b3, bd, max_pool_3x3(x, stride=2, padding=0)], axis=-1)


def inception_c(x, p: Params, channels_7x7):
  """FIDInceptionC: 1x1 | 1x1->1x7->7x1 | 1x1->7x1->1x7->7x1->1x7 | avgpool(no pad count)->1x1."""
  c7 = channels_7x7
  b1 = basic_conv(x, p, "branch1x1", 192, (1, 1))
  b7 = basic_conv(x, p, "branch7x7_1", c7, (1, 1))
  b7 = basic_conv(b7, p, "branch7x7_2", c7, (1, 7), padding=(0, 3))
  b7 = basic_conv(b7, p, "branch7x7_3", 192, (7, 1), padding=(3, 0))
  bd = basic_conv(x, p, "branch7x7dbl_1", c7, (1, 1))
  bd = basic_conv(bd, p, "branch7x7dbl_2", c7, (7, 1), padding=(3, 0))
  bd = basic_conv(bd, p, "branch7x7dbl_3", c7, (1, 7), padding=(0, 3))
  bd = basic_conv(bd, p, "branch7x7dbl_4", c7, (7, 1), padding=(3, 0))
  bd = basic_conv(bd, p, "branch7x7dbl_5", 192, (1, 7), padding=(0, 3))
  bp = basic_conv(avg_pool_3x3(x, count_include_pad=False), p, "branch_pool", 192, (1, 1))
  return np.concatenate([b1, b7, bd, bp], axis=-1)


def inception_d(x, p: Params):
  """InceptionD: 1x1->3x3 s2 | 1x1->1x7->7x1->3x3 s2 | maxpool 3x3 s2."""
  b3 = basic_conv(x, p, "branch3x3_1", 192, (1, 1))
  b3 = basic_conv(b3, p, "branch3x3_2", 320, (3, 3), stride=2)
  b7 = basic_conv(x, p, "branch7x7x3_1", 192, (1, 1))
  b7 = basic_conv(b7, p, "branch7x7x3_2", 192, (1, 7), padding=(0, 3))
  b7 = basic_conv(b7, p, "branch7x7x3_3", 192, (7, 1), padding=(3, 0))
  b7 = basic_conv(b7, p, "branch7x7x3_4", 192, (3, 3), stride=2)
  return np.concatenate([b3, b7, max_pool_3x3(x, stride=2, padding=0)], axis=-1)


def inception_e(x, p: Params, pool: str):
  """FIDInceptionE_1 (pool="avg", no pad count) / FIDInceptionE_2 (pool="max", 3x3 s1 pad 1):
  1x1 | 1x1->{1x3, 3x1} | 1x1->3x3->{1x3, 3x1} | pool->1x1."""
  b1 = basic_conv(x, p, "branch1x1", 320, (1, 1))
  b3 = basic_conv(x, p, "branch3x3_1", 384, (1, 1))
  b3 = np.concatenate([basic_conv(b3, p, "branch3x3_2a", 384, (1, 3), padding=(0, 1)),
                       basic_conv(b3, p, "branch3x3_2b", 384, (3, 1), padding=(1, 0))], axis=-1)
  bd = basic_conv(x, p, "branch3x3dbl_1", 448, (1, 1))
  bd = basic_conv(bd, p, "branch3x3dbl_2", 384, (3, 3), padding=1)
  bd = np.concatenate([basic_conv(bd, p, "branch3x3dbl_3a", 384, (1, 3), padding=(0, 1)),
                       basic_conv(bd, p, "branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))], axis=-1)
  if pool == "avg":
    pooled = avg_pool_3x3(x, count_include_pad=False)
  elif pool == "max":
    pooled = max_pool_3x3(x, stride=1, padding=1)
  else:
    raise ValueError(pool)
  bp = basic_conv(pooled, p, "branch_pool", 192, (1, 1))
  return np.concatenate([b1, b3, bd, bp], axis=-1)


def inception_v3(images, p: Params) -> dict[str, np.ndarray]:
  """uint8-range images [B, H, W, 3] -> {"pool" [B, 2048], "logits", "logits_unbiased" [B, 1008]}.

  pytorch-fid's InceptionV3: x / 255, bilinear resize to 299 (align_corners=False), 2x - 1, then the
  torchvision stem, Mixed_5b..Mixed_7c with the FID patches, global average pool; fc on top.
  """
  x = np.asarray(images, np.float64) / 255.0
  if x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
    x = resize_bilinear(x, INPUT_SIZE, INPUT_SIZE)
  x = 2.0 * x - 1.0
  x = basic_conv(x, p, "Conv2d_1a_3x3", 32, (3, 3), stride=2)
  x = basic_conv(x, p, "Conv2d_2a_3x3", 32, (3, 3))
  x = basic_conv(x, p, "Conv2d_2b_3x3", 64, (3, 3), padding=1)
  x = max_pool_3x3(x, stride=2, padding=0)
  x = basic_conv(x, p, "Conv2d_3b_1x1", 80, (1, 1))
  x = basic_conv(x, p, "Conv2d_4a_3x3", 192, (3, 3))
  x = max_pool_3x3(x, stride=2, padding=0)
  x = inception_a(x, p.sub("Mixed_5b"), pool_features=32)
  x = inception_a(x, p.sub("Mixed_5c"), pool_features=64)
  x = inception_a(x, p.sub("Mixed_5d"), pool_features=64)
  x = inception_b(x, p.sub("Mixed_6a"))
  x = inception_c(x, p.sub("Mixed_6b"), channels_7x7=128)
  x = inception_c(x, p.sub("Mixed_6c"), channels_7x7=160)
  x = inception_c(x, p.sub("Mixed_6d"), channels_7x7=160)
  x = inception_c(x, p.sub("Mixed_6e"), channels_7x7=192)
  x = inception_d(x, p.sub("Mixed_7a"))
  x = inception_e(x, p.sub("Mixed_7b"), pool="avg")
  x = inception_e(x, p.sub("Mixed_7c"), pool="max")
  pool = x.mean(axis=(1, 2))
  fc = p.sub("fc")
  kernel = fc.get("params", "kernel")
  assert kernel.shape == (2048, 1008), kernel.shape   # Dense [in, out], 1008 classes
  unbiased = pool @ kernel
  return {"pool": pool, "logits": unbiased + fc.get("params", "bias"), "logits_unbiased": unbiased}
