"""Feature networks we train ourselves: a small conv classifier per dataset, for FD-clf and class accuracy.

Where the ImageNet InceptionV3 is unavailable or meaningless (digits, CIFAR-10 at 32 px, CI), every
generator is judged on the features of a classifier trained on the dataset's own train split by
this framework's engine (`method = "feature_classifier"`). The trained net is cached under a key
made of everything that changes it (data settings and classifier settings), so all later
evaluations on that dataset reuse it; its held-out accuracy travels with every metric computed
from it, and a metric always names the feature net it came from.

The network is `models/classifier.py`, its objective `methods/feature_classifier.py`.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from ardiff_jax import configlib
from ardiff_jax.data import pipeline, sources, transforms
from ardiff_jax.methods.feature_classifier import classifier_train_config
from ardiff_jax.models.classifier import FeatureClassifier
from ardiff_jax.train import checkpoint
from ardiff_jax.train.loop import train_and_evaluate

CACHE_ENV = "ARDIFF_JAX_CACHE"
RESULT_FILE = "feature_net.json"


_DATA_KEYS = ("source", "path", "tfds_name", "train_split", "eval_split", "image_size",
              "num_classes", "digits_test_fraction", "random_flip")


def cache_key(data_cfg: ml_collections.ConfigDict, f: ml_collections.ConfigDict) -> str:
  """`<source>-<size>px-<hash>`: the hash covers every data and classifier setting that matters."""
  data = {k: data_cfg.get(k) for k in _DATA_KEYS}
  if data["path"]:   # the folder itself, however it is reached (a relative path, a symlink)
    data["path"] = os.path.realpath(data["path"])
  settings = {k: v for k, v in f.to_dict().items() if k != "dir"}
  blob = json.dumps({"data": data, "classifier": settings}, sort_keys=True, default=list)
  name = os.path.basename(os.path.normpath(data_cfg.path)) if data_cfg.path else data_cfg.source
  return f"{name}-{data_cfg.image_size}px-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def cache_dir(data_cfg: ml_collections.ConfigDict, f: ml_collections.ConfigDict) -> str:
  root = f.dir or os.path.join(
      os.environ.get(CACHE_ENV, os.path.join(os.path.expanduser("~"), ".cache", "ardiff_jax")),
      "feature_nets")
  return os.path.join(root, cache_key(data_cfg, f))


@dataclasses.dataclass
class FeatureNet:
  """A trained classifier as a feature extractor. `name` identifies it in every metric file."""
  name: str
  model: FeatureClassifier
  variables: Any    # {"params": ...} plus "batch_stats" for a BatchNorm net
  accuracy: float
  directory: str

  def __post_init__(self):
    self._apply = jax.jit(
        lambda v, x: self.model.apply(v, x.astype(jnp.float32) / 127.5 - 1.0, train=False))

  def features_and_logits(self, images_uint8: np.ndarray, batch_size: int = 256,
                          desc: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N,H,W,3] -> (float64 features [N, D], float64 logits [N, C]), in fixed-size batches."""
    return batched_apply(lambda x: self._apply(self.variables, x), images_uint8, batch_size, desc)


def batched_apply(fn, images_uint8: np.ndarray, batch_size: int, desc: str | None = None):
  """Applies fn(uint8 [b,H,W,3]) -> tuple of [b, ...] arrays over uint8 images [N,H,W,3] in
  fixed-size batches (the last one padded, so one compilation); returns float64 NumPy arrays."""
  images_uint8 = np.asarray(images_uint8)
  if images_uint8.dtype != np.uint8 or images_uint8.ndim != 4:
    raise ValueError(f"expected uint8 images [N,H,W,C], got {images_uint8.dtype} {images_uint8.shape}")
  n = len(images_uint8)
  outs = []
  for i in tqdm(range(0, n, batch_size), desc=desc, unit="batch", disable=desc is None):
    chunk = images_uint8[i:i + batch_size]
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
    res = jax.device_get(fn(chunk))
    outs.append([np.asarray(r[:len(r) - pad], np.float64) for r in res])
  return tuple(np.concatenate(parts) for parts in zip(*outs))


def load_images(data_cfg: ml_collections.ConfigDict, split: str, *, limit: int = 0,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 images [N,S,S,3], int labels [N]) of a split, center-cropped and unflipped.

  limit = 0: the whole split in dataset order. Otherwise a seeded random subset of `limit`
  images (dataset order groups classes, so a prefix would be one class). Unreadable files are
  skipped with one warning, as in training, up to `data.max_skipped_fraction` of them.
  """
  source = pipeline.make_source(data_cfg, split, seed)
  pipeline.check_num_classes(data_cfg, source, split)
  total = len(source)
  indices = np.arange(total)
  if limit and limit < total:
    indices = np.sort(np.random.default_rng(seed).choice(total, limit, replace=False))

  def decode(i):
    record = source[int(i)]
    try:
      return sources.decode_image_record(record, data_cfg.image_size), int(record["label"])
    except transforms.IMAGE_DECODE_ERRORS:
      return None

  with concurrent.futures.ThreadPoolExecutor(max(1, min(16, os.cpu_count() or 1))) as pool:
    decoded = list(tqdm(pool.map(decode, indices, chunksize=64), total=len(indices),
                        desc=f"read {split}", unit="img", mininterval=2.0))
  kept = [d for d in decoded if d is not None]
  if len(kept) < len(decoded):
    logging.warning("skipped %d unreadable images in split %r", len(decoded) - len(kept), split)
    pipeline.check_skipped_fraction(len(decoded) - len(kept), len(decoded),
                                    data_cfg.get("max_skipped_fraction", 0.1), min_read=1)
  if not kept:
    raise ValueError(f"split {split!r} of data.source={data_cfg.source!r} holds no readable images")
  return np.stack([k[0] for k in kept]), np.asarray([k[1] for k in kept], np.int64)


def _restore_classifier(directory: str, config: ml_collections.ConfigDict):
  """(classifier module, host variables: params plus any BatchNorm statistics) of the trained net."""
  exp, params, extras, _ = checkpoint.restore_run(config, directory, use_ema=False)
  return exp.method.model, jax.device_get({"params": params, **extras})


def get_feature_net(data_cfg: ml_collections.ConfigDict, f: ml_collections.ConfigDict) -> FeatureNet:
  """The cached feature net for this dataset and these settings, trained first if absent.

  Training runs through `train_and_evaluate` (so it resumes if interrupted); afterwards the
  held-out accuracy on `data.eval_split` is measured once and stored in `feature_net.json`.
  """
  directory = cache_dir(data_cfg, f)
  config = classifier_train_config(data_cfg, f)
  result_path = os.path.join(directory, RESULT_FILE)
  model, variables = None, None
  if not os.path.exists(result_path):
    logging.info("training the %s feature net in %s (cached for later evaluations)",
                 data_cfg.source, directory)
    train_and_evaluate(config, directory)
    model, variables = _restore_classifier(directory, config)
    images, labels = load_images(data_cfg, data_cfg.eval_split)
    _, logits = FeatureNet("", model, variables, 0.0, directory).features_and_logits(images)
    accuracy = float(np.mean(np.argmax(logits, -1) == labels))
    with open(result_path, "w") as fh:
      json.dump({"name": os.path.basename(directory), "accuracy": accuracy,
                 "num_test_images": int(len(labels)), "split": data_cfg.eval_split,
                 "settings": configlib.to_dict(f)}, fh, indent=2, default=list)
    logging.info("feature net %s: held-out accuracy %.4f", os.path.basename(directory), accuracy)
  with open(result_path) as fh:
    result = json.load(fh)
  if variables is None:   # restored once: just trained above, or from the cache
    model, variables = _restore_classifier(directory, config)
  print(f"feature net {result['name']}: held-out accuracy {result['accuracy']:.4f} "
        f"on {result['num_test_images']} {result['split']} images")
  return FeatureNet(result["name"], model, variables, result["accuracy"], directory)
