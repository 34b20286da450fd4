"""`train_and_evaluate(config, workdir)`: the method-agnostic training loop.

The loop knows nothing of modes or metrics beyond the train step's own: periodic evaluation
arrives as a callback (`evaluate`, which `modes/train.py` builds from the evaluator), so the engine
never imports a mode or `evals/`.
"""
from __future__ import annotations

import json
import signal
import sys
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from ardiff_jax import configlib
from ardiff_jax.data import pipeline
from ardiff_jax.parallel import sharding as shd
from ardiff_jax.train import checkpoint, metrics as metrics_lib
from ardiff_jax.train.experiment import Experiment, build_experiment
from ardiff_jax.train.state import TrainState, frozen_for_training, init_state, jit_train_step

# (sampling params, step) -> scalar metrics: what `eval.every_steps` runs on the in-memory weights.
EvaluateFn = Callable[[Any, int], dict]


class NonFiniteError(RuntimeError):
  """Raised under nan_policy='halt' when a step produced a non-finite loss or gradient."""


def train_data_iter(config: ml_collections.ConfigDict, reseed: int = 0, source=None):
  """This process's share of the training stream (per-process batch = global / processes).

  reseed > 0 starts a differently shuffled stream (seed + reseed): used when a checkpoint holds
  no stream position for this process layout. `source`: the training split already opened
  (`pipeline.open_source`).
  """
  ds = pipeline.make_dataset(
      config.data, split=config.data.train_split, seed=config.seed + reseed,
      batch_size=config.train.batch_size // jax.process_count(), train=True,
      process_index=jax.process_index(), process_count=jax.process_count(), source=source)
  return iter(ds)


# What each batch key is made by, for the message when a method's key is missing.
_KEY_SOURCES = {"image": "an image source (digits, folder, tfds)",
                "moments": "the cache of a KL tokenizer run (--mode cache of configs/kl_*.py)",
                "codes": "the cache of a VQ tokenizer run (--mode cache of configs/vq_*.py)"}


def check_first_batch(exp: Experiment, source) -> None:
  """Reads a first small batch of the opened training split `source` (a separate, unshuffled
  stream, so the training stream is untouched) and refuses data that does not fit the method: a
  missing batch key (e.g. KL latents given to a method over VQ codes) or what
  `Method.check_batch` rejects."""
  config = exp.config
  ds = pipeline.make_dataset(config.data, split=config.data.train_split, seed=config.seed,
                             batch_size=min(8, config.train.batch_size), train=False, source=source)
  batch = next(iter(ds))
  missing = [k for k in exp.method.batch_keys if k not in batch]
  if missing:
    need = "; ".join(f"{k!r} comes from {_KEY_SOURCES.get(k, 'another source')}" for k in missing)
    raise pipeline.DataError(
        f"method {config.method!r} reads {list(exp.method.batch_keys)}, but data.source="
        f"{config.data.source!r} at data.path={config.data.path!r} yields {sorted(batch)}: {need}")
  if exp.method.check_batch is not None:
    exp.method.check_batch(batch)


def restore_or_init(exp: Experiment, manager, data_iter=None) -> tuple[TrainState, int]:
  """The newest readable checkpoint, else a step-0 state (warm-started when the method says how:
  `Method.warm_start`, given host copies of the fresh parameters)."""
  if manager.latest_step() is not None:
    return checkpoint.restore_newest_readable(manager, exp.abstract_state, data_iter)
  state = init_state(exp.config.seed, exp.method, exp.tx, exp.shardings)
  if exp.method.warm_start is None:
    return state, 0
  fresh = jax.device_get(state.params)
  del state                                   # one device-side state at a time
  params = exp.method.warm_start(fresh, checkpoint.restore_run_params)
  params, extras = params if isinstance(params, tuple) else (params, None)
  return init_state(exp.config.seed, exp.method, exp.tx, exp.shardings, params, extras), 0


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  if jax.process_index() == 0:
    root = epath.Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(configlib.to_dict(config), indent=2, default=str))


class _Preemption:
  """Turns SIGTERM into a flag the loop checks, so it can save and exit cleanly."""

  def __init__(self):
    self.requested = False
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. inside a notebook worker)
      self._old = None

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and exiting")
    self.requested = True

  def restore(self):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _agree_to_stop(requested: bool, at_sync_point: bool) -> bool:
  """Whether to save and stop after this step. One process: as soon as SIGTERM arrived. Several:
  all must stop at the same step (saving is collective), so they compare flags at the logging
  steps (the same steps on every process) and stop if any was signalled."""
  if jax.process_count() == 1:
    return requested
  if not at_sync_point:
    return False
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  flags = multihost_utils.process_allgather(np.asarray(int(requested), np.int32))
  return bool(np.asarray(flags).any())


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       evaluate: EvaluateFn | None = None) -> TrainState:
  """Trains `config.method` for `train.num_steps`, resuming from the newest checkpoint.

  Every `eval.every_steps` steps (when > 0 and `evaluate` is given), `evaluate(params, step)` runs
  on the weights sampling would use (the EMA or raw weights per `sample.use_ema`, passed through
  `Method.sampling_params`) and its scalars go to metrics.jsonl under `eval/`.
  """
  exp = build_experiment(config)       # validates the config
  # The training split, opened once: paths, class count and readable images are checked here.
  source = pipeline.open_source(config.data, config.data.train_split, config.seed)
  data_iter = train_data_iter(config, source=source)
  check_first_batch(exp, source)       # checks that the data fits the method
  # Only now is anything written: a start that fails above leaves the workdir untouched.
  write_config(config, workdir)
  manager = checkpoint.make_manager(workdir, config.train.keep_checkpoints)
  state, start = restore_or_init(exp, manager, data_iter)
  if start:
    logging.info("resuming at step %d", start)
    if not checkpoint.has_data_iter_state(manager, start):
      logging.warning(
          "checkpoint %d holds no data-stream position for %d process(es) (it was written by a "
          "different number of processes): the stream restarts with seed %d + %d, so the run "
          "continues but does not repeat an uninterrupted run's batches", start,
          jax.process_count(), config.seed, start)
      data_iter = train_data_iter(config, reseed=start)
  step_fn = jit_train_step(exp.method, exp.tx, exp.schedule, config, exp.mesh, exp.shardings)
  frozen = frozen_for_training(exp.method, exp.mesh, lambda: checkpoint.load_frozen(exp.method))
  writer = metrics_lib.MetricWriter(workdir)
  num_params = shd.count_params(state.params)
  logging.info("%s: %s parameters, mesh %s", config.method, f"{num_params:,}", dict(exp.mesh.shape))
  preempt = _Preemption()
  cfg_dict = configlib.to_dict(config)
  num_steps, log_every = config.train.num_steps, max(1, config.train.log_every)
  last_log_time, last_log_step = time.time(), start
  local_batch = config.train.batch_size // jax.process_count()
  skipped_at_start = pipeline.num_skipped_images()
  max_skipped = config.data.get("max_skipped_fraction", 1.0)
  progress = _progress(start, num_steps)
  try:
    for step in range(start, num_steps):
      local = next(data_iter)
      batch = shd.global_batch({k: local[k] for k in exp.method.batch_keys}, exp.mesh)
      skipped = pipeline.num_skipped_images() - skipped_at_start
      pipeline.check_skipped_fraction(skipped, (step + 1 - start) * local_batch + skipped, max_skipped)
      state, metrics = step_fn(state, batch, frozen)
      done = step + 1
      halt = config.nan_policy == "halt" and int(metrics["nonfinite"])
      if done % log_every == 0 or done == num_steps or halt:
        host = jax.device_get(metrics)
        now = time.time()
        host["img_per_s"] = (done - last_log_step) * config.train.batch_size / max(now - last_log_time, 1e-9)
        host["skipped_images"] = pipeline.num_skipped_images()
        row = writer.write(done, host)
        progress.set_postfix(loss=f"{row['loss']:.4g}" if isinstance(row["loss"], float) else row["loss"])
        last_log_time, last_log_step = time.time(), done
      progress.update(1)
      if halt:
        checkpoint.save(manager, done, state, data_iter, cfg_dict, force=True)
        manager.wait_until_finished()
        raise NonFiniteError(
            f"step {step}: non-finite loss or gradient (nan_policy='halt'); the update was not "
            f"applied and the state was saved at step {done}. Lower optim.lr, check the data, or "
            "set --config.nan_policy=skip to skip such steps.")
      stop = _agree_to_stop(preempt.requested, at_sync_point=done % log_every == 0)
      if done % config.train.ckpt_every == 0 or done == num_steps or stop:
        checkpoint.save(manager, done, state, data_iter, cfg_dict, force=stop)
      if evaluate is not None and config.eval.every_steps and done % config.eval.every_steps == 0:
        writer.write(done, _periodic_eval(exp, evaluate, state, done))
      if stop:
        logging.warning("stopped at step %d after SIGTERM; rerun the same command to resume", done)
        break
  finally:
    progress.close()
    manager.wait_until_finished()
    writer.close()
    preempt.restore()
  return state


def _periodic_eval(exp: Experiment, evaluate: EvaluateFn, state: TrainState, step: int) -> dict:
  params = state.ema_params if exp.config.sample.use_ema else state.params
  result = evaluate(exp.method.sampling_params(params, state.extras), step)
  return {f"eval/{k}": v for k, v in result.items() if isinstance(v, (int, float)) and k != "step"}


def _progress(start: int, total: int):
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, initial=start, desc="train", unit="step", file=sys.stderr,
              disable=jax.process_index() != 0, mininterval=2.0, dynamic_ncols=True)
