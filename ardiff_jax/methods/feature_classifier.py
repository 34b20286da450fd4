"""The feature classifier's training objective, as a `Method` (network: models/classifier.py).

Softmax cross-entropy (optional label smoothing) on images shifted by up to `max_shift` pixels
(reflect padding) inside the jitted loss, flipped by the data pipeline where the dataset allows.
AdamW with cosine decay (`classifier_train_config`). The evaluator (`evals/features.py`) trains one
such net per dataset through the engine, caches it and reads its penultimate features.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ardiff_jax import configlib
from ardiff_jax.methods import Method
from ardiff_jax.models.classifier import ARCHS, NORMS, FeatureClassifier


def build_classifier(f: ml_collections.ConfigDict, num_classes: int) -> FeatureClassifier:
  norm, arch = f.get("norm", "group"), f.get("arch", "strided")
  if norm not in NORMS:
    raise ValueError(f"eval.feature_net.norm={norm!r} is not one of {NORMS}")
  if arch not in ARCHS:
    raise ValueError(f"eval.feature_net.arch={arch!r} is not one of {ARCHS}")
  return FeatureClassifier(num_classes=num_classes, widths=tuple(f.widths),
                           blocks_per_stage=f.blocks_per_stage, stem_stride=f.stem_stride,
                           groups=f.groups, norm=norm, arch=arch,
                           residual_stages=tuple(f.get("residual_stages", (1, 3))))


def random_shift(rng: jax.Array, images: jax.Array, max_shift: int) -> jax.Array:
  """Translates each image [B,H,W,C] by its own integer offset in [-max_shift, max_shift]²."""
  if max_shift <= 0:
    return images
  b, h, w, _ = images.shape
  padded = jnp.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)),
                   mode="reflect")
  offsets = jax.random.randint(rng, (b, 2), 0, 2 * max_shift + 1)
  crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, img.shape[-1]))
  return jax.vmap(crop)(padded, offsets)


def make_method(config: ml_collections.ConfigDict) -> Method:
  """The classifier's training objective: softmax cross-entropy on shifted (and flipped) images."""
  f = config.classifier
  net = build_classifier(f, config.data.num_classes)
  size = config.data.image_size

  init = lambda rng: net.init(rng, jnp.zeros((1, size, size, 3), jnp.float32))

  def init_extras(rng):
    """BatchNorm's running statistics ({} for GroupNorm); their values do not depend on rng."""
    return {k: v for k, v in init(rng).items() if k != "params"}

  def loss_fn(params, batch, rng, step, extras):
    del step
    images = random_shift(rng, batch["image"], f.max_shift)
    if extras:
      (_, logits), extras = net.apply({"params": params, **extras}, images, train=True,
                                      mutable=list(extras))
      extras = dict(extras)
    else:
      _, logits = net.apply({"params": params}, images, train=True)
    targets = optax.smooth_labels(jax.nn.one_hot(batch["label"], config.data.num_classes),
                                  f.label_smoothing)
    loss = optax.softmax_cross_entropy(logits, targets).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return loss, {"train_accuracy": accuracy}, extras

  return Method(name="feature_classifier", model=net,
                init_params=lambda rng: init(rng)["params"], init_extras=init_extras,
                loss_fn=loss_fn, batch_keys=("image", "label"))


def classifier_train_config(data_cfg: ml_collections.ConfigDict,
                            f: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The engine config that trains the feature net on `data_cfg`'s train split."""
  if data_cfg.source == "cached":
    raise ValueError("the feature net trains on images, but data.source='cached' holds latents; "
                     "set config.eval.data to the image dataset the cache was made from")
  c = configlib.base_config()
  c.method = "feature_classifier"
  c.seed = f.seed
  c.data = data_cfg.copy_and_resolve_references()
  c.classifier = f.copy_and_resolve_references()
  c.train.num_steps = f.steps
  c.train.batch_size = f.batch_size
  c.train.log_every = max(1, f.steps // 10)
  c.train.ckpt_every = max(1, f.steps // 5)   # a long CPU run resumes where it stopped
  c.train.keep_checkpoints = 1
  c.optim.lr = f.lr
  c.optim.b1, c.optim.b2 = 0.9, 0.999
  c.optim.weight_decay = f.weight_decay
  c.optim.warmup_steps = f.warmup_steps
  c.optim.schedule = "cosine"
  return c
