"""Orbax checkpoints of the train state, the grain iterator and the config.

Items: `state` (the sharded TrainState), `data_iter` (per-process grain iterator state) and
`config` (JSON). Saves are asynchronous; `keep` newest are kept. Restores go into an abstract
target carrying the current shardings, so a checkpoint restores onto a different mesh; a
checkpoint whose parameter shapes differ from the current model fails with a list of the
mismatched paths instead of an opaque orbax error.
"""
from __future__ import annotations

import os
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging


class CheckpointError(RuntimeError):
  """A checkpoint is missing or does not fit the model; the message says what to do."""


def _path_str(path) -> str:
  return "/".join(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)


def make_manager(workdir: str, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
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
    raise CheckpointError(f"cannot read the metadata of checkpoint {step} in "
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


def restore(manager: ocp.CheckpointManager, abstract_state: Any, data_iter: Any | None = None,
            step: int | None = None) -> tuple[Any, int]:
  """Restores (state, step) from `step` (default: newest) into `abstract_state`'s shardings."""
  step = manager.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(
        f"no checkpoint found in {manager.directory}. Train first (--mode train with this "
        "--workdir) or point --workdir at a directory holding a trained run.")
  check_compatible(manager, step, abstract_state)
  items = dict(state=ocp.args.StandardRestore(abstract_state))
  if data_iter is not None:
    items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  logging.info("restored checkpoint %d from %s", step, manager.directory)
  return restored["state"], int(step)


def params_to_numpy(tree: Any) -> Any:
  return jax.tree.map(np.asarray, tree)
