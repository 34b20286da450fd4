"""Orbax checkpoints of the train state, the grain iterator and the config.

Items: `state` (the sharded TrainState), `data_iter` (per-process grain iterator state) and
`config` (JSON). Saves are asynchronous; `keep` newest are kept. Restores go into an abstract
target carrying the current shardings, so a checkpoint restores onto a different mesh; a
checkpoint whose parameter shapes differ from the current model fails with a list of the
mismatched paths instead of an opaque orbax error. An unreadable newest checkpoint (truncated by
a crash or a full disk) is moved aside to `checkpoints_unreadable/` with a warning, and the
previous one is restored (`restore_newest_readable`).

Restoring a trained run for use (`restore_run`, `restore_run_params`, `load_frozen`) is here too,
once: every mode, the evaluator's feature nets and a method's frozen weights go through it.
"""
from __future__ import annotations

import os
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from ardiff_jax import configlib
from ardiff_jax.methods import Method
from ardiff_jax.train.experiment import Experiment, build_experiment
from ardiff_jax.train.metrics import is_remote


class CheckpointError(RuntimeError):
  """A checkpoint is missing or does not fit the model; the message says what to do."""


class UnreadableCheckpointError(CheckpointError):
  """A checkpoint's files cannot be read (truncated or corrupt)."""

UNREADABLE_DIR = "checkpoints_unreadable"


def _path_str(path) -> str:
  return "/".join(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)


def checkpoint_dir(workdir: str) -> str:
  """`<workdir>/checkpoints`: a URL workdir (gs://...) as is, a local one made absolute (orbax)."""
  return (workdir.rstrip("/") + "/checkpoints" if is_remote(workdir)
          else os.path.join(os.path.abspath(workdir), "checkpoints"))


def make_manager(workdir: str, keep: int = 3, async_save: bool = True,
                 create: bool = True) -> ocp.CheckpointManager:
  """The run's checkpoint manager; `create=False` (restoring) requires the directory to exist and
  creates nothing, so a mistyped --workdir is an error that leaves no trace."""
  directory = checkpoint_dir(workdir)
  if not create and not epath.Path(directory).exists():
    raise CheckpointError(
        f"no checkpoint found in {directory}. Train first (--mode train with this --workdir) or "
        "point --workdir at a directory holding a trained run.")
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=create, enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(
      directory, options=options,
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "data_iter": grain.checkpoint.CheckpointHandler(),
                     "config": ocp.JsonCheckpointHandler()})


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iter: Any | None,
         config: dict, force: bool = False) -> None:
  items = dict(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config))
  if data_iter is not None:
    items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
  manager.save(step, args=ocp.args.Composite(**items), force=force)


def check_compatible(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> None:
  """Raises CheckpointError listing every path whose shape differs or that is missing."""
  try:
    meta = manager.item_metadata(step)["state"]
  except Exception as e:  # pylint: disable=broad-except
    raise UnreadableCheckpointError(f"cannot read the metadata of checkpoint {step} in "
                                    f"{manager.directory}: {e}") from e
  if meta is None:
    return
  saved = {_path_str(p): tuple(getattr(m, "shape", ()) or ())
           for p, m in jax.tree_util.tree_flatten_with_path(meta)[0]}
  wanted = {_path_str(p): tuple(a.shape)
            for p, a in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
  problems = []
  for k in sorted(wanted):
    if k not in saved:
      problems.append(f"  {k}: missing in checkpoint (model expects {wanted[k]})")
    elif saved[k] != wanted[k]:
      problems.append(f"  {k}: checkpoint {saved[k]} vs model {wanted[k]}")
  for k in sorted(set(saved) - set(wanted)):
    problems.append(f"  {k}: in checkpoint {saved[k]} but not in the model")
  if problems:
    shown = "\n".join(problems[:30]) + (f"\n  ... and {len(problems) - 30} more" if len(problems) > 30 else "")
    raise CheckpointError(
        f"checkpoint {step} in {manager.directory} does not match the configured model "
        f"({len(problems)} mismatched entries):\n{shown}\n"
        "Use the config the checkpoint was trained with (saved as its `config` item and in "
        "config.json), or start a fresh --workdir.")


def has_data_iter_state(manager: ocp.CheckpointManager, step: int) -> bool:
  """Whether checkpoint `step` holds a data-iterator state for this process layout (grain keeps
  one file per process, named by process index and count)."""
  name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
  return (epath.Path(manager.directory) / str(step) / "data_iter" / name).exists()


def restore(manager: ocp.CheckpointManager, abstract_state: Any, data_iter: Any | None = None,
            step: int | None = None) -> tuple[Any, int]:
  """Restores (state, step) from `step` (default: newest) into `abstract_state`'s shardings,
  and `data_iter`'s position when the checkpoint holds one for this process layout (see
  `has_data_iter_state`; otherwise `data_iter` is left untouched)."""
  step = manager.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(
        f"no checkpoint found in {manager.directory}. Train first (--mode train with this "
        "--workdir) or point --workdir at a directory holding a trained run.")
  check_compatible(manager, step, abstract_state)
  items = dict(state=ocp.args.StandardRestore(abstract_state))
  if data_iter is not None and has_data_iter_state(manager, step):
    items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:  # pylint: disable=broad-except
    raise UnreadableCheckpointError(f"checkpoint {step} in {manager.directory} cannot be read: "
                                    f"{type(e).__name__}: {e}") from e
  logging.info("restored checkpoint %d from %s", step, manager.directory)
  return restored["state"], int(step)


def restore_newest_readable(manager: ocp.CheckpointManager, abstract_state: Any,
                            data_iter: Any | None = None) -> tuple[Any, int]:
  """Restores the newest checkpoint that can be read; unreadable newer ones are moved aside.

  Each unreadable step directory newer than the restored one goes to
  `<workdir>/checkpoints_unreadable/<step>-<time>` (nothing is deleted), with a warning, so that
  training continues from the restored step and saves over no broken files. If no checkpoint can
  be read, nothing is moved and the error lists them. A checkpoint that reads but does not fit
  the model is an error, never skipped. Multi-process runs and gs:// workdirs do not fall back
  (processes could disagree on what they read): they fail with the step to move aside.
  """
  if jax.process_count() > 1 or is_remote(os.fspath(manager.directory)):
    # Processes could disagree on what they can read (each reads its own shards and iterator
    # file), and an object store has no cheap rename: fail clearly instead of guessing.
    try:
      return restore(manager, abstract_state, data_iter)
    except UnreadableCheckpointError as e:
      raise UnreadableCheckpointError(
          f"{e}\nMove that step's directory out of {manager.directory} to resume from the "
          "previous checkpoint.") from e
  unreadable = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restored = restore(manager, abstract_state, data_iter, step)
    except UnreadableCheckpointError as e:
      logging.warning("%s", e)
      unreadable.append((step, e))
      continue
    for bad, _ in unreadable:
      logging.warning("falling back from unreadable checkpoint %d to %d; moved it to %s",
                      bad, step, _move_aside(manager, bad))
    return restored
  listing = "\n".join(f"  {s}: {e}" for s, e in unreadable)
  raise CheckpointError(f"no checkpoint in {manager.directory} can be read:\n{listing}\n"
                        "Restore a copy of the directory, or start a fresh --workdir.")


def _move_aside(manager: ocp.CheckpointManager, step: int) -> str:
  """Moves checkpoint `step` to <workdir>/checkpoints_unreadable/<step>-<time> (single process,
  local workdir)."""
  directory = os.fspath(manager.directory)
  aside = os.path.join(os.path.dirname(directory), UNREADABLE_DIR, f"{step}-{int(time.time())}")
  os.makedirs(os.path.dirname(aside), exist_ok=True)
  os.rename(os.path.join(directory, str(step)), aside)
  manager.reload()
  return aside


def restore_run(config, workdir: str, use_ema: bool | None = None
                ) -> tuple[Experiment, Any, Any, int]:
  """(experiment, params, extras, step) of the newest checkpoint of the run in `workdir`.

  params are the EMA weights when `use_ema` (default: `config.sample.use_ema`), else the raw ones;
  extras are the method-owned state (e.g. BatchNorm statistics, a reference queue).
  """
  exp = build_experiment(config)
  manager = make_manager(workdir, config.train.keep_checkpoints, async_save=False, create=False)
  state, step = restore(manager, exp.abstract_state)
  use_ema = config.sample.use_ema if use_ema is None else use_ema
  return exp, state.ema_params if use_ema else state.params, state.extras, step


def restore_sampling_params(config, workdir: str, use_ema: bool | None = None
                            ) -> tuple[Experiment, Any, int]:
  """(experiment, what `Method.generate` receives as params, step) of the newest checkpoint: the
  chosen weights passed through `Method.sampling_params` (which may add method-owned state)."""
  exp, params, extras, step = restore_run(config, workdir, use_ema)
  return exp, exp.method.sampling_params(params, extras), step


def restore_run_params(workdir: str, use_ema: bool | None = None):
  """Host copy of the parameters of the run in `workdir`, rebuilt from the run's own
  `config.json` (e.g. the tokenizer a generator decodes with); `use_ema` defaults to that run's
  `sample.use_ema`."""
  config = configlib.load_run_config(workdir)
  _, params, _ = restore_sampling_params(config, workdir, use_ema)
  return jax.device_get(params)


def load_frozen(method: Method):
  """The weights `method` uses but does not train (`Method.load_frozen`, given this module's
  `restore_run_params` to read them from their run), or None for a method without any."""
  return method.load_frozen(restore_run_params) if method.load_frozen else None
