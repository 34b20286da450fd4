"""The FID InceptionV3's PyTorch state-dict names and shapes, written out from torchvision's
Inception3 (aux logits removed, 1008 classes) independently of ardiff_jax's Flax model."""
from __future__ import annotations


def _a(name, cin, pool):
  return [(f"{name}.branch1x1", cin, 64, (1, 1)), (f"{name}.branch5x5_1", cin, 48, (1, 1)),
          (f"{name}.branch5x5_2", 48, 64, (5, 5)), (f"{name}.branch3x3dbl_1", cin, 64, (1, 1)),
          (f"{name}.branch3x3dbl_2", 64, 96, (3, 3)), (f"{name}.branch3x3dbl_3", 96, 96, (3, 3)),
          (f"{name}.branch_pool", cin, pool, (1, 1))]


def _c(name, c7):
  return [(f"{name}.branch1x1", 768, 192, (1, 1)), (f"{name}.branch7x7_1", 768, c7, (1, 1)),
          (f"{name}.branch7x7_2", c7, c7, (1, 7)), (f"{name}.branch7x7_3", c7, 192, (7, 1)),
          (f"{name}.branch7x7dbl_1", 768, c7, (1, 1)), (f"{name}.branch7x7dbl_2", c7, c7, (7, 1)),
          (f"{name}.branch7x7dbl_3", c7, c7, (1, 7)), (f"{name}.branch7x7dbl_4", c7, c7, (7, 1)),
          (f"{name}.branch7x7dbl_5", c7, 192, (1, 7)), (f"{name}.branch_pool", 768, 192, (1, 1))]


def _e(name, cin):
  return [(f"{name}.branch1x1", cin, 320, (1, 1)), (f"{name}.branch3x3_1", cin, 384, (1, 1)),
          (f"{name}.branch3x3_2a", 384, 384, (1, 3)), (f"{name}.branch3x3_2b", 384, 384, (3, 1)),
          (f"{name}.branch3x3dbl_1", cin, 448, (1, 1)), (f"{name}.branch3x3dbl_2", 448, 384, (3, 3)),
          (f"{name}.branch3x3dbl_3a", 384, 384, (1, 3)), (f"{name}.branch3x3dbl_3b", 384, 384, (3, 1)),
          (f"{name}.branch_pool", cin, 192, (1, 1))]


CONVS = (
    [("Conv2d_1a_3x3", 3, 32, (3, 3)), ("Conv2d_2a_3x3", 32, 32, (3, 3)),
     ("Conv2d_2b_3x3", 32, 64, (3, 3)), ("Conv2d_3b_1x1", 64, 80, (1, 1)),
     ("Conv2d_4a_3x3", 80, 192, (3, 3))]
    + _a("Mixed_5b", 192, 32) + _a("Mixed_5c", 256, 64) + _a("Mixed_5d", 288, 64)
    + [("Mixed_6a.branch3x3", 288, 384, (3, 3)), ("Mixed_6a.branch3x3dbl_1", 288, 64, (1, 1)),
       ("Mixed_6a.branch3x3dbl_2", 64, 96, (3, 3)), ("Mixed_6a.branch3x3dbl_3", 96, 96, (3, 3))]
    + _c("Mixed_6b", 128) + _c("Mixed_6c", 160) + _c("Mixed_6d", 160) + _c("Mixed_6e", 192)
    + [("Mixed_7a.branch3x3_1", 768, 192, (1, 1)), ("Mixed_7a.branch3x3_2", 192, 320, (3, 3)),
       ("Mixed_7a.branch7x7x3_1", 768, 192, (1, 1)), ("Mixed_7a.branch7x7x3_2", 192, 192, (1, 7)),
       ("Mixed_7a.branch7x7x3_3", 192, 192, (7, 1)), ("Mixed_7a.branch7x7x3_4", 192, 192, (3, 3))]
    + _e("Mixed_7b", 1280) + _e("Mixed_7c", 2048))


def state_dict_shapes(num_classes: int = 1008) -> dict[str, tuple[int, ...]]:
  """{torch key: shape} of the FID Inception, BatchNorm buffers and counters included."""
  shapes = {}
  for name, cin, cout, (kh, kw) in CONVS:
    shapes[f"{name}.conv.weight"] = (cout, cin, kh, kw)
    for leaf in ("weight", "bias", "running_mean", "running_var"):
      shapes[f"{name}.bn.{leaf}"] = (cout,)
    shapes[f"{name}.bn.num_batches_tracked"] = ()
  shapes["fc.weight"] = (num_classes, 2048)
  shapes["fc.bias"] = (num_classes,)
  return shapes


def num_trainable(num_classes: int = 1008) -> int:
  """Conv weights, BatchNorm affine parameters and the fc layer (running statistics excluded)."""
  total = 0
  for key, shape in state_dict_shapes(num_classes).items():
    if "running" in key or "num_batches" in key:
      continue
    n = 1
    for s in shape:
      n *= s
    total += n
  return total
