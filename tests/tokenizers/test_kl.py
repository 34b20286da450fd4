"""Tests for ardiff_jax.tokenizers.kl: posterior math vs float64, shapes, the KL-16 layout."""
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate

from ardiff_jax.tokenizers import kl


def _gauss_logpdf(x, mean, var):
  return -0.5 * (np.log(2 * np.pi * var) + (x - mean) ** 2 / var)


def _kl_by_quadrature(mean, logvar):
  """KL(N(mean, e^logvar) || N(0, 1)) as the integral of p log(p / q), float64, no closed form."""
  var = np.exp(logvar)
  std = np.sqrt(var)

  def integrand(x):
    logp = _gauss_logpdf(x, mean, var)
    return np.exp(logp) * (logp - _gauss_logpdf(x, 0.0, 1.0))

  # p is negligible beyond 15 std; finite limits keep quad on the peak when std is tiny or huge.
  value, _ = integrate.quad(integrand, mean - 15 * std, mean + 15 * std, points=[mean],
                            limit=200, epsabs=0.0, epsrel=1e-10)
  return value


def _kl_reference(moments):
  """Per-sample KL [B] by quadrature, with LDM's logvar clamp applied first."""
  e = moments.shape[-1] // 2
  means, logvars = moments[..., :e], np.clip(moments[..., e:], -30.0, 20.0)
  out = np.zeros(moments.shape[0])
  for b in range(moments.shape[0]):
    for m, lv in zip(means[b].ravel(), logvars[b].ravel()):
      out[b] += _kl_by_quadrature(m, lv)
  return out


def test_kl_to_standard_normal_matches_quadrature():
  rng = np.random.default_rng(0)
  b, h, w, e = 2, 1, 2, 2
  means = rng.normal(size=(b, h, w, e)) * 1.5
  logvars = rng.uniform(-2.0, 1.5, size=(b, h, w, e))
  moments = np.concatenate([means, logvars], axis=-1)
  got = np.asarray(kl.kl_to_standard_normal(jnp.asarray(moments, jnp.float32)))
  np.testing.assert_allclose(got, _kl_reference(moments), rtol=1e-5, atol=1e-5)


def test_logvar_clamp_is_honoured():
  # logvar -50 and 40 must act as -30 and 20 in every posterior function.
  moments = np.array([[[[0.3, -0.7, -50.0, 40.0]]]])
  mean, logvar = kl.split_moments(jnp.asarray(moments, jnp.float32))
  np.testing.assert_array_equal(np.asarray(logvar), [[[[-30.0, 20.0]]]])
  np.testing.assert_allclose(np.asarray(mean), [[[[0.3, -0.7]]]], rtol=1e-7)
  got = np.asarray(kl.kl_to_standard_normal(jnp.asarray(moments, jnp.float32)))
  np.testing.assert_allclose(got, _kl_reference(moments), rtol=1e-5)
  z = kl.posterior_sample(jnp.asarray(moments, jnp.float32), jax.random.key(0))
  # std = e^-15 for the first channel: the sample sits on the mean.
  assert abs(float(z[0, 0, 0, 0]) - 0.3) < 1e-5


def test_posterior_sample_statistics_and_mode():
  mean, logvar = 0.7, np.log(0.25)
  moments = jnp.concatenate([jnp.full((4, 32, 32, 1), mean), jnp.full((4, 32, 32, 1), logvar)], -1)
  z = np.asarray(kl.posterior_sample(moments, jax.random.key(1)), np.float64)
  assert z.shape == (4, 32, 32, 1)
  assert abs(z.mean() - mean) < 0.02 and abs(z.std() - 0.5) < 0.02
  np.testing.assert_allclose(np.asarray(kl.posterior_mode(moments)), mean, rtol=1e-6)


def test_attn_block_matches_numpy():
  x = jax.random.normal(jax.random.key(0), (2, 3, 2, 8))
  block = kl.AttnBlock(norm_groups=4)
  params = block.init(jax.random.key(1), x)
  got = np.asarray(block.apply(params, x))
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), nn.meta.unbox(params)["params"])
  xs = np.asarray(x, np.float64)
  g = xs.reshape(2, 6, 4, 2)  # groups of 2 channels over all positions
  g = (g - g.mean(axis=(1, 3), keepdims=True)) / np.sqrt(g.var(axis=(1, 3), keepdims=True) + 1e-6)
  hn = g.reshape(2, 6, 8) * p["norm"]["scale"] + p["norm"]["bias"]
  lin = lambda name, a: a @ p[name]["kernel"][0, 0] + p[name]["bias"]
  q, k, v = lin("q", hn), lin("k", hn), lin("v", hn)
  logits = q @ k.transpose(0, 2, 1) / np.sqrt(8)
  att = np.exp(logits - logits.max(-1, keepdims=True))
  att /= att.sum(-1, keepdims=True)
  want = xs + lin("proj_out", att @ v).reshape(2, 3, 2, 8)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_downsample_pads_bottom_right_like_ldm():
  x = jax.random.normal(jax.random.key(0), (1, 4, 4, 2))
  mod = kl.Downsample()
  params = mod.init(jax.random.key(1), x)
  got = np.asarray(mod.apply(params, x))
  p = nn.meta.unbox(params)["params"]["conv"]
  kern, bias = np.asarray(p["kernel"], np.float64), np.asarray(p["bias"], np.float64)
  xp = np.pad(np.asarray(x, np.float64), ((0, 0), (0, 1), (0, 1), (0, 0)))
  want = np.zeros((1, 2, 2, 2))
  for i in range(2):
    for j in range(2):
      patch = xp[0, 2 * i:2 * i + 3, 2 * j:2 * j + 3, :]
      want[0, i, j] = np.einsum("abc,abcd->d", patch, kern) + bias
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _random_params(abstract, seed=0):
  """Concrete params for an abstract (eval_shape) tree, drawn in NumPy.

  A real `jax.jit(model.init)` of kl_tiny costs ~6 s of compilation on 2 CPU cores; the init path
  itself is covered by the eval_shape tests below. Kernels ~ N(0, 1/fan_in), norms at identity.
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if "kernel" in name:
      fan_in = int(np.prod(leaf.shape[:-1]))
      return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(fan_in), leaf.dtype)
    if "scale" in name:
      return jnp.ones(leaf.shape, leaf.dtype)
    return jnp.asarray(rng.normal(size=leaf.shape) * 0.01, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, abstract)


@pytest.fixture(scope="module")
def tiny():
  """kl_tiny with random params, a [2,32,32,3] batch, and jitted encode/decode shared by tests."""
  model = kl.make_autoencoder("kl_tiny")
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1.0, maxval=1.0)
  abstract = jax.eval_shape(model.init, jax.random.key(1), x, jax.random.key(2))
  encode = jax.jit(lambda p, x: model.apply(p, x, method=model.encode))
  decode = jax.jit(lambda p, z: model.apply(p, z, method=model.decode))
  return model, _random_params(abstract), x, encode, decode


def test_kl_tiny_shapes(tiny):
  _, params, x, encode, decode = tiny
  moments = encode(params, x)
  assert moments.shape == (2, 8, 8, 8) and moments.dtype == jnp.float32
  rec = decode(params, moments[..., :4])
  assert rec.shape == (2, 32, 32, 3) and rec.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(rec)))


def test_kl_init_creates_every_param():
  # Abstract init of kl_tiny: every conv has kernel and bias, every norm scale and bias.
  model = kl.make_autoencoder("kl_tiny")
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                            jax.random.key(1))
  names = flax.traverse_util.flatten_dict(nn.meta.unbox(abstract)["params"], sep="/")
  assert {"quant_conv/kernel", "post_quant_conv/kernel", "encoder/conv_out/kernel",
          "decoder/conv_out/kernel", "encoder/down_2/attn_0/proj_out/kernel",
          "decoder/up_1/upsample/conv/kernel", "encoder/down_0/downsample/conv/bias"} <= set(names)
  assert names["quant_conv/kernel"].shape == (1, 1, 8, 8)
  assert names["post_quant_conv/kernel"].shape == (1, 1, 4, 4)
  assert all(a.dtype == jnp.float32 for a in names.values())


def test_kl_tiny_bfloat16_call_keeps_fp32_params_and_outputs(tiny):
  _, params, x, _, _ = tiny
  model = kl.make_autoencoder("kl_tiny", dtype=jnp.bfloat16)
  rec, moments = jax.jit(model.apply)(params, x, jax.random.key(3))
  assert rec.shape == x.shape and moments.shape == (2, 8, 8, 8)
  assert rec.dtype == jnp.float32 and moments.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(rec)))
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(params))


def test_tokenizer_round_trip_and_scale(tiny):
  model, params, x, encode, decode = tiny
  tok = kl.KLTokenizer(model, scale=0.5)
  assert tok.kind == "continuous" and tok.stride == 4 and tok.token_channels == 4

  @jax.jit
  def round_trip(params, x, rng):
    tokens = tok.encode(params, x)
    return tokens, tok.encode(params, x, rng), tok.decode(params, tokens)

  tokens, sampled, images = round_trip(params, x, jax.random.key(4))
  assert tokens.shape == sampled.shape == (2, 8, 8, 4) and images.shape == (2, 32, 32, 3)
  assert not np.allclose(sampled, tokens)
  # Mode tokens are mean * scale; decode divides the scale back out.
  mean = kl.posterior_mode(encode(params, x))
  np.testing.assert_allclose(np.asarray(tokens), 0.5 * np.asarray(mean), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(images), np.asarray(decode(params, mean)),
                             rtol=1e-4, atol=1e-5)


def test_tokenizer_from_preset_uses_latent_scale():
  assert kl.KLTokenizer.from_preset("kl16").scale == pytest.approx(0.2325)
  assert kl.KLTokenizer.from_preset("kl_tiny").scale == 1.0


def test_bad_preset_and_mismatched_levels_raise():
  msg = r"unknown AutoencoderKL preset 'kl99'.*kl16.*kl_small.*kl_tiny"
  with pytest.raises(ValueError, match=msg):
    kl.make_autoencoder("kl99")
  model = kl.make_autoencoder("kl_tiny", dec_ch_mult=(1, 2))
  with pytest.raises(ValueError, match="same length"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jax.random.key(1))


def test_logical_axis_names_on_params(tiny):
  _, params, *_ = tiny
  specs = flax.traverse_util.flatten_dict(nn.get_partition_spec(params)["params"], sep="/")
  assert tuple(specs["encoder/conv_in/kernel"]) == (None, None, "conv_in", "conv_out")
  assert tuple(specs["encoder/conv_in/bias"]) == ("conv_out",)
  assert tuple(specs["decoder/mid/attn_1/norm/scale"]) == ("norm",)
  assert tuple(specs["decoder/norm_out/bias"]) == ("norm",)


# ---- KL-16: abstract evaluation only (no forward pass on CPU).

def _kl16_param_count() -> int:
  """Closed-form count of MAR's KL-16 from its layer shapes (reference/mar.md §4)."""
  conv = lambda cin, cout, k: k * k * cin * cout + cout
  norm = lambda c: 2 * c
  res = lambda cin, cout: (norm(cin) + conv(cin, cout, 3) + norm(cout) + conv(cout, cout, 3)
                           + (conv(cin, cout, 1) if cin != cout else 0))
  attn = lambda c: norm(c) + 4 * conv(c, c, 1)
  chans = [128, 128, 256, 256, 512]
  mid = 2 * res(512, 512) + attn(512)
  # Encoder: 2 blocks per level, attention after each block at 16x16 (level 4), 4 downsamples.
  enc, cin = conv(3, 128, 3), 128
  for level, c in enumerate(chans):
    enc += res(cin, c) + res(c, c) + (2 * attn(c) if level == 4 else 0)
    enc += conv(c, c, 3) if level < 4 else 0
    cin = c
  enc += mid + norm(512) + conv(512, 32, 3)
  # Decoder: 3 blocks per level from 512 down, no attention outside mid, 4 upsamples.
  dec, cin = conv(16, 512, 3) + mid, 512
  for level in reversed(range(5)):
    c = chans[level]
    dec += res(cin, c) + 2 * res(c, c) + (conv(c, c, 3) if level > 0 else 0)
    cin = c
  dec += norm(128) + conv(128, 3, 3)
  return enc + dec + conv(32, 32, 1) + conv(16, 16, 1)


@pytest.fixture(scope="module")
def kl16_abstract():
  model = kl.make_autoencoder("kl16")
  x = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), x, jax.random.key(1))
  return model, params


def test_kl16_shapes(kl16_abstract):
  model, params = kl16_abstract
  x = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
  moments = jax.eval_shape(lambda p, x: model.apply(p, x, method=model.encode), params, x)
  assert moments.shape == (2, 16, 16, 32)
  tok = kl.KLTokenizer.from_preset("kl16")
  assert tok.stride == 16 and tok.token_channels == 16
  tokens = jax.eval_shape(tok.encode, params, x)
  assert tokens.shape == (2, 16, 16, 16)
  images = jax.eval_shape(tok.decode, params, tokens)
  assert images.shape == (2, 256, 256, 3)


def test_kl16_param_count(kl16_abstract):
  _, params = kl16_abstract
  count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
  print(f"KL-16 parameters: {count:,}")
  assert count == _kl16_param_count()


def test_kl16_attention_layout(kl16_abstract):
  _, params = kl16_abstract
  names = flax.traverse_util.flatten_dict(nn.meta.unbox(params)["params"], sep="/").keys()
  attn_modules = {n.rsplit("/", 2)[0] for n in names if "/attn_" in n}
  enc = sorted(n for n in attn_modules if n.startswith("encoder/"))
  dec = sorted(n for n in attn_modules if n.startswith("decoder/"))
  assert enc == ["encoder/down_4/attn_0", "encoder/down_4/attn_1", "encoder/mid/attn_1"]
  assert dec == ["decoder/mid/attn_1"]
  # 2 blocks per encoder level, 3 per decoder level.
  blocks = {n.rsplit("/", 2)[0] for n in names if "/block_" in n and "/mid/" not in n}
  assert sum(n.startswith("encoder/down_0/") for n in blocks) == 2
  assert all(sum(n.startswith(f"decoder/up_{i}/") for n in blocks) == 3 for i in range(5))


def test_cache_encodes_in_float32_under_a_bfloat16_run():
  """`--mode cache` stores moments from the encoder in `tokenizer.cache_dtype` (float32 by default,
  as MAR's main_cache.py), not the run's bf16 compute dtype: equal to a float32 encoder's bitwise,
  unlike the bf16 encoder's."""
  from ardiff_jax.methods import kl_tokenizer  # pylint: disable=g-import-not-at-top
  from tests.helpers import load_config  # pylint: disable=g-import-not-at-top
  config = load_config("kl_digits", "tiny")
  config.train.compute_dtype = "bfloat16"
  method = kl_tokenizer.make_method(config)
  params = nn.meta.unbox(method.init_params(jax.random.key(0)))
  images = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)
  got = np.asarray(method.encode(params, images))
  encode_in = lambda dtype: np.asarray(
      (ae := kl_tokenizer.build_autoencoder(config.tokenizer, dtype)).apply(
          {"params": params["ae"]}, images, method=ae.encode), np.float32)
  np.testing.assert_array_equal(got, encode_in("float32"))
  assert np.abs(got - encode_in("bfloat16")).max() > 1e-4
