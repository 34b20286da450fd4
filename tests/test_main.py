"""The CLI end to end on the tiny digits tokenizer, and every user-facing error path."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ardiff_jax import main
from ardiff_jax.train.checkpoint import CheckpointError
from tests.helpers import REPO, cache_test_split, load_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir holding a 4-step tiny tokenizer run (checkpoints at steps 2 and 4)."""
  workdir = str(tmp_path_factory.mktemp("kl"))
  config = load_config("kl_digits", "tiny")
  main.run(config, workdir, "train")
  return config, workdir


def test_train_writes_workdir_files(trained):
  config, workdir = trained
  assert json.load(open(os.path.join(workdir, "config.json")))["method"] == "kl_tokenizer"
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == [2, 4]
  for key in ("loss", "lr", "grad_norm", "img_per_s", "psnr", "skipped_images"):
    assert key in rows[0]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  assert os.listdir(os.path.join(workdir, "tensorboard"))


def test_train_resumes_from_newest_checkpoint(trained):
  config, workdir = trained
  config = config.copy_and_resolve_references()
  config.train.num_steps = 6
  state = main.run(config, workdir, "train")
  assert int(state.step) == 6
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == [2, 4, 6]


def test_sample_writes_grid_and_npz(trained):
  config, workdir = trained
  summary = main.run(config, workdir, "sample")
  step = summary["step"]
  assert os.path.exists(os.path.join(workdir, "samples", f"grid_{step}.png"))
  npz = np.load(os.path.join(workdir, "samples", f"samples_{step}.npz"))
  assert npz["images"].dtype == np.uint8 and npz["images"].shape == (32, 16, 16, 3)
  assert npz["labels"].shape == (32,)
  assert np.isfinite(summary["psnr"])


def test_cache_writes_records_the_cached_source_reads(trained, tmp_path):
  config, workdir = trained
  _, batch = cache_test_split(config, workdir, str(tmp_path / "cache"))
  assert batch["moments"].shape == (8, 8, 8, 8)  # 16 px / stride 2, 2×embed_dim channels
  assert np.isfinite(batch["moments"]).all()


def test_bench_writes_json(trained, tmp_path):
  config, _ = trained
  result = main.run(config, str(tmp_path), "bench")
  saved = json.load(open(tmp_path / "bench.json"))
  for key in ("num_params", "device", "train_img_per_s", "sample_img_per_s", "step_time_s",
              "compile_time_s", "mfu"):
    assert key in saved
  assert saved["train_img_per_s"] > 0 and saved["mfu"] is None  # CPU peak is unknown
  assert result["num_params"] == saved["num_params"]


def test_sample_without_checkpoint_says_what_to_do(tmp_path):
  config = load_config("kl_digits", "tiny")
  with pytest.raises(CheckpointError, match=r"no checkpoint found in .*Train first"):
    main.run(config, str(tmp_path), "sample")


def test_mismatched_checkpoint_lists_paths(trained):
  config, workdir = trained
  config = config.copy_and_resolve_references()
  config.tokenizer.overrides.enc_ch = 8
  with pytest.raises(CheckpointError, match=r"does not match(.|\n)*encoder/conv_in/kernel"):
    main.run(config, workdir, "sample")


def test_unknown_mode_is_clear(tmp_path):
  """An unknown mode is refused with the implemented ones listed, before anything is written."""
  with pytest.raises(ValueError, match="'export' is not a mode; choose one of train, sample.*convert"):
    main.run(load_config("kl_digits", "tiny"), str(tmp_path), "export")
  assert not os.listdir(tmp_path)


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "ardiff_jax.main", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_cli_mistyped_config_key_names_the_nearest(tmp_path):
  r = _cli("--config", "configs/kl_digits.py:tiny", "--workdir", str(tmp_path),
           "--config.train.num_stepz=3")
  assert r.returncode != 0
  assert "num_stepz" in r.stderr and "num_steps" in r.stderr, r.stderr[-2000:]


def test_cli_bad_config_arg_lists_valid_ones(tmp_path):
  r = _cli("--config", "configs/kl_digits.py:stepz=3", "--workdir", str(tmp_path))
  assert r.returncode != 0
  assert "unknown config argument 'stepz'" in r.stderr, r.stderr[-2000:]
