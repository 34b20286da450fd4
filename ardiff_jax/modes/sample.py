"""`--mode sample`: restore a run and write `samples/grid_<step>.png` and `samples_<step>.npz`.

What a sample is belongs to the method (`Method.visualize`): reconstructions next to held-out
originals for a tokenizer, class-conditional generations for a generator.
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from ardiff_jax.data import pipeline
from ardiff_jax.evals import grids
from ardiff_jax.evals.evaluator import balanced_labels, generate_images
from ardiff_jax.parallel import sharding as shd
from ardiff_jax.train import checkpoint


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Samples the newest checkpoint; returns the summary also written to `samples/summary_<step>.json`."""
  exp, params, step = checkpoint.restore_sampling_params(config, workdir, config.sample.use_ema)
  if exp.method.generate_from == "labels":
    return _save_generations(config, workdir, exp, params, step)
  frozen = checkpoint.load_frozen(exp.method)
  # A method with frozen weights (Paella on captions: its VQ decoder, text encoders) reads them too.
  visualize = jax.jit(exp.method.visualize if frozen is None else
                      lambda p, b, r, f: exp.method.visualize(p, b, r, frozen=f))
  with_frozen = () if frozen is None else (frozen,)
  ds = pipeline.make_dataset(config.data, split=config.data.eval_split, seed=config.seed,
                             batch_size=config.sample.batch_size, train=False)
  outs, n = [], 0
  rng = jax.random.key(config.seed)
  with tqdm(total=config.sample.num_samples, desc="sample", unit="img") as bar:
    for i, batch in enumerate(ds):
      if n >= config.sample.num_samples:
        break
      batch = {k: np.asarray(v)[: config.sample.num_samples - n] for k, v in batch.items()}
      out = jax.device_get(visualize(params, batch, jax.random.fold_in(rng, i), *with_frozen))
      outs.append(out)
      n += len(batch["label"])
      bar.update(len(batch["label"]))
  if not outs:
    raise ValueError(f"the {config.data.eval_split!r} split of data.source={config.data.source!r} "
                     "yielded no examples to sample from")
  images = np.concatenate([o["images"] for o in outs])
  labels = np.concatenate([o["labels"] for o in outs])
  extra = {key: float(np.mean(np.concatenate([np.atleast_1d(o[key]) for o in outs])))
           for key in outs[0] if key not in ("images", "labels", "grid_columns")}
  return _write_samples(workdir, step, images, labels, int(outs[0]["grid_columns"]), params, extra)


def _save_generations(config, workdir, exp, params, step) -> dict:
  """Class-conditional samples, one grid row per class (`sample.num_samples` in all)."""
  num_classes = config.data.num_classes
  labels = balanced_labels(config.sample.num_samples, num_classes)
  frozen = checkpoint.load_frozen(exp.method)
  images = generate_images(exp, params, {"label": labels}, config.sample.batch_size, config.seed,
                           frozen)
  columns = max(1, -(-config.sample.num_samples // num_classes))
  return _write_samples(workdir, step, images, labels, columns, params,
                        {"cfg_scale": float(config.sample.cfg_scale)})


def _write_samples(workdir, step, images, labels, columns, params, extra) -> dict:
  sdir = os.path.join(workdir, "samples")
  os.makedirs(sdir, exist_ok=True)
  grid_path = os.path.join(sdir, f"grid_{step}.png")
  upscale = max(1, 128 // images.shape[1])
  grids.save_grid(images, grid_path, columns=columns, upscale=min(upscale, 4))
  np.savez(os.path.join(sdir, f"samples_{step}.npz"), images=images, labels=labels)
  summary = {"step": step, "num_images": int(len(images)), "grid": grid_path,
             "num_params": shd.count_params(params)}
  summary.update(extra)
  with open(os.path.join(sdir, f"summary_{step}.json"), "w") as f:
    json.dump(summary, f, indent=2)
  logging.info("wrote %s (%s)", grid_path, {k: v for k, v in summary.items() if k != "grid"})
  print(json.dumps(summary, indent=2))
  return summary
