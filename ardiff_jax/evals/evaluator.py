"""The evaluator: generate N images in sharded batches and score them on every feature network available.

`--mode eval` (modes/eval.py) and `--mode sample` call it; the train mode calls it periodically.

What is scored (`eval.source`):
  - `model`: the newest checkpoint's generations (`Method.generate`), class-balanced labels
    (equal counts per class, in class order as MAR's evaluation), batched and jitted; for a
    tokenizer, its reconstructions of the held-out split.
  - `real_train`: a seeded random subset of real training images, the sanity check of the metrics
    themselves (it needs no checkpoint).
The reference is always the held-out real split (`data.eval_split`, or `eval.num_real` of it).

Metrics, each named with its feature network:
  - on our own classifier (`evals/features.py`): `fd_clf`, `class_accuracy` (arg-max class of a
    sample vs the class it was generated for), `precision`, `recall` (k = `eval.pr_k`), and the
    memorisation check `memorization/*` (`metrics.memorization`: the samples' nearest-training-
    image distance against the held-out images', over `eval.memorization_train` training images);
  - on the FID InceptionV3, when `eval.inception_weights` is set: `fid` (against `eval.fid_stats`,
    or statistics of the held-out split computed once and saved), `inception_score` (10 splits),
    `precision_inception`, `recall_inception`.
Precision/recall use equal-size seeded subsets of the two sets (`pr_num_each`); FD uses all of both.
Files (written by the mode): `eval/<step>.json` for the model, `eval/real_train_<step>.json` for
the real-data check.
"""
from __future__ import annotations

import os

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from ardiff_jax.evals import features, inception
from ardiff_jax.evals import metrics as M
from ardiff_jax.parallel import sharding as shd

SOURCES = ("model", "real_train")


def eval_data_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The image dataset the metrics refer to: `eval.data` if a config sets it (generators trained
  on cached latents), else `data`."""
  return config.eval.data if "data" in config.eval else config.data


def balanced_labels(num_samples: int, num_classes: int, interleave: bool = False) -> np.ndarray:
  """[N] labels with equal counts per class (±1): in class order, 0,0,…,1,1,… (one grid row per
  class), or interleaved, 0,1,…,K−1,0,1,… (`--mode eval`: every generation batch holds every
  class, so nothing batch-level can meet one class at a time)."""
  per_class = -(-num_samples // num_classes)
  if interleave:
    return np.tile(np.arange(num_classes), per_class)[:num_samples].astype(np.int32)
  return np.repeat(np.arange(num_classes), per_class)[:num_samples].astype(np.int32)


def pad_batch(batch: dict, size: int) -> dict:
  """Arrays [n, ...] -> [size, ...], the last row repeated: one compiled shape for a short batch."""
  n = len(next(iter(batch.values())))
  if n == size:
    return batch
  return {k: np.concatenate([v, np.repeat(v[-1:], size - n, axis=0)]) for k, v in batch.items()}


def generate_images(exp, params, inputs: dict, batch_size: int, seed: int, frozen=None) -> np.ndarray:
  """Runs `Method.generate` over `inputs` (arrays [N, ...]) in fixed-size sharded batches.

  Batch i draws its randomness from fold_in(key(seed), i); the last batch is padded and trimmed,
  so there is one compilation. Returns uint8 [N, H, W, 3].
  """
  data_par = exp.mesh.shape.get("data", 1) * exp.mesh.shape.get("fsdp", 1)
  if batch_size % data_par:
    raise ValueError(f"eval.batch_size={batch_size} must be a multiple of the data-parallel mesh "
                     f"size data×fsdp={data_par}")
  rules = exp.rules

  def gen(p, f, b, rng):
    with nn.logical_axis_rules(rules):
      return exp.method.generate(p, f, b, rng)

  gen = jax.jit(gen)
  n = len(next(iter(inputs.values())))
  rng = jax.random.key(seed)
  out = []
  for i, start in enumerate(tqdm(range(0, n, batch_size), desc="generate", unit="batch")):
    chunk = {k: v[start:start + batch_size] for k, v in inputs.items()}
    m = len(next(iter(chunk.values())))
    batch = shd.global_batch(pad_batch(chunk, batch_size), exp.mesh)
    out.append(np.asarray(jax.device_get(gen(params, frozen, batch, jax.random.fold_in(rng, i))))[:m])
  return np.concatenate(out)


def equal_size(a: np.ndarray, b: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Seeded random subsets of a and b with min(len(a), len(b)) rows each.

  k-NN radii shrink as a set grows, so improved precision/recall compare sets of equal size
  (Kynkäänniemi et al. use 50k against 50k).
  """
  n = min(len(a), len(b))
  rng = np.random.default_rng(seed)
  pick = lambda x: x if len(x) == n else x[np.sort(rng.choice(len(x), n, replace=False))]
  return pick(a), pick(b)


def real_reference(fnet: features.FeatureNet, data_cfg, num_real: int, seed: int):
  """Held-out images, labels and their feature-net features, cached next to the feature net."""
  images, labels = features.load_images(data_cfg, data_cfg.eval_split, limit=num_real, seed=seed)
  path = os.path.join(fnet.directory, f"real_{data_cfg.eval_split}_{num_real}_{seed}.npz")
  if os.path.exists(path):
    with np.load(path) as f:
      if len(f["features"]) == len(images):
        return images, labels, f["features"], f["logits"]
  feats, logits = fnet.features_and_logits(images, desc="features (real)")
  np.savez(path, features=feats, logits=logits)
  return images, labels, feats, logits


def inception_metrics(config, workdir, gen_images: np.ndarray, real_images: np.ndarray) -> dict:
  """FID, IS and Inception precision/recall; {} when no Inception weights are configured."""
  ecfg = config.eval
  if not ecfg.inception_weights:
    return {}
  variables = inception.load_inception(ecfg.inception_weights)
  net = inception.InceptionV3()
  apply = jax.jit(lambda x: (lambda o: (o["pool"], o["logits_unbiased"]))(net.apply(variables, x)))

  def run(images, desc):
    return features.batched_apply(apply, images, ecfg.inception_batch_size, desc)

  gen_pool, gen_logits = run(gen_images, "inception (generated)")
  stats_path = ecfg.fid_stats or os.path.join(workdir, "eval", "fid_stats_real.npz")
  if os.path.exists(stats_path):
    mu, sigma = M.load_stats(stats_path)
    real_pool = None
  else:
    real_pool, _ = run(real_images, "inception (real)")
    mu, sigma = M.feature_stats(real_pool)
    M.save_stats(stats_path, mu, sigma)
    logging.info("wrote Inception reference statistics to %s", stats_path)
  probs = np.asarray(jax.nn.softmax(gen_logits, axis=-1), np.float64)
  is_mean, is_std = M.inception_score(probs, splits=10)
  out = {"fid": M.frechet_distance(*M.feature_stats(gen_pool), mu, sigma),
         "fid_reference": stats_path, "inception_score": is_mean, "inception_score_std": is_std}
  if real_pool is None:
    real_pool, _ = run(real_images, "inception (real)")
  out["precision_inception"], out["recall_inception"] = M.precision_recall(
      *equal_size(real_pool, gen_pool, config.seed), k=ecfg.pr_k)
  return out


def train_reference(fnet: features.FeatureNet, data_cfg, num_train: int, seed: int) -> np.ndarray:
  """Feature-net features [M, F] of `num_train` training images (0: all), cached next to the net."""
  path = os.path.join(fnet.directory, f"train_{data_cfg.train_split}_{num_train}_{seed}.npz")
  if os.path.exists(path):
    with np.load(path) as f:
      return f["features"]
  images, _ = features.load_images(data_cfg, data_cfg.train_split, limit=num_train, seed=seed)
  feats, _ = fnet.features_and_logits(images, desc="features (train)")
  np.savez(path, features=feats)
  return feats


def score(config: ml_collections.ConfigDict, workdir: str, fnet: features.FeatureNet, real: tuple,
          gen_images: np.ndarray, gen_labels: np.ndarray) -> dict:
  """Metrics of uint8 images [N,H,W,3] (generated for `gen_labels` [N]) against the held-out
  reference `real` = (images, labels, features, logits) of `real_reference`: FD-clf, class
  accuracy and precision/recall on `fnet`, plus the Inception metrics when configured."""
  ecfg = config.eval
  real_images, _, real_feats, _ = real
  gen_feats, gen_logits = fnet.features_and_logits(gen_images, desc="features (generated)")
  precision, recall = M.precision_recall(*equal_size(real_feats, gen_feats, config.seed),
                                         k=ecfg.pr_k)
  result = {
      "num_samples": int(len(gen_images)), "num_real": int(len(real_feats)),
      "feature_net": fnet.name, "feature_net_accuracy": fnet.accuracy,
      "fd_clf": M.frechet_distance_of_features(gen_feats, real_feats),
      "class_accuracy": M.class_accuracy(gen_logits, gen_labels),
      "precision": precision, "recall": recall, "pr_k": int(ecfg.pr_k),
      "pr_num_each": int(min(len(real_feats), len(gen_feats))),
  }
  num_train = int(ecfg.get("memorization_train", -1))
  if num_train >= 0:
    train_feats = train_reference(fnet, eval_data_config(config), num_train, config.seed)
    result.update({f"memorization/{k}": v for k, v in
                   M.memorization(gen_feats, real_feats, train_feats).items()})
  result.update(inception_metrics(config, workdir, gen_images, real_images))
  return result
