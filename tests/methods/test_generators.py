"""MAR's objective through the engine, and the digits chain tokenizer -> cache -> MAR -> sample -> eval."""
import json
import os

import jax
import numpy as np
import pytest

from ardiff_jax import main as main_lib
from ardiff_jax.methods import mar as mar_method
from ardiff_jax.parallel import sharding as shd
from ardiff_jax.train.experiment import build_experiment
from ardiff_jax.train.state import init_state, jit_train_step
from tests.helpers import load_config


def _tiny_config(name="mar_digits"):
  config = load_config(name, "tiny")
  config.tokenizer.latent_scale = 1.0
  return config


@pytest.mark.parametrize("name", ["mar_digits", "ar_diffusion_digits",
                                  pytest.param("ar_diffusion_digits:random", marks=pytest.mark.slow)])
def test_training_steps_reduce_the_loss_on_a_fixed_batch(name):
  name, _, order = name.partition(":")
  config = _tiny_config(name)
  if order:
    config.ar.order = order
  config.optim.warmup_steps, config.optim.lr = 0, 3e-3
  exp = build_experiment(config)
  state = init_state(0, exp.method, exp.tx, exp.shardings)
  step = jit_train_step(exp.method, exp.tx, exp.schedule, config, exp.mesh, exp.shardings)
  rng = np.random.default_rng(0)
  batch = {"moments": np.concatenate([rng.normal(size=(16, 8, 8, 4)),
                                      np.full((16, 8, 8, 4), -4.0)], -1).astype(np.float32),
           "label": (np.arange(16) % 10).astype(np.int32)}
  gbatch = shd.global_batch(batch, exp.mesh)
  # The loss at a fixed rng (fixed order, mask ratio, t and noise), before and after 30 steps.
  probe = jax.jit(lambda p: exp.method.loss_fn(p, gbatch, jax.random.key(7), 0, {})[0])
  before = float(probe(state.params))
  for _ in range(30):
    state, metrics = step(state, gbatch)
  after = float(probe(state.params))
  assert np.isfinite(after) and after < 0.8 * before, (before, after)
  if name == "mar_digits":
    assert 0.7 <= float(metrics["mask_ratio"]) <= 1.0


def test_weight_decay_spares_the_head_biases_and_norms():
  config = _tiny_config()
  exp = build_experiment(config)
  mask = mar_method.decay_mask(exp.abstract_state.params)
  flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(mask)}
  assert flat["['fake_latent']"] and flat["['encoder_pos_embed_learned']"] and flat["['mask_token']"]
  assert flat["['encoder_blocks_0']['attn']['qkv']['kernel']"]
  assert not flat["['encoder_blocks_0']['attn']['qkv']['bias']"]
  assert not flat["['encoder_norm']['scale']"]
  assert not any(v for k, v in flat.items() if "diffloss" in k)


@pytest.mark.slow   # each stage has its own fast test; `make demo` runs the chain at full size
def test_digits_chain_end_to_end(tmp_path):
  kl = load_config("kl_digits", "tiny")
  kl_dir = str(tmp_path / "kl")
  main_lib.run(kl, kl_dir, "train")
  main_lib.run(kl, kl_dir, "cache")
  with open(os.path.join(kl_dir, "cache", "train", "latent_stats.json")) as f:
    assert json.load(f)["suggested_scale"] > 0
  config = load_config("mar_digits", f"tiny,kl={kl_dir}")
  config.eval.feature_net.dir = str(tmp_path / "fnets")
  config.eval.feature_net.steps, config.eval.feature_net.widths = 20, (8, 8, 8)
  mar_dir = str(tmp_path / "mar")
  main_lib.run(config, mar_dir, "train")
  summary = main_lib.run(config, mar_dir, "sample")
  with np.load(os.path.join(mar_dir, "samples", "samples_3.npz")) as f:
    assert f["images"].shape == (20, 16, 16, 3) and f["images"].dtype == np.uint8
    np.testing.assert_array_equal(f["labels"], np.repeat(np.arange(10), 2))
  assert os.path.exists(summary["grid"])
  result = main_lib.run(config, mar_dir, "eval")
  assert result["num_samples"] == 40 and result["source"] == "model"
  assert np.isfinite(result["fd_clf"]) and 0 <= result["class_accuracy"] <= 1
  config.bench.steps, config.bench.warmup_steps = 2, 1
  bench = main_lib.run(config, mar_dir, "bench")
  assert bench["train_img_per_s"] > 0 and bench["sample_img_per_s"] > 0
  assert bench["sampler"]["num_ar_steps"] == 4 and bench["sampler"]["num_sampling_steps"] == "5"
