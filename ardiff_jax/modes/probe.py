"""`--mode probe`: ST-AR's linear probe of a discrete AR generator (llamagen_star.md §3).

Restores the newest checkpoint (`sample.use_ema` picks the weights), reads the hidden state after
block `probe.layer` at `probe.num_positions` token positions through `Method.probe_features`
(teacher-forced VQ codes, null class token), trains one linear head per position on the training
split (`evals/linear_probe.py`: BN + linear, LARS, MAE's schedule) and scores each on the held-out
split. Writes `probe/<step>.json` and prints it.

Features are computed once with the frozen model and kept in memory (not recomputed per epoch):
  - train: `feature_passes` passes over the shuffled training split of the code cache, each image
    with one of its cached views drawn at random per pass (`data.random_flip`), at most
    `max_train` rows when > 0;
  - test: the whole eval split, first view (the unaugmented image).
The settings are `config.probe` (`configlib.probe_config()`). Runs in one process (one host, any
number of its devices).
"""
from __future__ import annotations

import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from ardiff_jax.data import pipeline
from ardiff_jax.evals import evaluator, linear_probe
from ardiff_jax.models import gpt
from ardiff_jax.parallel import sharding as shd
from ardiff_jax.train import checkpoint


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Probes the newest checkpoint; returns the summary also written to `probe/<step>.json`."""
  start = time.time()
  pcfg = config.probe
  if pcfg.feature_passes < 1:
    raise ValueError(f"probe.feature_passes={pcfg.feature_passes}: extract at least one pass over "
                     "the training split")
  data_cfg = _single_view_data(config)
  if jax.process_count() > 1:
    raise ValueError(f"--mode probe runs in one process, got {jax.process_count()}: run it on a "
                     "single host (a checkpoint restores onto any mesh; set --config.mesh.shape "
                     "to fit that host's devices)")
  exp, params, step = checkpoint.restore_sampling_params(config, workdir, config.sample.use_ema)
  if exp.method.probe_features is None:
    raise ValueError(f"method {config.method!r} has no probe_features: --mode probe reads the "
                     "hidden states of a discrete-token AR trunk (method llamagen or st_ar)")
  data_par = exp.mesh.shape.get("data", 1) * exp.mesh.shape.get("fsdp", 1)
  batch_size = int(config.eval.batch_size)
  if batch_size % data_par:
    raise ValueError(f"eval.batch_size={batch_size} (the probe's feature batch) must be a multiple "
                     f"of the data-parallel mesh size data×fsdp={data_par}")
  extract = _Extractor(exp, params, data_cfg, batch_size, int(pcfg.layer), int(pcfg.num_positions),
                       config.seed)
  train_source = pipeline.open_source(data_cfg, data_cfg.train_split, config.seed)
  num_train = int(pcfg.feature_passes) * len(train_source)
  if pcfg.max_train > 0:
    num_train = min(num_train, int(pcfg.max_train))
  train_x, train_y = extract(train_source, data_cfg.train_split, num_train, train=True)
  test_source = pipeline.open_source(data_cfg, data_cfg.eval_split, config.seed)
  test_x, test_y = extract(test_source, data_cfg.eval_split, len(test_source), train=False)
  feature_time = time.time() - start   # restore + compile + both splits
  fit = linear_probe.train_probe(train_x, train_y, test_x, test_y, int(data_cfg.num_classes), pcfg,
                                 config.seed, progress=True)
  result = _summary(config, exp, pcfg, step, extract.positions, fit, len(train_y), len(test_y))
  result.update(feature_dim=int(train_x.shape[-1]), feature_time_s=feature_time,
                wall_time_s=time.time() - start)
  os.makedirs(os.path.join(workdir, "probe"), exist_ok=True)
  path = os.path.join(workdir, "probe", f"{step}.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=2)
  logging.info("wrote %s (best top-1 %.4f at position %d)", path, result["best_top1"],
               result["best_position"])
  print(json.dumps(result, indent=2))
  return result


def _single_view_data(config) -> ml_collections.ConfigDict:
  """config.data, with data.views = 1 (one code view per row) and checked to be a code cache."""
  data_cfg = config.data
  if data_cfg.source != "cached":
    raise ValueError(f"--mode probe reads VQ codes, but data.source={data_cfg.source!r}: set "
                     "--config.data.source=cached and data.path to the code cache of the run's "
                     "tokenizer (--mode cache)")
  if data_cfg.get("views", 1) != 1:
    data_cfg = data_cfg.copy_and_resolve_references()
    with data_cfg.unlocked():
      data_cfg.views = 1
  return data_cfg


class _Extractor:
  """Frozen features at the probed positions: (source, split, rows, train) -> (float32 [n, P, D],
  int32 labels [n]), in padded, batch-sharded batches of `batch_size` (one compilation)."""

  def __init__(self, exp, params, data_cfg, batch_size, layer, num_positions, seed):
    self.exp, self.params, self.data_cfg, self.seed = exp, params, data_cfg, seed
    self.batch_size, self.layer, self.num_positions = batch_size, layer, num_positions
    self.positions = None   # int [P], fixed by the first batch's token count L
    method, rules = exp.method, exp.rules

    def features(params, codes, positions, layer):
      with nn.logical_axis_rules(rules):
        hidden = method.probe_features(params, codes, layer)       # [B, L, D]
      return jnp.take(hidden, positions, axis=1).astype(jnp.float32)

    self._features = jax.jit(features, static_argnames="layer")

  def __call__(self, source, split, num_rows, *, train):
    if num_rows < 1:
      raise ValueError(f"the {split!r} split of the code cache at data.path={self.data_cfg.path!r} "
                       "is empty: nothing to probe")
    ds = pipeline.make_dataset(self.data_cfg, split=split, seed=self.seed,
                               batch_size=self.batch_size, train=train, source=source)
    feats, labels, n = None, np.zeros(num_rows, np.int32), 0   # filled in place: no 2nd copy
    with tqdm(total=num_rows, desc=f"probe features ({split})", unit="img") as bar:
      for batch in ds:   # the training stream repeats forever: stop at num_rows
        codes = self._codes(batch, split)[: num_rows - n]
        m = len(codes)
        padded = evaluator.pad_batch({"codes": codes}, self.batch_size)
        sharded = shd.global_batch(padded, self.exp.mesh)["codes"]
        out = np.asarray(jax.device_get(
            self._features(self.params, sharded, self.positions, layer=self.layer)))
        if feats is None:
          feats = np.empty((num_rows,) + out.shape[1:], np.float32)
        feats[n:n + m] = out[:m]
        labels[n:n + m] = batch["label"][:m]
        n += m
        bar.update(m)
        if n >= num_rows:
          break
    if n < num_rows:
      raise ValueError(f"the {split!r} split of the code cache at data.path="
                       f"{self.data_cfg.path!r} yielded {n} of its {num_rows} examples")
    return feats, labels

  def _codes(self, batch, split) -> np.ndarray:
    """The batch's codes int32 [b, h, w] as [b, L]; fixes the probed positions on first use."""
    if "codes" not in batch:
      raise ValueError(f"split {split!r} of the cache at data.path={self.data_cfg.path!r} holds "
                       f"{sorted(k for k in batch if k not in ('label', 'index'))}, not VQ codes: "
                       "point data.path at the codes cached by a VQ tokenizer run")
    codes = np.asarray(batch["codes"], np.int32)
    codes = codes.reshape(len(codes), -1)
    if self.positions is None:
      self.positions = linear_probe.positions(codes.shape[1], self.num_positions)
    return codes


def _layer_used(method, layer: int) -> int:
  """The block the method probes: `layer`, or for 0 its default, the middle block."""
  return layer or gpt.middle_block(method.model.depth)


def _summary(config, exp, pcfg, step, positions, fit, num_train, num_test) -> dict:
  """The JSON summary of one probe run."""
  best = fit["best_index"]
  return {
      "step": int(step), "method": config.method, "use_ema": bool(config.sample.use_ema),
      "layer": _layer_used(exp.method, int(pcfg.layer)), "layer_config": int(pcfg.layer),
      "positions": [int(p) for p in positions], "top1": fit["top1"],
      "best_position": int(positions[best]), "best_top1": fit["best_top1"],
      "train_loss": fit["train_loss"], "num_train": int(num_train), "num_test": int(num_test),
      "train_split": config.data.train_split, "eval_split": config.data.eval_split,
      "batch_size": fit["batch_size"], "steps_per_epoch": fit["steps_per_epoch"],
      "peak_lr": fit["peak_lr"], "probe": pcfg.to_dict(),
  }
