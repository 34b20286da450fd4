"""Entry point: `python -m ardiff_jax.main --config configs/NAME.py[:k=v] --workdir DIR --mode MODE`.

Kept thin on purpose (flax examples): flags, the distributed runtime, dispatch to one module of
`ardiff_jax/modes/`. Everything else is a library function that a notebook or a test can call
directly.
"""
from __future__ import annotations

import importlib
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from ardiff_jax.modes import MODES  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file, with optional :k=v args.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, samples.")
flags.DEFINE_enum("mode", "train", MODES, "What to do.")
flags.mark_flags_as_required(["config", "workdir"])


def run(config, workdir: str, mode: str):
  """Runs `ardiff_jax.modes.<mode>.run(config, workdir)`; returns what it returns (handy in
  notebooks and tests)."""
  if mode not in MODES:
    raise ValueError(f"--mode {mode!r} is not a mode; choose one of {', '.join(MODES)}")
  return importlib.import_module(f"ardiff_jax.modes.{mode}").run(config, workdir)


class _QuietLibraries:
  """Drops INFO records that orbax writes for every save and restore; warnings still pass."""

  def filter(self, record) -> bool:
    return record.levelno > 20 or "orbax" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax  # after flags, so XLA_FLAGS set by the caller apply
  from ardiff_jax.parallel.mesh import maybe_initialize_distributed
  jax.config.update("jax_threefry_partitionable", True)
  maybe_initialize_distributed()
  logging.info("JAX %s: %d devices (%s), process %d/%d", jax.__version__, jax.device_count(),
               jax.devices()[0].device_kind, jax.process_index(), jax.process_count())
  run(FLAGS.config, FLAGS.workdir, FLAGS.mode)


if __name__ == "__main__":
  logging.use_absl_handler()
  logging.get_absl_handler().addFilter(_QuietLibraries())
  sys.exit(app.run(main))
