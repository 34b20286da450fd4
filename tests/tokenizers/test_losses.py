"""Tests for ardiff_jax.tokenizers.losses against float64 NumPy."""
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ardiff_jax.tokenizers import losses


def _images(seed, shape=(3, 4, 5, 3)):
  return np.random.default_rng(seed).uniform(-1.0, 1.0, size=shape)


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_reconstruction_loss_sums_per_sample(kind):
  x, y = _images(0), _images(1)
  got = np.asarray(losses.reconstruction_loss(jnp.asarray(x, jnp.float32),
                                              jnp.asarray(y, jnp.float32), kind))
  diff = x - y
  err = np.abs(diff) if kind == "l1" else diff**2
  want = np.array([err[b].sum() for b in range(x.shape[0])])
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_reconstruction_loss_bad_kind():
  with pytest.raises(ValueError, match=r"unknown reconstruction loss kind 'l3'.*'l1', 'l2'"):
    losses.reconstruction_loss(jnp.zeros((1, 2, 2, 3)), jnp.zeros((1, 2, 2, 3)), "l3")


@pytest.mark.parametrize("logvar", [0.0, 0.7, -1.3])
def test_nll_loss_matches_ldm_per_element_form(logvar):
  x, y = _images(2), _images(3)
  rec = losses.reconstruction_loss(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
  got = np.asarray(losses.nll_loss(rec, jnp.float32(logvar), num_elements=4 * 5 * 3))
  # LDM: nll = |x - y| / exp(logvar) + logvar per element, then summed.
  per_elem = np.abs(x - y) / np.exp(logvar) + logvar
  want = per_elem.reshape(3, -1).sum(axis=1)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_nll_loss_gradient_in_logvar():
  rec = jnp.array([10.0, 20.0])
  grad = jax.grad(lambda lv: losses.nll_loss(rec, lv, 12).sum())(jnp.float32(0.5))
  # d/dlv sum_b(rec_b e^-lv + 12 lv) = -sum(rec) e^-lv + 24.
  np.testing.assert_allclose(float(grad), -30.0 * np.exp(-0.5) + 24.0, rtol=1e-5)


def test_hinge_losses():
  rng = np.random.default_rng(4)
  real, fake = rng.normal(size=(3, 2, 2, 1)) * 2, rng.normal(size=(3, 2, 2, 1)) * 2
  got_d = float(losses.hinge_d_loss(jnp.asarray(real, jnp.float32), jnp.asarray(fake, jnp.float32)))
  want_d = 0.5 * (np.maximum(0.0, 1.0 - real).mean() + np.maximum(0.0, 1.0 + fake).mean())
  np.testing.assert_allclose(got_d, want_d, rtol=1e-5)
  got_g = float(losses.generator_hinge_loss(jnp.asarray(fake, jnp.float32)))
  np.testing.assert_allclose(got_g, -fake.mean(), rtol=1e-5, atol=1e-7)


def test_adaptive_disc_weight():
  rng = np.random.default_rng(5)
  a, b = rng.normal(size=(3, 3, 4, 2)), rng.normal(size=(3, 3, 4, 2)) * 0.1
  got = float(losses.adaptive_disc_weight(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)))
  want = np.sqrt((a**2).sum()) / (np.sqrt((b**2).sum()) + 1e-4)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  huge = float(losses.adaptive_disc_weight(jnp.ones(4), jnp.zeros(4)))
  assert huge == 1e4  # 2 / 1e-4 clipped


@pytest.mark.parametrize("norm", ["group", "none"])
def test_patch_discriminator_shape(norm):
  disc = losses.PatchDiscriminator(norm=norm)
  x = jnp.zeros((2, 32, 32, 3))
  params = jax.jit(disc.init)(jax.random.key(0), x)
  logits = jax.jit(disc.apply)(params, x)
  # 32 -> 16 -> 8 -> 4 (stride 2) -> 3 -> 2 (stride 1, 4x4, pad 1).
  assert logits.shape == (2, 2, 2, 1) and logits.dtype == jnp.float32
  specs = flax.traverse_util.flatten_dict(nn.get_partition_spec(params)["params"], sep="/")
  assert tuple(specs["conv_1/kernel"]) == (None, None, "conv_in", "conv_out")
  assert ("conv_1/bias" in specs) == (norm == "none")
  assert specs["conv_3/kernel"] is not None and tuple(specs["conv_4/bias"]) == ("conv_out",)
  if norm == "group":
    assert tuple(specs["norm_3/scale"]) == ("norm",)


def test_patch_discriminator_bad_norm():
  disc = losses.PatchDiscriminator(norm="batch")
  with pytest.raises(ValueError, match=r"unknown discriminator norm 'batch'"):
    jax.eval_shape(disc.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
