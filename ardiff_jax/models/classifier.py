"""The classifier behind FD-clf and class accuracy (trained by `methods/feature_classifier.py`).

Architecture (our choice; the papers evaluate on ImageNet with Inception): a pre-activation-free
ResNet with `stem_stride` (2 for the upsampled 8×8 digits, whose 32 px carry no more detail than
16 px), one or more residual blocks per stage, global average pooling to the penultimate features
[B, widths[-1]], and a linear classifier; or the pooled ResNet-9 layout (see `FeatureClassifier`).
`norm="group"` (GroupNorm) keeps the net stateless and is the default for digits; `norm="batch"`
(BatchNorm, batch statistics in training, running averages kept in the method-owned `extras` of
the train state and used for every feature afterwards, so a feature never depends on the other
images of its batch) converges faster on natural images and is the CIFAR-10 choice.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn


NORMS = ("group", "batch")
ARCHS = ("strided", "pooled")
BN_MOMENTUM = 0.9   # running-average decay of the BatchNorm statistics


def _norm_layer(kind: str, width: int, groups: int, train: bool, name: str) -> nn.Module:
  if kind == "batch":
    return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, name=name)
  return nn.GroupNorm(num_groups=min(groups, width), name=name)


class _ResBlock(nn.Module):
  width: int
  stride: int
  groups: int
  norm: str

  @nn.compact
  def __call__(self, x, train: bool):
    norm = lambda name: _norm_layer(self.norm, self.width, self.groups, train, name)
    h = nn.Conv(self.width, (3, 3), strides=self.stride, padding=1, name="conv1")(x)
    h = nn.relu(norm("norm1")(h))
    h = nn.Conv(self.width, (3, 3), padding=1, name="conv2")(h)
    h = norm("norm2")(h)
    if self.stride != 1 or x.shape[-1] != self.width:
      x = nn.Conv(self.width, (1, 1), strides=self.stride, name="shortcut")(x)
    return nn.relu(x + h)


class FeatureClassifier(nn.Module):
  """images [B, H, W, 3] in [-1, 1] -> (features [B, widths[-1]], logits [B, num_classes]).

  arch="strided": a stem conv at `stem_stride`, then one stage per width of `blocks_per_stage`
  residual blocks, each stage after the first entered by a stride-2 block; features are the
  global average. arch="pooled" (the ResNet-9 layout of Page's fast CIFAR-10 training): a
  conv-norm-ReLU at widths[0], then per later width a conv-norm-ReLU followed by a 2×2 max-pool,
  with `blocks_per_stage` residual blocks after the stages in `residual_stages` (indices into
  widths); features are the global maximum. Pooling right after each widening conv runs most
  convolutions at a quarter of the pixels: the CIFAR-10 net (16/32/64/128, 413,514 parameters)
  has more parameters than the strided 32/64/128 one (308,938) and runs 2.4× more steps per
  second on a CPU.

  train=True normalises BatchNorm layers by the batch (and must be applied with
  mutable=["batch_stats"]); train=False uses the running averages. GroupNorm ignores it.
  """
  num_classes: int
  widths: Sequence[int] = (32, 64, 128)
  blocks_per_stage: int = 1
  stem_stride: int = 2
  groups: int = 8
  norm: str = "group"
  arch: str = "strided"
  residual_stages: Sequence[int] = (1, 3)

  @nn.compact
  def __call__(self, images, train: bool = False):
    x = nn.Conv(self.widths[0], (3, 3), strides=self.stem_stride, padding=1, name="stem")(images)
    x = nn.relu(_norm_layer(self.norm, self.widths[0], self.groups, train, "stem_norm")(x))
    if self.arch == "pooled":
      for s, width in enumerate(self.widths[1:], start=1):
        x = nn.Conv(width, (3, 3), padding=1, name=f"stage{s}_conv")(x)
        x = nn.relu(_norm_layer(self.norm, width, self.groups, train, f"stage{s}_norm")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        for b in range(self.blocks_per_stage if s in self.residual_stages else 0):
          x = _ResBlock(width, 1, self.groups, self.norm, name=f"stage{s}_block{b}")(x, train)
      features = x.max(axis=(1, 2))
    else:
      for s, width in enumerate(self.widths):
        for b in range(self.blocks_per_stage):
          stride = 2 if (s > 0 and b == 0) else 1
          x = _ResBlock(width, stride, self.groups, self.norm, name=f"stage{s}_block{b}")(x, train)
      features = x.mean(axis=(1, 2))
    return features, nn.Dense(self.num_classes, name="head")(features)


