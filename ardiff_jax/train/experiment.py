"""`build_experiment(config)`: everything the engine and every mode need for one config.

The mesh, the method (from the registry), the optimizer and its schedule, and the abstract train
state with its shardings, built without allocating anything. Training, restoring a run, sampling,
caching, benchmarking and ahead-of-time compilation all start here, so they agree on shapes and
layouts.
"""
from __future__ import annotations

import dataclasses

import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from ardiff_jax.data import pipeline
from ardiff_jax.methods import Method, get_method
from ardiff_jax.parallel import mesh as mesh_lib
from ardiff_jax import optim
from ardiff_jax.train.state import TrainState, state_shardings


@dataclasses.dataclass
class Experiment:
  config: ml_collections.ConfigDict
  mesh: Mesh
  method: Method
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  abstract_state: TrainState
  shardings: TrainState

  @property
  def rules(self):
    return tuple(tuple(r) for r in self.config.mesh.rules)


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ValueError(message)


def validate_config(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
  """Checks that fail early, before anything is written, with a message naming the field and a fix."""
  if config.nan_policy not in ("skip", "halt"):
    raise ValueError(f"nan_policy={config.nan_policy!r}: expected 'skip' or 'halt'")
  _require(config.data.source in pipeline.SOURCES,
           f"data.source={config.data.source!r}: expected one of {pipeline.SOURCES}")
  for field in ("train.batch_size", "train.log_every", "train.ckpt_every", "train.keep_checkpoints",
                "sample.batch_size", "eval.batch_size", "data.num_classes", "data.image_size"):
    section, name = field.split(".")
    value = config[section][name]
    _require(isinstance(value, int) and value > 0, f"{field}={value!r} must be a positive integer")
  _require(config.train.num_steps >= 0, f"train.num_steps={config.train.num_steps} must be ≥ 0")
  skip = config.data.get("max_skipped_fraction", 0.0)
  _require(0.0 <= skip <= 1.0, f"data.max_skipped_fraction={skip} must be in [0, 1]")
  b, pc = config.train.batch_size, jax.process_count()
  data_par = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
  if b % pc or b % data_par:
    raise ValueError(
        f"train.batch_size={b} must be divisible by the process count ({pc}) and by the "
        f"data-parallel mesh size data×fsdp={data_par}; choose a multiple of {np.lcm(pc, data_par)}")
  accum = config.train.grad_accum_steps
  if accum < 1 or b % accum or (b // accum) % data_par:
    raise ValueError(
        f"train.grad_accum_steps={accum}: batch_size/grad_accum_steps must be a whole multiple "
        f"of data×fsdp={data_par}")


def build_experiment(config: ml_collections.ConfigDict, devices=None) -> Experiment:
  mesh = mesh_lib.make_mesh(config.mesh.shape, config.mesh.axes, devices)
  validate_config(config, mesh)
  method = get_method(config)
  decay_mask = method.decay_mask or optim.default_decay_mask
  tx, schedule = optim.make_optimizer(config.optim, config.train.num_steps, decay_mask,
                                      method.auxiliary_params)
  rules = tuple(tuple(r) for r in config.mesh.rules)
  abstract, shardings = state_shardings(method, tx, mesh, rules)
  return Experiment(config, mesh, method, tx, schedule, abstract, shardings)
