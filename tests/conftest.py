"""Test set-up: 8 fake CPU devices, so sharding is exercised without accelerators.

XLA_FLAGS must be set before JAX is first imported, which is why this lives in conftest.py.
Compiled programs go to a persistent compilation cache made for this test session and removed
after it: many tests (and the `python -m ardiff_jax.main` processes some of them start, which
inherit the environment) compile the same tiny programs, and on a 2-core CPU compiling is most of
their time.
"""
import atexit
import os
import shutil
import tempfile

# Optimisation level 0 halves XLA's CPU compile time, which dominates these tiny-shape tests.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _XLA_CACHE = tempfile.mkdtemp(prefix="ardiff_jax_test_xla_cache_")
  atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)


def pytest_collection_modifyitems(config, items):
  has_gpu = any(d.platform == "gpu" for d in jax.devices()) if os.environ.get("JAX_PLATFORMS") != "cpu" else False
  skip_gpu = pytest.mark.skip(reason="needs a GPU")
  for item in items:
    if "gpu" in item.keywords and not has_gpu:
      item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def vq_run(tmp_path_factory):
  """A 4-step tiny VQ tokenizer run (configs/vq_digits.py:tiny) with its code cache (image and
  mirror image per record): (config, workdir, cached counts), shared by the discrete generators'
  tests."""
  from ardiff_jax import main as main_lib  # pylint: disable=g-import-not-at-top
  from tests.helpers import load_config  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("vq"))
  config = load_config("vq_digits", "tiny")
  main_lib.run(config, workdir, "train")
  counts = main_lib.run(config, workdir, "cache")
  return config, workdir, counts
