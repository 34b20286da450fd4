"""Bad input a user can give: each is refused with a message that names the problem and the fix,
before anything is written to the workdir; from the CLI, as one line without a traceback."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ardiff_jax import main
from ardiff_jax.data import pipeline, sources
from ardiff_jax.train.checkpoint import CheckpointError
from tests.helpers import REPO, load_config


def _write_folder(root, classes, per_class, corrupt_per_class=0, size=16):
  """<root>/train/<class>/ with `per_class` small PNGs and `corrupt_per_class` unreadable files."""
  rng = np.random.default_rng(0)
  for name in classes:
    d = os.path.join(root, "train", name)
    os.makedirs(d)
    for i in range(per_class):
      Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(f"{d}/{i}.png")
    for i in range(corrupt_per_class):
      with open(f"{d}/bad_{i}.jpg", "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 not a jpeg")
  return str(root)


def _folder_config(path, **train):
  config = load_config("kl_digits", "tiny")
  config.data.source, config.data.path = "folder", path
  for k, v in train.items():
    config.train[k] = v
  return config


def _assert_untouched(workdir):
  assert not os.path.exists(workdir) or not os.listdir(workdir), os.listdir(workdir)


# ------------------------------------------------------------------ labels out of range
def test_folder_with_more_classes_than_configured_is_refused_before_training(tmp_path):
  """12 class folders under data.num_classes=10: labels 10 and 11 would be NaN class embeddings
  (MAR) or the CFG null class (GPT)."""
  path = _write_folder(tmp_path / "data", [f"c{i:02d}" for i in range(12)], per_class=2)
  workdir = str(tmp_path / "run")
  with pytest.raises(pipeline.DataError, match=r"has 12 classes \(c00, c01, .*\), but "
                     r"data.num_classes=10: set --config.data.num_classes=12"):
    main.run(_folder_config(path), workdir, "train")
  _assert_untouched(workdir)


def test_cache_with_labels_past_num_classes_is_refused(tmp_path):
  records = [{"moments": np.zeros((2, 2, 4), np.float32), "moments_flip": np.zeros((2, 2, 4), np.float32),
              "label": i % 12} for i in range(24)]
  sources.write_cached_shard(str(tmp_path / "train" / "shard-00000.array_record"), records)
  config = load_config("kl_digits", "tiny").data
  config.source, config.path = "cached", str(tmp_path)
  with pytest.raises(pipeline.DataError, match="has labels up to 11, but data.num_classes=10"):
    pipeline.make_dataset(config, split="train", seed=0, batch_size=4, train=True)


# ---------------------------------------------------- checks before side effects
@pytest.mark.parametrize("mode,change,error,message", [
    ("train", {"data.source": "folder", "data.path": "/no/such/folder"}, FileNotFoundError,
     "Image folder split directory not found: '/no/such/folder/train'"),
    ("train", {"train.batch_size": 0}, ValueError, "train.batch_size=0 must be a positive integer"),
    ("train", {"train.batch_size": -8}, ValueError, "train.batch_size=-8 must be a positive integer"),
    ("sample", {}, CheckpointError, "no checkpoint found in .*Train first"),
    ("eval", {}, CheckpointError, "no checkpoint found in .*Train first"),
    ("cache", {}, CheckpointError, "no checkpoint found in .*Train first"),
])
def test_a_failed_start_writes_nothing(tmp_path, mode, change, error, message):
  config = load_config("kl_digits", "tiny")
  for key, value in change.items():
    section, field = key.split(".")
    config[section][field] = value
  workdir = str(tmp_path / "run")
  with pytest.raises(error, match=message):
    main.run(config, workdir, mode)
  _assert_untouched(workdir)


# ------------------------------------------------------------- mostly corrupt folders
def test_training_stops_when_most_images_are_unreadable(tmp_path):
  """A folder of 10 readable and 500 unreadable images does not train on its few good ones (the
  first batch of 16 already reads more than MIN_IMAGES_FOR_SKIP_CHECK files)."""
  path = _write_folder(tmp_path / "data", ["a", "b"], per_class=5, corrupt_per_class=250)
  config = _folder_config(path, num_steps=200, log_every=100, ckpt_every=100)
  config.data.num_classes = 2
  with pytest.raises(pipeline.DataError, match=r"of the \d+ images read so far \(9\d\.\d%\) could "
                     r"not be decoded, more than data.max_skipped_fraction=0.1"):
    main.run(config, str(tmp_path / "run"), "train")


def test_skipped_fraction_rule():
  check = pipeline.check_skipped_fraction
  check(5, 40, 0.1)                       # too few images read to judge
  check(50, 500, 0.1)                     # exactly the limit is allowed
  with pytest.raises(pipeline.DataError, match="51 of the 500 images"):
    check(51, 500, 0.1)
  check(51, 500, 0.2)
  with pytest.raises(pipeline.DataError):
    check(3, 10, 0.1, min_read=1)         # the evaluator reads a whole split at once


# ------------------------------------------------------------------------- the CLI
def _cli(*args, **env):
  env = dict(os.environ, JAX_PLATFORMS="cpu", **env)
  env.pop("ARDIFF_JAX_TRACEBACK", None) if "ARDIFF_JAX_TRACEBACK" not in env else None
  return subprocess.run([sys.executable, "-m", "ardiff_jax.main", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def _last_line(stderr: str) -> str:
  return [line for line in stderr.splitlines() if line.strip()][-1]


def test_cli_user_error_is_one_line_and_the_traceback_is_one_switch_away(tmp_path):
  args = ("--config", "configs/no_such_config.py", "--workdir", str(tmp_path / "run"))
  r = _cli(*args)
  assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
  assert _last_line(r.stderr).startswith(
      "FileNotFoundError: config file 'configs/no_such_config.py' does not exist")
  r = _cli(*args, ARDIFF_JAX_TRACEBACK="1")
  assert r.returncode != 0 and "Traceback" in r.stderr
  _assert_untouched(str(tmp_path / "run"))


def test_cli_sample_of_a_missing_run_is_one_line(tmp_path):
  r = _cli("--config", "configs/kl_digits.py:tiny", "--workdir", str(tmp_path / "run"),
           "--mode", "sample")
  assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
  assert _last_line(r.stderr).startswith("CheckpointError: no checkpoint found in")
  _assert_untouched(str(tmp_path / "run"))
