"""Paella's training objective: noising, the weighted label-smoothed loss (against float64 NumPy),
condition dropout, captions; then the method through the engine on tiny shapes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ardiff_jax.methods import paella
from ardiff_jax.models import byte_text

V = 16


def test_levels_follow_papers_clipped_uniform():
  """t = clip(1 − U + 0.001, 0.001, 1): E[t] = 0.001 + ∫_{0.001}^{1} (1.001 − u) du = 0.5009995."""
  t = np.asarray(paella.sample_levels(jax.random.key(0), 200_000))
  assert t.min() >= 0.001 and t.max() <= 1.0
  assert abs(t.mean() - 0.5009995) < 4 * 0.2887 / np.sqrt(t.size)
  assert abs(np.mean(t == 1.0) - 0.001) < 4 * np.sqrt(0.001 / t.size)


def test_uniform_noise_replaces_a_t_share_with_uniform_codes():
  codes = jnp.zeros((4, 64, 64), jnp.int32) + 3
  t = jnp.asarray([0.0, 0.25, 0.5, 1.0])
  noised, replaced = (np.asarray(a) for a in paella.uniform_noise(jax.random.key(1), codes, t, V))
  np.testing.assert_array_equal(noised[replaced == 0], 3)              # kept tokens are untouched
  for row, level in enumerate(np.asarray(t)):
    share = replaced[row].mean()
    assert abs(share - level) < 4 * np.sqrt(level * (1 - level) / 4096) + 1e-9, (level, share)
  counts = np.bincount(noised[3].ravel(), minlength=V)                  # t = 1: all uniform codes
  assert counts.min() > 0.8 * 4096 / V and counts.max() < 1.2 * 4096 / V


def test_mask_noise_masks_the_cosine_count_and_reports_its_fraction():
  codes = jnp.zeros((256, 4, 4), jnp.int32)
  noised, masked, level = (np.asarray(a) for a in paella.mask_noise(jax.random.key(2), codes, V))
  count = masked.reshape(256, -1).sum(-1)
  np.testing.assert_array_equal(noised == V, masked == 1)
  np.testing.assert_allclose(level, count / 16)
  assert count.min() >= 1 and count.max() <= 16
  # ⌈16·cos(π/2·r)⌉ for r ~ U[0, 1): P(count = 16) = P(cos(π r/2) > 15/16) = 2/π·acos(15/16).
  assert abs(np.mean(count == 16) - 2 / np.pi * np.arccos(15 / 16)) < 0.08


def _numpy_loss(logits, targets, t, replaced, eta, eps):
  logits = np.asarray(logits, np.float64)
  log_p = logits - logits.max(-1, keepdims=True)
  log_p = log_p - np.log(np.exp(log_p).sum(-1, keepdims=True))
  soft = np.full(logits.shape, eps / V)
  np.put_along_axis(soft, np.asarray(targets)[..., None], 1 - eps + eps / V, axis=-1)
  ce = -(soft * log_p).sum(-1)
  w = 1 - (1 - np.asarray(replaced, np.float64)) * ((1 - np.asarray(t, np.float64)) * (1 - eta))[:, None, None]
  return np.mean((w * ce).sum((1, 2)) / w.sum((1, 2))), w


def test_weighted_label_smoothed_loss_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 4, 4, V)) * 3
  targets = rng.integers(0, V, (3, 4, 4))
  t = np.asarray([0.001, 0.4, 1.0])
  replaced = (rng.uniform(size=(3, 4, 4)) < 0.5).astype(np.float32)
  want, w_np = _numpy_loss(logits, targets, t, replaced, 0.3, 0.1)
  w = paella.loss_weights(jnp.asarray(t, jnp.float32), jnp.asarray(replaced), 0.3)
  np.testing.assert_allclose(w, w_np, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(w)[replaced == 1], 1.0)          # noised tokens weigh 1
  got = paella.weighted_ce(jnp.asarray(logits, jnp.float32), jnp.asarray(targets), w, 0.1)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # MaskGIT's normalisation: the mean over every masked token of the batch.
  ce = _numpy_loss(logits, targets, np.ones(3), np.ones((3, 4, 4)), 0.3, 0.1)[0]   # w = 1: plain mean
  np.testing.assert_allclose(paella.weighted_ce(jnp.asarray(logits, jnp.float32), jnp.asarray(targets),
                                                jnp.ones((3, 4, 4)), 0.1, per_sample=False), ce, rtol=1e-5)
  masked = jnp.asarray(replaced)
  per_token = paella.weighted_ce(jnp.asarray(logits, jnp.float32), jnp.asarray(targets), masked,
                                 0.1, per_sample=False)
  log_p = logits - logits.max(-1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
  soft = np.full(logits.shape, 0.1 / V)
  np.put_along_axis(soft, targets[..., None], 0.9 + 0.1 / V, axis=-1)
  np.testing.assert_allclose(per_token, (-(soft * log_p).sum(-1))[replaced == 1].mean(), rtol=1e-5)


@pytest.mark.parametrize("scope", ["batch", "sample"])
def test_condition_dropout_rate_and_scope(scope):
  flags = np.stack([np.asarray(paella.drop_flags(jax.random.key(i), 32, 0.2, scope))
                    for i in range(2000)])
  assert abs(flags.mean() - 0.2) < 4 * np.sqrt(0.16 / (2000 if scope == "batch" else 64000))
  rows_uniform = np.all(flags == flags[:, :1], axis=1)
  assert rows_uniform.all() if scope == "batch" else rows_uniform.mean() < 0.01


def test_captions_are_byt5_ids_with_an_empty_unconditional_row():
  c = paella.paella_config()
  ids = paella.caption_ids(c, 10)
  assert ids.shape == (11, c.text_max_bytes)
  want = [b + 3 for b in b"a photo of a cat"] + [1]
  np.testing.assert_array_equal(ids[3, :len(want)], want)
  assert (ids[3, len(want):] == 0).all()
  np.testing.assert_array_equal(ids[10, :2], [byte_text.EOS_ID, byte_text.PAD_ID])
  with pytest.raises(ValueError, match="one name per class"):
    paella.caption_ids(c, 7)


# ---------------------------------------------------------------------------------------------
# The method through the engine.

from ardiff_jax import main as main_lib  # noqa: E402
from ardiff_jax.parallel import sharding as shd  # noqa: E402
from ardiff_jax.train.experiment import build_experiment  # noqa: E402
from ardiff_jax.train.state import init_state, jit_train_step  # noqa: E402
from tests.helpers import load_config, write_hf_folder  # noqa: E402


def _codes_batch(config, n=16, seed=0):
  side = config.data.image_size // 4
  rng = np.random.default_rng(seed)
  return {"codes": rng.integers(0, 64, (n, side, side)).astype(np.int32),
          "label": (np.arange(n) % 10).astype(np.int32)}


@pytest.mark.parametrize("arg", ["tiny,noise=mask", pytest.param("tiny,cond=text", marks=pytest.mark.slow),
                                 pytest.param("tiny", marks=pytest.mark.slow)])
def test_training_steps_reduce_the_loss_from_log_v(arg):
  """At init the output logits are 0 (zero-initialised clf): the loss is exactly log V."""
  config = load_config("paella_digits", arg)
  config.optim.warmup_steps, config.optim.lr = 0, 3e-3
  exp = build_experiment(config)
  state = init_state(0, exp.method, exp.tx, exp.shardings)
  step = jit_train_step(exp.method, exp.tx, exp.schedule, config, exp.mesh, exp.shardings)
  batch = shd.global_batch(_codes_batch(config), exp.mesh)
  probe = jax.jit(lambda p: exp.method.loss_fn(p, batch, jax.random.key(7), 0, {})[0])
  before = float(probe(state.params))
  assert before == pytest.approx(np.log(64), rel=1e-5)
  for _ in range(25):
    state, _ = step(state, batch)
  assert float(probe(state.params)) < 0.9 * before


def test_a_train_step_on_eight_devices_equals_one_device():
  config = load_config("paella_digits", "tiny")
  config.paella.overrides = {"dropout": 0.0}
  batch = _codes_batch(config)
  out = []
  for devices in (jax.devices()[:1], jax.devices()[:8]):
    exp = build_experiment(config, devices=devices)
    state = init_state(0, exp.method, exp.tx, exp.shardings)
    step = jit_train_step(exp.method, exp.tx, exp.schedule, config, exp.mesh, exp.shardings)
    state, metrics = step(state, shd.global_batch(batch, exp.mesh))
    out.append((jax.device_get(state.params), jax.device_get(metrics)))
  (p1, m1), (p8, m8) = out
  np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6), p8, p1)


@pytest.mark.parametrize("field,value,message", [
    ("noise", "absorbing", "paella.noise"), ("cond", "clip", "paella.cond"),
    ("drop_scope", "token", "paella.drop_scope"), ("label_drop", 1.0, "paella.label_drop"),
    ("steps", 0, "paella.steps")])
def test_settings_paella_cannot_run_are_refused(field, value, message):
  config = load_config("paella_digits", "tiny")
  config.paella[field] = value
  with pytest.raises(ValueError, match=message):
    build_experiment(config)


def test_a_missing_byt5_checkpoint_names_the_field(tmp_path):
  config = load_config("paella_digits", "tiny,cond=byt5")
  config.paella.byt5_path = str(tmp_path / "nowhere")
  with pytest.raises(ValueError, match="paella.byt5_path"):
    build_experiment(config)


def test_only_the_configured_condition_source_has_parameters():
  config = load_config("paella_digits", "tiny")
  config.paella.preset = "paella_1b"              # whose preset also names ByT5 and CLIP widths
  config.paella.overrides = dict(c_hidden=(32, 64), blocks=(1, 1), nhead=(0, 2), c_in=32, c_out=32,
                                 c_cond=64, level_config=("CT", "CTA"))
  shapes = jax.eval_shape(build_experiment(config).method.init_params, jax.random.key(0))
  names = set(shapes["predictor"])
  assert "class_embedding" in names and not names & {"byt5_mapper", "clip_mapper", "clip_image_mapper"}


@pytest.fixture(scope="module")
def paella_vq_run(tmp_path_factory):
  """A 4-step tiny Paella VQGAN run with its code cache."""
  workdir = str(tmp_path_factory.mktemp("paella_vq"))
  config = load_config("paella_vq_digits", "tiny")
  main_lib.run(config, workdir, "train")
  main_lib.run(config, workdir, "cache")
  return workdir


def _byt5_checkpoint(folder):
  """A tiny random ByT5-shaped encoder (vocabulary 384: every byte id) saved as a Hugging Face
  checkpoint folder: config.json and model.safetensors under HF's names."""
  from tests.models.test_t5 import TINY, random_hf_state_dict  # pylint: disable=g-import-not-at-top
  cfg = {**TINY, "vocab_size": 384, "model_type": "t5"}
  return write_hf_folder(folder, random_hf_state_dict(cfg), cfg)


# The frozen ByT5 path runs in make test through the COCO test below (ByT5 and CLIP).
@pytest.mark.parametrize("arg", ["tiny", pytest.param("tiny,cond=byt5", marks=pytest.mark.slow),
                                 pytest.param("tiny,cond=text", marks=pytest.mark.slow),
                                 pytest.param("tiny,noise=mask", marks=pytest.mark.slow)])
def test_paella_trains_and_samples_on_the_paella_vq_run(paella_vq_run, tmp_path, arg):
  config = load_config("paella_digits", f"{arg},vq={paella_vq_run}")
  if config.paella.cond == "byt5":   # the text encoder is read from the checkpoint, frozen
    config.paella.byt5_path = _byt5_checkpoint(tmp_path / "byt5")
  main_lib.run(config, str(tmp_path), "train")
  summary = main_lib.run(config, str(tmp_path), "sample")
  import os  # pylint: disable=g-import-not-at-top
  with np.load(os.path.join(str(tmp_path), "samples", "samples_3.npz")) as f:
    assert f["images"].shape == (20, 16, 16, 3) and f["images"].dtype == np.uint8
  assert summary["cfg_scale"] == 2.0


def _clip_checkpoint(folder):
  """A tiny random CLIP (16 px images) with the tiny BPE vocabulary of tests/models/test_clip.py,
  saved as a Hugging Face CLIPModel folder."""
  from tests.models import test_clip  # pylint: disable=g-import-not-at-top
  folder.mkdir()
  _, vocab = test_clip._tiny_tokenizer(folder, context_length=77)
  cfg = {**test_clip.CONFIG,
         "text_config": {**test_clip.TEXT, "vocab_size": max(vocab.values()) + 1,
                         "max_position_embeddings": 77},
         "vision_config": {**test_clip.VISION, "image_size": 16}}
  return write_hf_folder(folder, test_clip.random_hf_state_dict(cfg), cfg)


def test_paella_on_coco_captions_with_byt5_and_clip(paella_vq_run, tmp_path):
  """configs/paella_coco256.py at smoke size: codes encoded from the images by the frozen VQGAN,
  conditions from ByT5 and CLIP (text and image) read from local folders; `--mode sample` puts
  each val image next to a sample from its caption."""
  from tests.data.test_data_sources import write_coco  # pylint: disable=g-import-not-at-top
  coco = tmp_path / "coco"
  write_coco(coco, "train", captions=(("a red square", "red"), ("a blue square",), ("blue",)))
  write_coco(coco, "val", captions=(("a red square",), ("a blue square",)))
  clip_dir = _clip_checkpoint(tmp_path / "clip")
  arg = (f"tiny=True,vq={paella_vq_run},byt5={_byt5_checkpoint(tmp_path / 'byt5')},"
         f"clip={clip_dir},path={coco}")
  config = load_config("paella_coco256", arg)
  exp = build_experiment(config)
  shapes = jax.eval_shape(exp.method.init_params, jax.random.key(0))["predictor"]
  assert {"byt5_mapper", "clip_mapper", "clip_image_mapper"} <= set(shapes)
  workdir = str(tmp_path / "run")
  main_lib.run(config, workdir, "train")
  summary = main_lib.run(config, workdir, "sample")
  import os  # pylint: disable=g-import-not-at-top
  with np.load(os.path.join(workdir, "samples", "samples_3.npz")) as f:
    assert f["images"].shape == (4, 16, 16, 3)        # 2 val pairs: real, sample
  assert summary["num_images"] == 4
  other = load_config("paella_coco256", arg)
  other.tokenizer.overrides = dict(c_hidden=16, bottleneck_blocks=1, codebook_size=32)
  with pytest.raises(ValueError, match="was trained as tokenizer 'paella_tiny' with .*'codebook_size': 64"):
    main_lib.run(other, str(tmp_path / "other"), "train")
  bad = load_config("paella_coco256", arg)
  bad.data.source = "cached"
  with pytest.raises(ValueError, match="byt5\\+clip.*data.source='coco'"):
    build_experiment(bad)
