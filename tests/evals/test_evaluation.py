"""Feature nets trained by ardiff_jax, and `--mode eval` end to end on the bundled digits."""
import json
import os

import numpy as np
import pytest
import scipy.ndimage

from ardiff_jax import main as main_lib
from ardiff_jax.evals import features
from ardiff_jax.methods import feature_classifier
from ardiff_jax.evals import metrics as M
from tests.evals import inception_spec, torch_files
from tests.helpers import load_config


def _digits_config(cache_dir, **eval_overrides):
  config = load_config("kl_digits", "tiny")
  f = config.eval.feature_net
  f.dir = str(cache_dir)
  f.widths, f.steps, f.batch_size, f.warmup_steps = (16, 32, 64), 150, 64, 20
  config.data.image_size = 32
  config.tokenizer.overrides.resolution = 32
  for k, v in eval_overrides.items():
    setattr(config.eval, k, v)
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """One digits feature net for the whole module (trained once, about 20 s on 2 cores)."""
  cache = tmp_path_factory.mktemp("feature_nets")
  config = _digits_config(cache)
  fnet = features.get_feature_net(config.data, config.eval.feature_net)
  return config, fnet


@pytest.fixture
def config(trained):
  """A fresh copy of the module's config, so one test's edits never reach another."""
  return trained[0].copy_and_resolve_references()


def test_feature_net_is_cached_with_its_accuracy(trained):
  config, fnet = trained
  assert fnet.accuracy > 0.9, fnet.accuracy
  with open(os.path.join(fnet.directory, features.RESULT_FILE)) as f:
    assert json.load(f)["accuracy"] == fnet.accuracy
  stamp = os.path.getmtime(os.path.join(fnet.directory, features.RESULT_FILE))
  again = features.get_feature_net(config.data, config.eval.feature_net)   # no retraining
  assert again.directory == fnet.directory and again.accuracy == fnet.accuracy
  assert os.path.getmtime(os.path.join(fnet.directory, features.RESULT_FILE)) == stamp
  other = config.eval.feature_net.copy_and_resolve_references()
  other.steps = 151
  assert features.cache_dir(config.data, other) != fnet.directory     # settings are in the key


def test_batchnorm_feature_net_keeps_running_statistics(tmp_path, config):
  """norm="batch": running statistics train with the net, are cached with it, and a feature
  never depends on the other images of its batch."""
  f = config.eval.feature_net
  f.dir, f.norm, f.steps = str(tmp_path), "batch", 40
  f.arch, f.widths = "pooled", (8, 16, 16, 16)     # the CIFAR-10 layout, narrow
  fnet = features.get_feature_net(config.data, f)
  stats = fnet.variables["batch_stats"]["stem_norm"]
  assert np.abs(np.asarray(stats["mean"])).max() > 1e-3          # moved away from the init (0, 1)
  assert np.abs(np.asarray(stats["var"]) - 1).max() > 1e-3
  images, _ = features.load_images(config.data, config.data.eval_split, limit=64)
  alone, _ = fnet.features_and_logits(images[:8], batch_size=8)
  mixed, _ = fnet.features_and_logits(images, batch_size=64)
  np.testing.assert_allclose(alone, mixed[:8], rtol=1e-5, atol=1e-5)
  again = features.get_feature_net(config.data, f)                  # restored from the cache
  np.testing.assert_array_equal(np.asarray(again.variables["batch_stats"]["stem_norm"]["mean"]),
                                np.asarray(stats["mean"]))
  f.norm = "layer"
  with pytest.raises(ValueError, match="norm='layer'"):
    features.get_feature_net(config.data, f)


def test_pooled_classifier_layout():
  """arch="pooled": a 2×2 max-pool per stage after widths[0], residual blocks only after the
  stages in residual_stages, global-max features of widths[-1] dims; an unknown arch is an error."""
  import jax  # pylint: disable=g-import-not-at-top
  f = load_config("kl_cifar10").eval.feature_net
  f.widths = (4, 8, 8, 12)
  net = feature_classifier.build_classifier(f, num_classes=10)
  x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  variables = net.init(jax.random.PRNGKey(0), x)
  feats, logits = net.apply(variables, x)
  assert feats.shape == (2, 12) and logits.shape == (2, 10)
  blocks = sorted(k for k in variables["params"] if "_block" in k)
  assert blocks == ["stage1_block0", "stage3_block0"]
  assert variables["params"]["stage3_block0"]["conv1"]["kernel"].shape == (3, 3, 12, 12)
  f.arch = "dense"
  with pytest.raises(ValueError, match="arch='dense'"):
    feature_classifier.build_classifier(f, num_classes=10)


def test_class_accuracy_of_real_test_images_is_the_classifier_accuracy(trained):
  config, fnet = trained
  images, labels = features.load_images(config.data, config.data.eval_split)
  _, logits = fnet.features_and_logits(images)
  assert M.class_accuracy(logits, labels) == pytest.approx(fnet.accuracy, abs=1e-12)


def test_fd_separates_real_from_noise_and_blur(trained):
  config, fnet = trained
  train, _ = features.load_images(config.data, "train", limit=360, seed=1)
  test, _ = features.load_images(config.data, "test")
  noise = np.random.default_rng(0).integers(0, 256, test.shape, dtype=np.uint8)
  blurred = scipy.ndimage.gaussian_filter(test.astype(np.float64), sigma=(0, 2, 2, 0))
  blurred = np.clip(np.round(blurred), 0, 255).astype(np.uint8)
  feats = {k: fnet.features_and_logits(v)[0] for k, v in
           dict(train=train, test=test, noise=noise, blurred=blurred).items()}
  fd = lambda a: M.frechet_distance_of_features(feats[a], feats["test"])
  assert fd("train") * 10 < fd("noise")
  assert fd("train") * 3 < fd("blurred")


def test_cached_source_needs_an_image_dataset(trained):
  config, _ = trained
  data = config.data.copy_and_resolve_references()
  data.source = "cached"
  with pytest.raises(ValueError, match="config.eval.data"):
    feature_classifier.classifier_train_config(data, config.eval.feature_net)


def test_eval_mode_on_real_training_images(trained, config, tmp_path):
  fnet = trained[1]
  config.eval.source, config.eval.num_samples = "real_train", 300
  config.eval.memorization_train = 0        # every training image: these 300 are among them
  result = main_lib.run(config, str(tmp_path), "eval")
  with open(tmp_path / "eval" / "real_train_0.json") as f:
    written = json.load(f)
  assert written == pytest.approx(result)
  for key in ("num_samples", "feature_net", "feature_net_accuracy", "fd_clf", "class_accuracy",
              "precision", "recall"):
    assert key in written
  assert written["feature_net"] == fnet.name and written["num_samples"] == 300
  assert written["class_accuracy"] > 0.9 and written["precision"] > 0.5 and written["recall"] > 0.5
  # Training images "generated": the memorisation check sees copies.
  assert written["memorization/nn_train_ratio"] < 0.01
  assert written["memorization/frac_below_real_p5"] == 1.0


def test_eval_mode_scores_a_trained_tokenizer_and_inception(config, tmp_path):
  main_lib.run(config, str(tmp_path), "train")          # 4 tiny steps
  # Synthetic Inception weights with the standard names: the FID/IS path end to end.
  rng = np.random.default_rng(0)
  sd = {k: (rng.uniform(0.5, 2, s) if "running_var" in k else 0.05 * rng.normal(size=s)).astype(
      np.float32) for k, s in inception_spec.state_dict_shapes().items() if "num_batches" not in k}
  torch_files.save_zip(str(tmp_path / "w.pth"), sd)
  from ardiff_jax.convert import inception as convert  # pylint: disable=g-import-not-at-top
  convert.convert_file(str(tmp_path / "w.pth"), str(tmp_path / "inception.npz"))
  config.eval.inception_weights = str(tmp_path / "inception.npz")
  config.eval.num_samples, config.eval.num_real, config.eval.batch_size = 16, 16, 8
  config.eval.inception_batch_size = 8
  config.eval.tag = "fid"                               # a named variant: eval/<step>_<tag>.json
  result = main_lib.run(config, str(tmp_path), "eval")
  assert os.path.exists(tmp_path / "eval" / "4_fid.json")
  assert result["source"] == "model" and result["num_samples"] == 16 and result["num_real"] == 16
  for key in ("fd_clf", "class_accuracy", "precision", "recall", "fid", "inception_score"):
    assert np.isfinite(result[key]), key
  assert 1.0 <= result["inception_score"] <= 1008
  assert os.path.exists(tmp_path / "eval" / "fid_stats_real.npz")   # reused by the next eval


def test_bad_eval_source_names_the_choices(config, tmp_path):
  config.eval.source = "real_test"
  with pytest.raises(ValueError, match="model.*real_train"):
    main_lib.run(config, str(tmp_path), "eval")


@pytest.mark.slow
def test_training_runs_the_evaluation_every_k_steps(config, tmp_path):
  config.eval.every_steps, config.eval.num_samples, config.eval.num_real = 2, 16, 32
  config.eval.batch_size = 16
  main_lib.run(config, str(tmp_path), "train")          # 4 tiny steps
  with open(tmp_path / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  evals = {r["step"]: r for r in rows if "eval/fd_clf" in r}
  assert sorted(evals) == [2, 4]
  assert all(np.isfinite(r["eval/fd_clf"]) and "eval/class_accuracy" in r for r in evals.values())
  assert sorted(os.listdir(tmp_path / "eval")) == ["2.json", "4.json"]


def test_eval_labels_interleave_the_classes():
  """`--mode eval` labels: equal counts per class, and every run of K consecutive labels holds
  every class (a batch of 100 digits is no longer one class); grids keep class order."""
  from ardiff_jax.evals.evaluator import balanced_labels  # pylint: disable=g-import-not-at-top
  labels = balanced_labels(1003, 10, interleave=True)
  assert np.bincount(labels).tolist() == [101, 101, 101] + [100] * 7
  assert all(sorted(labels[i:i + 10]) == list(range(10)) for i in range(0, 1000, 10))
  assert balanced_labels(6, 3).tolist() == [0, 0, 1, 1, 2, 2]


def test_a_feature_net_is_keyed_by_its_folder_however_the_path_reaches_it(tmp_path):
  from ardiff_jax import configlib  # pylint: disable=g-import-not-at-top
  (tmp_path / "cifar10").mkdir()
  os.symlink(tmp_path / "cifar10", tmp_path / "link")
  data = configlib.base_config().data
  data.source, net = "folder", configlib.base_config().eval.feature_net
  keys = set()
  for path in (tmp_path / "cifar10", tmp_path / "link", tmp_path / "cifar10" / ".." / "cifar10"):
    data.path = str(path)
    keys.add(features.cache_key(data, net).split("-")[-1])
  assert len(keys) == 1
