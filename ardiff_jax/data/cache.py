"""Latent cache records: tokenizer posteriors (or VQ codes) for every image and its horizontal flip.

MAR's `main_cache.py` recipe: center crop, no random flip, no shuffle, no dropped examples; each
record holds `moments` (the posterior mean and log-variance, [h,w,2C]) of the image and
`moments_flip` of its mirror image, so training on the cache with a coin flip per example equals
online flip augmentation. Each process writes its own shard:
`<dir>/<split>/shard-<p>-of-<P>.array_record`, readable with `data.source=cached, data.path=<dir>`.
`--mode cache` (modes/cache.py) restores a tokenizer run and calls `cache_split` per split.

A VQ tokenizer's `encode` returns integer codes [B,h,w]; its records hold `codes` [V,h,w] (int16
for codebooks up to 32,768 entries, else int32): V = 2 views, the image and its mirror image, or
with `cache.ten_crop` LlamaGen's recipe, V = 10: the image centre-cropped to `cache.crop_range`
(1.1) × its size, then torchvision's TenCrop (four corners and the centre, and the same of the
mirror image). A training item reads one view (`data/pipeline.py`).
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from ardiff_jax.data import pipeline, sources, transforms

LATENT_STATS = "latent_stats.json"


def _pad_to(batch: dict, size: int) -> tuple[dict, int]:
  n = len(batch["label"])
  if n == size:
    return batch, n
  return {k: np.concatenate([v, np.repeat(v[-1:], size - n, axis=0)]) for k, v in batch.items()}, n


def cache_split(encode, params, config: ml_collections.ConfigDict, split: str, out_dir: str,
                codebook_size: int = 0) -> int:
  """Encodes one split into this process's shard; returns the number of records written.

  `encode(params, images [B,H,W,3]) -> moments [B,h,w,2C] | codes int [B,h,w]`;
  `codebook_size` > 0 marks a VQ tokenizer (it sets the codes' integer width).
  """
  bs = config.cache.batch_size
  data_cfg = config.data.copy_and_resolve_references()
  data_cfg.unlock()
  data_cfg.random_flip = False
  size = data_cfg.image_size
  ten_crop = bool(codebook_size and config.cache.ten_crop)
  if ten_crop:
    data_cfg.image_size = int(size * config.cache.crop_range)   # LlamaGen: int(256 · 1.1) = 281
  ds = pipeline.make_dataset(data_cfg, split=split, seed=config.seed, batch_size=bs, train=False,
                             process_index=jax.process_index(), process_count=jax.process_count())

  @jax.jit
  def both(params, images):
    return encode(params, images), encode(params, jnp.flip(images, axis=2))

  @jax.jit
  def crops(params, images):   # [B·10, S, S, 3] -> [B·10, h, w]
    return encode(params, images)

  sums = np.zeros(3)   # count, Σ mean, Σ mean² of the posterior means (for the latent scale)

  def views(images):
    """[B, H, W, 3] -> codes [B, V, h, w] or (moments, moments of the mirror images)."""
    if ten_crop:
      c = transforms.ten_crop(images, size)                     # [B, 10, S, S, 3]
      codes = jax.device_get(crops(params, c.reshape((-1,) + c.shape[2:])))
      return codes.reshape((len(images), 10) + codes.shape[1:])
    m, mf = jax.device_get(both(params, images))
    return np.stack([m, mf], axis=1) if codebook_size else (m, mf)

  def records():
    with tqdm(desc=f"cache {split}", unit="img") as bar:
      for batch in ds:
        padded, n = _pad_to({"image": batch["image"], "label": batch["label"]}, bs)
        out = views(padded["image"])
        for i in range(n):
          label = int(padded["label"][i])
          if codebook_size:
            yield {"codes": np.asarray(out[i]).astype(sources.code_dtype(codebook_size)),
                   "label": label}
          else:
            yield {"moments": np.asarray(out[0][i], np.float32),
                   "moments_flip": np.asarray(out[1][i], np.float32), "label": label}
        if not codebook_size:
          means = np.asarray(out[0][:n, ..., : out[0].shape[-1] // 2], np.float64)
          sums[:] += (means.size, means.sum(), np.square(means).sum())
        bar.update(n)

  os.makedirs(os.path.join(out_dir, split), exist_ok=True)
  name = f"shard-{jax.process_index():05d}-of-{jax.process_count():05d}.array_record"
  count = sources.write_cached_shard(os.path.join(out_dir, split, name), records())
  logging.info("cached %d %s examples to %s", count, split, os.path.join(out_dir, split))
  if jax.process_index() == 0 and sums[0]:
    mean = sums[1] / sums[0]
    std = float(np.sqrt(max(sums[2] / sums[0] - mean ** 2, 1e-12)))
    with open(os.path.join(out_dir, split, LATENT_STATS), "w") as f:
      json.dump({"mean": float(mean), "std": std, "suggested_scale": 1.0 / std,
                 "num_values": int(sums[0])}, f, indent=2)
  return count


def latent_scale_from_cache(cache_dir: str, split: str = "train") -> float:
  """1/std of the cached posterior means (LDM's `scale_factor` rule), from `--mode cache`'s stats."""
  path = os.path.join(cache_dir, split, LATENT_STATS)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: run --mode cache with the tokenizer first, or "
                            "set tokenizer.latent_scale to a positive number (0.2325 for KL-16)")
  with open(path) as f:
    return float(json.load(f)["suggested_scale"])
