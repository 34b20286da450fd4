"""Paella's f = 4 VQGAN: pixel (un)shuffle, replication padding, the transposed conv and the gated
ResBlock against float64 NumPy written in torch's NCHW semantics; paella_f4's shapes and size;
the encoder's BatchNorm statistics in training and at encoding; a tiny run through main and cache."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from ardiff_jax import main
from ardiff_jax import feature_maps
from ardiff_jax.data import pipeline
from ardiff_jax.methods import vq_tokenizer
from ardiff_jax.tokenizers import paella_vq
from ardiff_jax.train import checkpoint
from tests.helpers import cache_test_split, load_config

nhwc = lambda x: x.transpose(0, 2, 3, 1)
nchw = lambda x: x.transpose(0, 3, 1, 2)


def _torch_pixel_unshuffle(x, r):
  """torch.nn.PixelUnshuffle on NCHW: out[:, c·r² + i·r + j, h, w] = x[:, c, h·r + i, w·r + j]."""
  b, c, hr, wr = x.shape
  out = np.zeros((b, c * r * r, hr // r, wr // r))
  for ch in range(c):
    for i in range(r):
      for j in range(r):
        out[:, ch * r * r + i * r + j] = x[:, ch, i::r, j::r]
  return out


def _torch_pixel_shuffle(x, r):
  """torch.nn.PixelShuffle on NCHW: out[:, c, h·r + i, w·r + j] = x[:, c·r² + i·r + j, h, w]."""
  b, crr, h, w = x.shape
  c = crr // (r * r)
  out = np.zeros((b, c, h * r, w * r))
  for ch in range(c):
    for i in range(r):
      for j in range(r):
        out[:, ch, i::r, j::r] = x[:, ch * r * r + i * r + j]
  return out


@pytest.mark.parametrize("r", [2, 3])
def test_pixel_shuffles_follow_torchs_channel_order_and_invert_each_other(r):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 2 * r, 3 * r, 5))                          # NHWC
  down = np.asarray(feature_maps.pixel_unshuffle(jnp.asarray(x), r))
  np.testing.assert_array_equal(down, nhwc(_torch_pixel_unshuffle(nchw(x), r)).astype(np.float32))
  y = rng.normal(size=(2, 3, 4, 5 * r * r))
  up = np.asarray(feature_maps.pixel_shuffle(jnp.asarray(y), r))
  np.testing.assert_array_equal(up, nhwc(_torch_pixel_shuffle(nchw(y), r)).astype(np.float32))
  back = feature_maps.pixel_shuffle(feature_maps.pixel_unshuffle(jnp.asarray(x, jnp.float32), r), r)
  np.testing.assert_array_equal(np.asarray(back), x.astype(np.float32))
  with pytest.raises(ValueError, match="not a multiple of"):
    feature_maps.pixel_unshuffle(jnp.zeros((1, r + 1, r, 1)), r)


def test_replication_pad_repeats_the_edges():
  x = np.random.default_rng(1).normal(size=(2, 4, 5, 3))
  idx = lambda n: np.clip(np.arange(-2, n + 2), 0, n - 1)            # ReplicationPad2d(2)
  want = x[:, idx(4)][:, :, idx(5)]
  got = paella_vq.replication_pad(jnp.asarray(x, jnp.float32), 2)
  np.testing.assert_array_equal(np.asarray(got), want.astype(np.float32))


def test_upsample_conv_is_torchs_transposed_conv():
  """torch ConvTranspose2d(k 4, s 2, p 1) scatters x[i, j]·w[ki, kj] to (2i − 1 + ki, 2j − 1 + kj),
  cropped to [0, 2H) × [0, 2W); flax's kernel is torch's flipped spatially."""
  rng = np.random.default_rng(2)
  x, w, b = rng.normal(size=(2, 3, 5, 4)), rng.normal(size=(4, 6, 4, 4)), rng.normal(size=6)
  full = np.zeros((2, 6, 2 * 3 + 2, 2 * 5 + 2))                    # NCHW, offset by 1
  xc = nchw(x)
  for i in range(3):
    for j in range(5):
      full[:, :, 2 * i:2 * i + 4, 2 * j:2 * j + 4] += np.einsum("bc,cokl->bokl", xc[:, :, i, j], w)
  want = nhwc(full[:, :, 1:-1, 1:-1] + b[:, None, None])
  module = paella_vq.upsample_conv(6, jnp.float32, "up")
  params = {"kernel": jnp.asarray(w[:, :, ::-1, ::-1].transpose(2, 3, 0, 1), jnp.float32),
            "bias": jnp.asarray(b, jnp.float32)}
  got = module.apply({"params": params}, jnp.asarray(x, jnp.float32))
  assert got.shape == (2, 6, 10, 6)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def _np_layer_norm(x):
  return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)


def _np_res_block(x, p):
  """Paella's ResBlock in float64 (NHWC), from its PyTorch forward."""
  g = p["gammas"]
  b, h, w, c = x.shape
  xt = _np_layer_norm(x) * (1 + g[0]) + g[1]
  xp = xt[:, np.clip(np.arange(-1, h + 1), 0, h - 1)][:, :, np.clip(np.arange(-1, w + 1), 0, w - 1)]
  k = p["depthwise_1"]["kernel"][:, :, 0, :]                          # [3, 3, c]
  dw = p["depthwise_1"]["bias"] + sum(xp[:, di:di + h, dj:dj + w] * k[di, dj]
                                      for di in range(3) for dj in range(3))
  x = x + dw * g[2]
  xt = _np_layer_norm(x) * (1 + g[3]) + g[4]
  hid = xt @ p["channelwise_0"]["kernel"] + p["channelwise_0"]["bias"]
  hid = 0.5 * hid * (1 + erf(hid / np.sqrt(2)))                        # exact GELU
  return x + (hid @ p["channelwise_2"]["kernel"] + p["channelwise_2"]["bias"]) * g[5]


def test_res_block_matches_float64_and_is_the_identity_at_init():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 5, 6, 8))
  block = paella_vq.ResBlock()
  params = nn.meta.unbox(block.init(jax.random.key(0), jnp.asarray(x, jnp.float32))["params"])
  assert params["gammas"].shape == (6,) and params["depthwise_1"]["kernel"].shape == (3, 3, 1, 8)
  assert params["channelwise_0"]["kernel"].shape == (8, 32)
  np.testing.assert_array_equal(                                        # zero gammas: identity
      np.asarray(block.apply({"params": params}, jnp.asarray(x, jnp.float32))), x.astype(np.float32))
  params = jax.tree.map(lambda a: rng.normal(size=a.shape) * 0.5, params)   # non-zero everything
  got = block.apply({"params": jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)},
                    jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(np.asarray(got), _np_res_block(x, params), rtol=1e-4, atol=1e-4)


def _paella_param_count(levels=2, blocks=12, d=384, c=4, k=8192):
  """Closed form: ResBlock(w) = depthwise 9w + w, MLP 8w² + 5w, gammas 6 = 8w² + 15w + 6;
  widths w0 = d/2, w1 = d. Encoder 12·w0 + w0 + RB(w0) + 16·w0·w1 + w1 + RB(w1) + w1·c (no bias)
  + 2c (BatchNorm affine); codebook k·c; decoder c·w1 + w1 + 12·RB(w1) + 16·w1·w0 + w0 + RB(w0)
  + 12·w0 + 12. For paella_f4: 2,667,284 + 32,768 + 15,706,842 = 18,406,894."""
  assert levels == 2
  rb = lambda w: 8 * w * w + 15 * w + 6
  w0, w1 = d // 2, d
  encoder = 13 * w0 + rb(w0) + 16 * w0 * w1 + w1 + rb(w1) + w1 * c + 2 * c
  decoder = c * w1 + w1 + blocks * rb(w1) + 16 * w1 * w0 + w0 + rb(w0) + 12 * w0 + 12
  return encoder + k * c + decoder


def test_paella_f4_has_the_official_shapes_and_size():
  model = paella_vq.make_paella_vq("paella_f4")
  assert model.stride == 4 and model.codebook_size == 8192
  x = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
  variables = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), x))
  params = variables["params"]
  n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  print(f"paella_f4: {n:,} parameters (closed form {_paella_param_count():,})")
  assert n == _paella_param_count() == 18_406_894
  assert params["codebook"].shape == (8192, 4)
  assert len([k for k in params["decoder"] if k.startswith("up_blocks")]) == 1 + 12 + 1 + 1
  assert jax.tree.map(lambda a: a.shape, variables["batch_stats"]) == {
      "encoder": {"down_blocks_3_1": {"mean": (4,), "var": (4,)}}}
  f = jax.eval_shape(lambda v, x: model.apply(v, x, method=model.encode), variables, x)
  assert f.shape == (1, 64, 64, 4) and f.dtype == jnp.float32
  ids = jax.eval_shape(lambda v, x: model.apply(v, x, method=model.encode_codes), variables, x)
  assert ids.shape == (1, 64, 64) and ids.dtype == jnp.int32
  out = jax.eval_shape(lambda p, i: model.apply({"params": p}, i, method=model.decode_codes),
                       params, ids)                                    # params alone decode
  assert out.shape == (1, 256, 256, 3)


def test_batch_norm_statistics_update_in_training_and_serve_encoding():
  """torch BatchNorm2d: batch statistics in training, running = 0.9·running + 0.1·batch (flax
  averages the biased variance), the running statistics when encoding."""
  encoder = paella_vq.Encoder(levels=2, c_hidden=8, c_latent=4)
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
  variables = nn.meta.unbox(encoder.init(jax.random.key(0), x))
  scale, bias = jnp.asarray([0.5, 2.0, 1.0, -1.0]), jnp.asarray([0.1, 0.0, -0.3, 1.0])
  variables["params"]["down_blocks_3_1"] = {"scale": scale, "bias": bias}

  f, state = encoder.apply(variables, x, train=True, capture_intermediates=True,
                           mutable=["batch_stats", "intermediates"])
  pre = np.asarray(state["intermediates"]["down_blocks_3_0"]["__call__"][0], np.float64)
  mean, var = pre.mean((0, 1, 2)), pre.var((0, 1, 2))
  stats = state["batch_stats"]["down_blocks_3_1"]
  np.testing.assert_allclose(np.asarray(stats["mean"]), 0.1 * mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(stats["var"]), 0.9 + 0.1 * var, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(f), (pre - mean) / np.sqrt(var + 1e-5) * scale + bias,
                             rtol=1e-4, atol=1e-4)

  f = encoder.apply({"params": variables["params"], "batch_stats": state["batch_stats"]}, x)
  want = (pre - stats["mean"]) / np.sqrt(np.asarray(stats["var"]) + 1e-5) * scale + bias
  np.testing.assert_allclose(np.asarray(f), want, rtol=1e-4, atol=1e-4)   # train=False: running


def test_the_method_keeps_batch_norm_statistics_in_extras_for_sampling():
  config = load_config("paella_vq_digits", "tiny")
  method = vq_tokenizer.make_method(config)
  key = vq_tokenizer.BATCH_STATS_KEY
  extras = jax.eval_shape(method.init_extras, jax.random.key(0))
  assert jax.tree.map(lambda a: a.shape, extras[key]) == {
      "encoder": {"down_blocks_3_1": {"mean": (4,), "var": (4,)}}}
  params = jax.eval_shape(method.init_params, jax.random.key(0))
  assert sorted(method.sampling_params(params, extras)) == sorted([key, "vq"])
  with pytest.raises(ValueError, match="sampling_params"):
    method.encode(params, jnp.zeros((1, 16, 16, 3)))
  bad = config.tokenizer.copy_and_resolve_references()
  bad.preset = "paella_huge"
  with pytest.raises(ValueError, match="paella_f4"):               # the error lists both families
    vq_tokenizer.build_vq(bad)


@pytest.mark.slow   # make test trains and caches this run for tests/methods/test_paella.py
def test_tiny_paella_vq_run_trains_and_caches_codes_with_running_statistics(tmp_path):
  config = load_config("paella_vq_digits", "tiny")
  config.train.num_steps = 2                                           # one checkpoint, at step 2
  workdir = str(tmp_path / "run")
  state = main.run(config, workdir, "train")
  key = vq_tokenizer.BATCH_STATS_KEY
  stats = state.extras[key]["encoder"]["down_blocks_3_1"]              # moved by loss_fn
  assert float(jnp.abs(stats["mean"]).max()) > 0 and np.isfinite(np.asarray(stats["var"])).all()

  _, batch = cache_test_split(config, workdir, str(tmp_path / "cache"))
  codes = np.asarray(batch["codes"])
  assert codes.dtype.kind in "iu" and codes.shape[0] == 8 and codes.shape[-2:] == (4, 4)
  assert codes.min() >= 0 and codes.max() < 64

  # The cache holds Method.encode of the checkpoint's weights and running statistics.
  exp, params, _ = checkpoint.restore_sampling_params(config, workdir)
  np.testing.assert_array_equal(np.asarray(params[key]["encoder"]["down_blocks_3_1"]["mean"]),
                                np.asarray(stats["mean"]))
  data = config.data.copy_and_resolve_references()
  data.random_flip = False
  images = next(iter(pipeline.make_dataset(data, split="test", seed=0, batch_size=8, train=False)))
  want = jax.jit(exp.method.encode)(params, jnp.asarray(images["image"]))
  np.testing.assert_array_equal(codes.reshape(8, -1, 4, 4)[:, 0], np.asarray(want))


def test_codebook_init_uniform_as_pytorch_tools_or_normal_as_the_latent():
  def book(init):   # only the codebook is created: init through embed_codes
    model = paella_vq.make_paella_vq("paella_tiny", codebook_size=2048, codebook_init=init)
    ids = jnp.zeros((1, 1, 1), jnp.int32)
    return np.asarray(nn.meta.unbox(model.init(jax.random.key(0), ids, method=model.embed_codes)
                                    )["params"]["codebook"])

  assert np.abs(book("uniform")).max() <= 1 / 2048                  # pytorch-tools: uniform(±1/K)
  assert 0.95 < book("normal").std() < 1.05                          # N(0, 1), as the BN'd latent
  with pytest.raises(ValueError, match="codebook_init"):
    book("kmeans")
