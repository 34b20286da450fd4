"""`--mode cache`: encode every image of `cache.splits` (and its mirror image, or its ten crops)
with a trained tokenizer run and write the records that `data.source=cached` reads (data/cache.py)."""
from __future__ import annotations

import os

import ml_collections

from ardiff_jax.data.cache import cache_split
from ardiff_jax.train import checkpoint


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, int]:
  """Writes `<cache.dir or workdir/cache>/<split>/` for each split; returns the records per split."""
  exp, params, step = checkpoint.restore_sampling_params(config, workdir, config.cache.use_ema)
  if exp.method.encode is None:
    raise ValueError(f"--mode cache needs a tokenizer method; config.method={config.method!r} "
                     "has no encoder")
  out_dir = config.cache.dir or os.path.join(workdir, "cache")
  counts = {split: cache_split(exp.method.encode, params, config, split, out_dir,
                              codebook_size=exp.method.codebook_size)
            for split in config.cache.splits}
  what = "codes" if exp.method.codebook_size else "posteriors"
  print(f"cached tokenizer step {step} {what} to {out_dir}: {counts}")
  return counts
