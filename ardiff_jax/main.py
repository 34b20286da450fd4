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

# Set to 1 (or pass --verbosity=1) to see the full traceback of a user error.
TRACEBACK_ENV = "ARDIFF_JAX_TRACEBACK"
# What a user's input can cause (a bad path, value, config or run): reported as one line.
USER_ERRORS = (ValueError, OSError, LookupError)


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


def _user_error_types() -> tuple[type[BaseException], ...]:
  from ardiff_jax.train.checkpoint import CheckpointError  # pylint: disable=g-import-not-at-top
  from ardiff_jax.train.loop import NonFiniteError  # pylint: disable=g-import-not-at-top
  return USER_ERRORS + (CheckpointError, NonFiniteError)


def _config_file_error() -> FileNotFoundError | None:
  """A one-line error for a --config file that does not exist (ml_collections' own is 40 lines)."""
  path = config_flags.get_config_filename(FLAGS["config"])
  head, sep, _ = path.partition(".py:")   # configs/NAME.py:k=v -> configs/NAME.py
  path = head + ".py" if sep else path
  if os.path.exists(path):
    return None
  return FileNotFoundError(f"config file {path!r} does not exist; configs live in configs/NAME.py "
                           "(run from the repository root, or give an absolute path)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    _main()
  except _user_error_types() as e:  # pylint: disable=catching-non-exception
    if FLAGS.verbosity >= 1 or os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
      raise
    print(f"{type(e).__name__}: {e}  (traceback: --verbosity=1 or {TRACEBACK_ENV}=1)",
          file=sys.stderr)
    sys.exit(1)


def _main():
  error = _config_file_error()
  if error is not None:
    raise error
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
