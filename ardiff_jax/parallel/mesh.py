"""Device mesh from per-axis sizes (`-1` fills the rest) and the multi-host runtime.

Axes are ("data", "fsdp", "tensor") by default. The same code builds a 1-device CPU mesh, an
8-fake-device test mesh and a TPU pod mesh: only `mesh.shape` changes.
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh


def resolve_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Replaces a single -1 in `shape` so that the product equals `num_devices`."""
  shape = tuple(int(s) for s in shape)
  unknown = [i for i, s in enumerate(shape) if s == -1]
  if len(unknown) > 1:
    raise ValueError(f"mesh.shape {shape}: at most one axis may be -1")
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh.shape {shape}: sizes must be positive or -1")
  known = int(np.prod([s for s in shape if s != -1]))
  if unknown:
    if num_devices % known:
      raise ValueError(
          f"mesh.shape {shape}: {num_devices} devices are not divisible by {known}; "
          "set the sizes so that their product divides the device count")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if int(np.prod(shape)) != num_devices:
    raise ValueError(
        f"mesh.shape {shape} has {int(np.prod(shape))} devices but {num_devices} are available; "
        "use -1 on one axis to fill the rest")
  return shape


def make_mesh(shape: Sequence[int], axes: Sequence[str],
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over `devices` (default: all) with GSPMD ('auto') axes.

  Auto axes let logical sharding constraints guide the compiler, as linen's partitioning expects.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_shape(shape, len(devices))
  if len(devices) == len(jax.devices()):
    return jax.make_mesh(shape, tuple(axes), axis_types=(AxisType.Auto,) * len(shape),
                         devices=devices)
  try:   # the physical layout (TPU torus), e.g. for an ahead-of-time topology's devices
    from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
    grid = mesh_utils.create_device_mesh(shape, devices)
  except (ValueError, NotImplementedError, AssertionError):   # e.g. a subset of CPU devices
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, tuple(axes), axis_types=(AxisType.Auto,) * len(shape))


def maybe_initialize_distributed() -> None:
  """Starts JAX's multi-controller runtime when the environment configures several processes.

  The explicit JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID variables, SLURM, and
  TPU pods are detected by `jax.distributed.initialize`. A TPU VM slice may describe its workers
  only through the metadata server, so `launch/tpu_pod.sh` also sets ARDIFF_JAX_DISTRIBUTED=auto,
  which always asks JAX to auto-detect. A single process without any of them stays single-process.
  """
  import os  # pylint: disable=g-import-not-at-top
  explicit = "JAX_COORDINATOR_ADDRESS" in os.environ
  cluster = os.environ.get("ARDIFF_JAX_DISTRIBUTED") == "auto" or any(
      k in os.environ for k in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES",
                                "MEGASCALE_COORDINATOR_ADDRESS"))
  if not (explicit or cluster):
    return
  kwargs = {}
  if explicit:
    kwargs = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                  num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                  process_id=int(os.environ["JAX_PROCESS_ID"]))
  # Cross-process collectives between CPU devices (tests, laptops) go through gloo; accelerators
  # use their own interconnect and ignore this setting.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(**kwargs)
  except (ValueError, RuntimeError) as e:  # e.g. a single-task SLURM allocation
    logging.warning("jax.distributed.initialize skipped: %s", e)
    return
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
