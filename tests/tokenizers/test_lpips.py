"""LPIPS from user-supplied PyTorch files: against a float64 NumPy LPIPS, and its errors.

The files are synthetic (random weights) but laid out as the real ones: torchvision's VGG16 state
dict (`features.<i>.*` plus the classifier, which LPIPS ignores) and LPIPS's `vgg.pth`
(`lin<l>.model.1.weight`), written in torch.save's zip layout without PyTorch.
"""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ardiff_jax.methods import get_method
from ardiff_jax.tokenizers import lpips
from tests.evals import torch_files
from tests.helpers import load_config

CONVS = [(0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256),
         (14, 256, 256), (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512),
         (26, 512, 512), (28, 512, 512)]
POOL_BEFORE = {5, 10, 17, 24}          # torchvision's max-pools sit at indices 4, 9, 16, 23
TAPS = {2, 7, 14, 21, 28}              # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3


def synthetic_state_dicts(seed=0):
  rng = np.random.default_rng(seed)
  vgg = {}
  for i, cin, cout in CONVS:
    vgg[f"features.{i}.weight"] = (rng.normal(size=(cout, cin, 3, 3)) * np.sqrt(2 / (9 * cin))
                                   ).astype(np.float32)
    vgg[f"features.{i}.bias"] = (0.1 * rng.normal(size=cout)).astype(np.float32)
  vgg["classifier.6.bias"] = np.zeros(1000, np.float32)   # present in torchvision's file, unused
  lin = {f"lin{l}.model.1.weight": rng.uniform(0, 1, size=(1, c, 1, 1)).astype(np.float32)
         for l, c in enumerate((64, 128, 256, 512, 512))}
  return vgg, lin


def lpips_numpy(vgg, lin, x, y):
  """Float64 LPIPS written as the PyTorch original computes it, NCHW: x, y [B,H,W,3] -> [B]."""

  def conv3x3(h, w, b):                               # h [B,C,H,W], w [O,C,3,3]
    p = np.pad(h, ((0, 0), (0, 0), (1, 1), (1, 1)))
    H, W = h.shape[2:]
    out = sum(np.einsum("bchw,oc->bohw", p[:, :, dy:dy + H, dx:dx + W], w[:, :, dy, dx])
              for dy in range(3) for dx in range(3))
    return out + b[None, :, None, None]

  def features(img):
    h = np.transpose(img, (0, 3, 1, 2)).astype(np.float64)
    shift = np.array([-.030, -.088, -.188])[None, :, None, None]
    scale = np.array([.458, .448, .450])[None, :, None, None]
    h = (h - shift) / scale
    taps = []
    for i, _, _ in CONVS:
      if i in POOL_BEFORE:
        B, C, H, W = h.shape
        h = h.reshape(B, C, H // 2, 2, W // 2, 2).max(axis=(3, 5))
      h = np.maximum(conv3x3(h, vgg[f"features.{i}.weight"].astype(np.float64),
                             vgg[f"features.{i}.bias"].astype(np.float64)), 0)
      if i in TAPS:
        taps.append(h)
    return taps

  total = 0
  for l, (fx, fy) in enumerate(zip(features(x), features(y))):
    nx = fx / (np.sqrt(np.sum(fx ** 2, axis=1, keepdims=True)) + 1e-10)
    ny = fy / (np.sqrt(np.sum(fy ** 2, axis=1, keepdims=True)) + 1e-10)
    w = lin[f"lin{l}.model.1.weight"].astype(np.float64)[0, :, 0, 0]
    total = total + np.einsum("bchw,c->bhw", (nx - ny) ** 2, w).mean(axis=(1, 2))
  return total


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
  vgg, lin = synthetic_state_dicts()
  d = tmp_path_factory.mktemp("lpips")
  torch_files.save_zip(str(d / "vgg16.pth"), vgg)
  torch_files.save_zip(str(d / "vgg.pth"), lin)
  return str(d / "vgg16.pth"), str(d / "vgg.pth"), vgg, lin


def test_lpips_from_torch_files_matches_float64_numpy(lpips_files):
  vgg_path, lin_path, vgg, lin = lpips_files
  rng = np.random.default_rng(1)
  x = rng.uniform(-1, 1, size=(2, 16, 16, 3)).astype(np.float32)
  y = np.clip(x + 0.3 * rng.normal(size=x.shape), -1, 1).astype(np.float32)
  variables = lpips.load_variables(vgg_path, lin_path)
  got = np.asarray(jax.jit(lpips.LPIPS().apply)(variables, x, y))
  want = lpips_numpy(vgg, lin, x, y)
  assert got.shape == (2,) and np.all(want > 0)
  np.testing.assert_allclose(got, want, rtol=2e-4)
  assert np.allclose(jax.jit(lpips.LPIPS().apply)(variables, x, x), 0.0)


def test_lpips_names_the_missing_or_misshapen_weights(lpips_files, tmp_path):
  _, lin_path, vgg, lin = lpips_files
  broken = dict(vgg)
  del broken["features.12.bias"]
  broken["features.0.weight"] = broken["features.0.weight"][:, :1]
  with pytest.raises(ValueError, match=r"features\.12\.weight/bias.*features\.0: weight \(64, 1, 3, 3\)"
                     r"|features\.0: weight \(64, 1, 3, 3\).*features\.12"):
    lpips.variables_from_state_dicts(broken, lin)
  with pytest.raises(ValueError, match=r"lacks lin3\.model\.1\.weight"):
    lpips.variables_from_state_dicts(vgg, {k: v for k, v in lin.items() if "lin3" not in k})
  with pytest.raises(FileNotFoundError, match=r"tokenizer\.lpips_vgg16=.*no such file.*perceptual_weight=0"):
    lpips.load_variables(str(tmp_path / "absent.pth"), lin_path, vgg16_field="tokenizer.lpips_vgg16")


def _init(config):
  method = get_method(config)
  params = method.init_params(jax.random.key(0))
  params = jax.tree.map(lambda p: getattr(p, "value", p), params,
                        is_leaf=lambda p: hasattr(p, "value"))
  return method, params


def _losses(config, x):
  """(loss, metrics) of a tokenizer objective at its initial weights on images x."""
  method, params = _init(config)
  loss, metrics, _ = method.loss_fn(params, {"image": jnp.asarray(x)}, jax.random.key(2),
                                    jnp.int32(0), method.init_extras(jax.random.key(1)))
  return float(loss), {k: float(v) for k, v in metrics.items()}


def test_vq_tokenizer_adds_weighted_lpips_or_says_once_that_it_is_off(lpips_files, caplog):
  vgg_path, lin_path, vgg, lin = lpips_files
  config = load_config("vq_digits", "tiny")         # 16 px, the smallest size VGG16 takes
  x = np.random.default_rng(3).uniform(-1, 1, size=(2, 16, 16, 3)).astype(np.float32)

  config.tokenizer.perceptual_weight = 0.7
  with caplog.at_level(logging.WARNING):
    off, off_metrics = _losses(config, x)
  warnings = [r for r in caplog.records if "without the perceptual term" in r.getMessage()]
  assert len(warnings) == 1 and "perceptual_loss" not in off_metrics

  config.tokenizer.lpips_vgg16, config.tokenizer.lpips_lin = vgg_path, lin_path
  on, on_metrics = _losses(config, x)
  method, params = _init(config)
  x_rec = np.asarray(method.model.apply({"params": params["vq"]}, x)[0])
  want = lpips_numpy(vgg, lin, x, x_rec).mean()
  assert on_metrics["perceptual_loss"] == pytest.approx(want, rel=1e-3)
  assert on - off == pytest.approx(0.7 * want, rel=1e-3)


def test_kl_tokenizer_adds_lpips_to_every_element_as_ldm(lpips_files):
  """LDM adds the per-image LPIPS to each of the H·W·C elements of |x − x̂| before the NLL; at the
  initial log-variance 0 the loss grows by w_p·mean LPIPS·HWC."""
  vgg_path, lin_path, _, _ = lpips_files
  config = load_config("kl_digits", "tiny")
  config.tokenizer.perceptual_weight = 0.5
  x = np.random.default_rng(4).uniform(-1, 1, size=(2, 16, 16, 3)).astype(np.float32)
  off, _ = _losses(config, x)
  config.tokenizer.lpips_vgg16, config.tokenizer.lpips_lin = vgg_path, lin_path
  on, metrics = _losses(config, x)
  assert metrics["perceptual_loss"] > 0
  assert on - off == pytest.approx(0.5 * metrics["perceptual_loss"] * 16 * 16 * 3, rel=1e-4)


@pytest.mark.parametrize("name", ["vq_digits", "kl_digits"])
def test_a_tokenizer_run_saved_before_lpips_still_builds_and_trains(name):
  """Generators restore their tokenizer run from its saved config.json; one written before the
  LPIPS fields existed (no perceptual_weight, lpips_vgg16, lpips_lin) must still build, as a run
  trained without LPIPS."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  config = load_config(name, "tiny")
  config.tokenizer = ml_collections.ConfigDict(
      {k: v for k, v in config.tokenizer.items()
       if k not in ("perceptual_weight", "lpips_vgg16", "lpips_lin")})
  x = np.random.default_rng(5).uniform(-1, 1, size=(2, 16, 16, 3)).astype(np.float32)
  loss, metrics = _losses(config, x)
  assert np.isfinite(loss) and "perceptual_loss" not in metrics
