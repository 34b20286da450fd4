"""Paella v2 token predictor: blocks against float64 NumPy, init facts, masks, presets."""
import functools
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax.sharding import PartitionSpec as P

from ardiff_jax.configlib import DEFAULT_RULES
from ardiff_jax.models import paella_unet as pu
from ardiff_jax.parallel.mesh import make_mesh
from ardiff_jax.parallel.sharding import param_shardings

V = 64


def _np(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), flax.linen.meta.unbox(tree))


def _perturb(params, scale=0.05, seed=0):
  """Adds noise to every leaf, so zero-initialised weights (clf, FiLM, GRN) do something.
  On the host (numpy): a jitted threefry per leaf costs seconds of compile on CPU."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda l: (np.asarray(l) + scale * rng.normal(size=l.shape)).astype(np.float32), params)


def _init(module, *args):
  init = jax.jit(lambda key, *a: module.init(key, *a)["params"])
  return flax.linen.meta.unbox(init(jax.random.key(0), *args))


def _apply(module, params, *args, method=None, **kwargs):
  """module.apply under one jit: on CPU one compile is much cheaper than op-by-op dispatch."""
  return jax.jit(lambda p, a, kw: module.apply({"params": p}, *a, method=method, **kw))(
      params, args, kwargs)


def _ln(x, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)


@pytest.fixture(scope="module")
def tiny():
  model = pu.make_paella_unet("paella_tiny", num_labels=V, num_classes=10, clip_dim=16)
  return model, _init_all(model, x=jnp.zeros((2, 4, 4), jnp.int32))


def _init_all(model, seed=0, **kw):
  init = jax.jit(lambda key: model.init(key, method=pu.PaellaUNet.init_all, **kw)["params"])
  return flax.linen.meta.unbox(init(jax.random.key(seed)))


def _forward(model, deterministic=True):
  """jitted (params, x, r, c, c_mask, dropout rng) -> logits: one compile per shape, not per op."""
  return jax.jit(lambda p, x, r, c, m, rng: model.apply(
      {"params": p}, x, r, c, m, deterministic=deterministic, rngs={"dropout": rng}))


def _inputs(model, seed=0, grid=(8, 8)):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.integers(0, V, (2,) + grid), jnp.int32)
  r = jnp.asarray([0.3, 0.9], jnp.float32)
  labels = jnp.asarray([1, 10])
  clip_t = jnp.asarray(rng.normal(size=(2, 16)), jnp.float32)
  clip_i = jnp.asarray(rng.normal(size=(2, 16)), jnp.float32)
  return x, r, labels, clip_t, clip_i


def test_grn_matches_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 4, 5))
  gamma, beta = rng.normal(size=5), rng.normal(size=5)
  out = _apply(pu.GlobalResponseNorm(), {"gamma": jnp.asarray(gamma, jnp.float32),
                                         "beta": jnp.asarray(beta, jnp.float32)},
               jnp.asarray(x, jnp.float32))
  gx = np.sqrt((x ** 2).sum(axis=(1, 2), keepdims=True))
  nx = gx / (gx.mean(-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(np.asarray(out), gamma * (x * nx) + beta + x, rtol=1e-5, atol=1e-5)
  grad = jax.jit(jax.grad(lambda z: pu.GlobalResponseNorm().apply(
      {"params": {"gamma": jnp.ones(5), "beta": jnp.zeros(5)}}, z).sum()))(jnp.zeros((1, 2, 2, 5)))
  assert np.isfinite(np.asarray(grad)).all()              # a zero channel has a finite gradient


def test_film_matches_numpy_and_is_identity_at_init():
  rng = np.random.default_rng(1)
  block = pu.TimestepBlock(c=6)
  x = jnp.asarray(rng.normal(size=(2, 3, 3, 6)), jnp.float32)
  r_emb = jnp.asarray(rng.normal(size=(2, 8)), jnp.float32)
  params = _init(block, x, r_emb)
  np.testing.assert_array_equal(np.asarray(_apply(block, params, x, r_emb)), np.asarray(x))
  w, b = rng.normal(size=(8, 12)), rng.normal(size=12)
  out = _apply(block, {"mapper": {"kernel": jnp.asarray(w, jnp.float32),
                                  "bias": jnp.asarray(b, jnp.float32)}}, x, r_emb)
  ab = np.asarray(r_emb, np.float64) @ w + b
  a, bb = ab[:, None, None, :6], ab[:, None, None, 6:]
  np.testing.assert_allclose(np.asarray(out), np.asarray(x, np.float64) * (1 + a) + bb,
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("c_r", [64, 7])
def test_r_embedding_closed_form(c_r):
  r = np.array([0.0, 0.25, 1.0])
  half = c_r // 2
  freq = np.exp(-np.arange(half) * np.log(10000.0) / (half - 1))
  arg = (r * 10000)[:, None] * freq[None]
  want = np.concatenate([np.sin(arg), np.cos(arg), np.zeros((3, c_r % 2))], axis=1)
  got = np.asarray(pu.r_embedding(jnp.asarray(r, jnp.float32), c_r))
  assert got.shape == (3, c_r) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=2e-3)       # r·10^4 in float32: ~1e-3 absolute phase


def _attention_numpy(p, x, cond, nhead, self_attn=True):
  b, h, w, c = x.shape
  hd = c // nhead
  tokens = _ln(x).reshape(b, h * w, c)
  kv_c = cond / (1 + np.exp(-cond)) @ p["kv_mapper"]["kernel"] + p["kv_mapper"]["bias"]
  kv = np.concatenate([tokens, kv_c], 1) if self_attn else kv_c
  a = p["attention"]
  wi, bi = a["in_proj_kernel"], a["in_proj_bias"]
  q, k, v = (z @ wi[:, i * c:(i + 1) * c] + bi[i * c:(i + 1) * c]
             for i, z in enumerate((tokens, kv, kv)))
  split = lambda z: z.reshape(b, -1, nhead, hd).transpose(0, 2, 1, 3)
  logits = split(q) @ split(k).transpose(0, 1, 3, 2) / np.sqrt(hd)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  o = (probs @ split(v)).transpose(0, 2, 1, 3).reshape(b, h * w, c)
  o = o @ a["out_proj"]["kernel"] + a["out_proj"]["bias"]
  return x + o.reshape(b, h, w, c)


@pytest.mark.parametrize("self_attn", [True, False])
def test_attention_block_matches_numpy_and_mask_equals_removal(self_attn):
  rng = np.random.default_rng(2)
  block = pu.AttnBlock(c=8, nhead=2, self_attn=self_attn)
  x = rng.normal(size=(2, 2, 3, 8))
  cond = rng.normal(size=(2, 5, 12))
  params = _perturb(_init(block, jnp.asarray(x, jnp.float32), jnp.asarray(cond, jnp.float32)),
                    scale=0.3)
  apply = lambda xx, cd, m=None: np.asarray(_apply(
      block, params, jnp.asarray(xx, jnp.float32), jnp.asarray(cd, jnp.float32), m))
  p64 = _np(params)
  np.testing.assert_allclose(apply(x, cond), _attention_numpy(p64, x, cond, 2, self_attn),
                             rtol=1e-4, atol=1e-4)
  keep = np.array([[True, False, True, True, False], [True, True, True, True, True]])
  masked = apply(x, cond, jnp.asarray(keep))
  for i in range(2):                                         # row i with its dropped tokens removed
    ref = _attention_numpy(p64, x[i:i + 1], cond[i:i + 1, keep[i]], 2, self_attn)
    np.testing.assert_allclose(masked[i:i + 1], ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(masked[i:i + 1], apply(x[i:i + 1], cond[i:i + 1, keep[i]]),
                               rtol=1e-5, atol=1e-5)


def test_depthwise_skip_groups_are_contiguous_as_torch():
  rng = np.random.default_rng(3)
  block = pu.ResBlock(c=4, kernel_size=3)
  x, skip = rng.normal(size=(1, 3, 3, 4)), rng.normal(size=(1, 3, 3, 4))
  params = _init(block, jnp.asarray(x, jnp.float32), jnp.asarray(skip, jnp.float32))
  k = np.asarray(params["depthwise"]["kernel"], np.float64)
  assert k.shape == (3, 3, 2, 4)
  conv = pu._conv(4, 3, "depthwise", jnp.float32, padding=1, groups=4,
                  axes=(None, None, None, "conv_out"))
  got = _apply(conv, params["depthwise"], jnp.asarray(np.concatenate([x, skip], -1), jnp.float32))
  cat = np.pad(np.concatenate([x, skip], -1), ((0, 0), (1, 1), (1, 1), (0, 0)))
  want = np.zeros((1, 3, 3, 4))
  for o in range(4):                                         # torch groups: channels 2o, 2o+1
    for i in range(3):
      for j in range(3):
        want[0, i, j, o] = (cat[0, i:i + 3, j:j + 3, 2 * o:2 * o + 2] * k[:, :, :, o]).sum()
  want += np.asarray(params["depthwise"]["bias"])
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_conv_transpose_matches_numpy():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(1, 2, 3, 4))
  mod = pu.ConvTranspose2x2(features=5)
  params = _perturb(_init(mod, jnp.asarray(x, jnp.float32)))
  k, b = _np(params)["kernel"], _np(params)["bias"]
  want = np.zeros((1, 4, 6, 5))
  for y in range(2):
    for xx in range(3):
      for i in range(2):
        for j in range(2):
          want[0, 2 * y + i, 2 * xx + j] = x[0, y, xx] @ k[i, j] + b
  np.testing.assert_allclose(np.asarray(_apply(mod, params, jnp.asarray(x, jnp.float32))),
                             want, rtol=1e-5, atol=1e-5)


def test_tiny_model_at_init(tiny):
  model, params = tiny
  x, r, labels, clip_t, clip_i = _inputs(model)
  apply = lambda *a, **kw: _apply(model, params, *a, **kw)
  c = apply(labels, clip_text=clip_t, clip_image=clip_i, method=pu.PaellaUNet.embed_conditions)
  assert c.shape == (2, 1 + 4 + 4, 64)
  logits = _forward(model)(params, x, r, c, None, jax.random.key(0))
  assert logits.shape == (2, 8, 8, V) and logits.dtype == jnp.float32
  # clf is zero-initialised: clf output 0 -> PixelShuffle 0 -> LN(0) = 0 -> logits exactly 0.
  np.testing.assert_array_equal(np.asarray(logits), 0.0)
  np.testing.assert_array_equal(np.asarray(params["out_mapper_kernel"]),
                                np.asarray(params["in_mapper_embedding"]).T)
  np.testing.assert_allclose(np.asarray(params["in_mapper_embedding"]).std(), math.sqrt(1 / V),
                             rtol=0.1)
  # Last Linear of each C block: xavier std √(2/(fan_in+fan_out)) times √(1/Σ blocks); fc1 unscaled.
  for level in ("down_levels_1", "up_levels_1"):
    fc1, fc2 = (np.asarray(params[level]["res_0"][n]["kernel"]) for n in ("fc1", "fc2"))
    xavier = math.sqrt(2 / sum(fc2.shape))
    np.testing.assert_allclose(fc1.std(), xavier, rtol=0.05)
    np.testing.assert_allclose(fc2.std(), xavier * math.sqrt(1 / 2), rtol=0.05)
  for level in ("down_levels_0", "up_levels_1"):
    np.testing.assert_array_equal(np.asarray(params[level]["film_1"]["mapper"]["kernel"]), 0.0)
  # The skip enters only the first C block of the up levels above the lowest.
  assert params["up_levels_0"]["res_0"]["depthwise"]["kernel"].shape == (3, 3, 2, 32)
  assert params["up_levels_1"]["res_0"]["depthwise"]["kernel"].shape == (3, 3, 1, 64)
  assert params["down_levels_0"]["res_0"]["depthwise"]["kernel"].shape == (3, 3, 1, 32)


def test_tiny_model_perturbed_round_trip_mask_and_dropout(tiny):
  model, params = tiny
  params = _perturb(params)
  x, r, labels, clip_t, clip_i = _inputs(model, grid=(4, 8))
  apply = lambda *a, **kw: _apply(model, params, *a, **kw)
  full = apply(labels, clip_text=clip_t, clip_image=clip_i, method=pu.PaellaUNet.embed_conditions)
  no_image = apply(labels, clip_text=clip_t, method=pu.PaellaUNet.embed_conditions)
  fwd, key = _forward(model), jax.random.key(0)
  keep_all = lambda c: jnp.ones(c.shape[:2], bool)
  mask = jnp.asarray(np.arange(9) < 5)[None].repeat(2, 0)      # drop the 4 CLIP-image tokens
  a = np.asarray(fwd(params, x, r, full, mask, key))
  assert a.shape == (2, 4, 8, V) and np.isfinite(a).all() and np.abs(a).max() > 1e-3
  np.testing.assert_allclose(a, np.asarray(fwd(params, x, r, no_image, keep_all(no_image), key)),
                             rtol=1e-4, atol=1e-5)
  b = np.asarray(fwd(params, x, r, full, keep_all(full), key))
  assert np.abs(a - b).max() > 1e-5                            # the image tokens mattered
  # Dropout: deterministic is deterministic; stochastic draws differ with the rng.
  np.testing.assert_array_equal(b, np.asarray(fwd(params, x, r, full, keep_all(full),
                                                  jax.random.key(1))))
  train = _forward(model, deterministic=False)
  d0, d1 = (np.asarray(train(params, x, r, full, keep_all(full), jax.random.key(s)))
            for s in (0, 1))
  assert np.abs(d0 - d1).max() > 1e-4 and np.abs(d0 - b).max() > 1e-4


def test_embed_conditions_order_and_errors(tiny):
  model, params = tiny
  _, _, labels, clip_t, clip_i = _inputs(model)
  apply = lambda **kw: np.asarray(_apply(model, params, method=pu.PaellaUNet.embed_conditions,
                                         **kw))
  p = _np(params)
  cls = p["class_embedding"]["embedding"][np.asarray(labels)][:, None]
  clip = lambda z, n: (np.asarray(z, np.float64) @ p[n]["kernel"] + p[n]["bias"]).reshape(2, 4, 64)
  want = _ln(np.concatenate(
      [cls, clip(clip_t, "clip_mapper"), clip(clip_i, "clip_image_mapper")], axis=1))
  np.testing.assert_allclose(apply(labels=labels, clip_text=clip_t, clip_image=clip_i), want,
                             rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="text_dim=0"):
    apply(text=jnp.zeros((2, 3, 8)))
  with pytest.raises(ValueError, match="at least one condition source"):
    apply()
  with pytest.raises(ValueError, match="multiples of"):
    _apply(model, params, jnp.zeros((2, 6, 8), jnp.int32), jnp.zeros(2), jnp.zeros((2, 1, 64)))


def test_text_mapper_and_bf16_compute():
  model = pu.make_paella_unet("paella_tiny", num_labels=V, text_dim=24, dtype=jnp.bfloat16,
                              dropout=0.0)
  params = _perturb(_init_all(model, seed=1))
  assert params["byt5_mapper"]["kernel"].dtype == jnp.float32
  text = jnp.asarray(np.random.default_rng(5).normal(size=(2, 3, 24)), jnp.float32)
  c = _apply(model, params, text=text, method=pu.PaellaUNet.embed_conditions)
  assert c.shape == (2, 3, 64)
  x, r, *_ = _inputs(model)
  logits = _forward(model)(params, x, r, c, None, jax.random.key(0))
  assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()
  f32 = _forward(model.clone(dtype=jnp.float32))(params, x, r, c, None, jax.random.key(0))
  assert np.abs(np.asarray(logits - f32)).max() < 0.1 * np.abs(np.asarray(f32)).max()


def test_mask_token_row_and_init_all_with_sources():
  model = pu.make_paella_unet("paella_tiny", num_labels=V, num_classes=3, mask_token=True)
  x = jnp.full((1, 4, 4), V, jnp.int32)                        # every input is the [MASK] id
  params = flax.linen.meta.unbox(jax.jit(lambda k: model.init(
      k, x, jnp.ones((1,)), {"labels": jnp.asarray([2])}, method=pu.PaellaUNet.init_all))(
          jax.random.key(0))["params"])
  table = np.asarray(params["in_mapper_embedding"])
  assert table.shape == (V + 1, 32) and params["out_mapper_kernel"].shape == (32, V)
  np.testing.assert_array_equal(np.asarray(params["out_mapper_kernel"]), table[:V].T)


def _closed_form_count(V, c_in, c_out, c_r, p, c_cond, c_hidden, nhead, blocks, level_config,
                       text_dim, clip_dim, clip_seq_len=4, k=3):
  """Parameters of the official `Paella` from its shapes (biases included)."""
  res = lambda c, skip: (k * k * c * (2 if skip else 1) + c) + (4 * c * c + 4 * c) + 8 * c \
      + (4 * c * c + c)                                      # depthwise, fc1, GRN γβ, fc2
  film = lambda c: c_r * 2 * c + 2 * c
  attn = lambda c: (c_cond * c + c) + (3 * c * c + 3 * c) + (c * c + c)   # kv_mapper, in, out
  n = V * c_in + (c_in * p * p * c_hidden[0] + c_hidden[0])            # in_mapper, embedding
  levels = len(c_hidden)
  for i, c in enumerate(c_hidden):
    if i:
      n += (4 * c_hidden[i - 1] * c + c) + (4 * c * c_hidden[i - 1] + c_hidden[i - 1])
    for up in (False, True):
      for j in range(blocks[i]):
        for t, kind in enumerate(level_config[i]):
          skip = up and i < levels - 1 and j == 0 and t == 0
          n += {"C": lambda: res(c, skip), "T": lambda: film(c), "A": lambda: attn(c)}[kind]()
  n += (c_hidden[0] * c_out * p * p + c_out * p * p) + c_out * V      # clf, out_mapper
  n += text_dim * c_cond + c_cond                                       # byt5_mapper
  n += 2 * (clip_dim * c_cond * clip_seq_len + c_cond * clip_seq_len)   # clip (text, image)
  return n


def test_paella_1b_parameter_count():
  model = pu.make_paella_unet("paella_1b")
  shapes = jax.eval_shape(lambda k: model.init(k, method=pu.PaellaUNet.init_all),
                          jax.random.key(0))
  n = sum(int(np.prod(l.shape)) for l in jax.tree.leaves(shapes))
  print(f"paella_1b parameters: {n:,}")
  assert abs(n - 1.008e9) / 1.008e9 < 0.005
  assert n == _closed_form_count(8192, 256, 256, 64, 2, 1024, (640, 1280, 1280), (0, 16, 16),
                                 (6, 16, 6), ("CT", "CTA", "CTA"), 2560, 1024)
  # Every kernel carries logical names the rules table knows: the big ones shard on the mesh.
  mesh = make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
  shardings = param_shardings(shapes["params"], mesh, DEFAULT_RULES)
  get = lambda *path: functools.reduce(lambda d, k: d[k], path, shardings).spec
  assert get("in_mapper_embedding") == P("tensor", "fsdp")
  assert get("up_levels_1", "res_0", "fc1", "kernel") == P("fsdp", "tensor")
  assert get("down_levels_1", "attn_2", "attention", "in_proj_kernel") == P("fsdp", "tensor")
  assert get("down_levels_1", "downsample", "kernel") == P(None, None, None, "fsdp")


def test_bad_configs_raise():
  with pytest.raises(ValueError, match="unknown Paella preset"):
    pu.make_paella_unet("paella_huge")
  bad = pu.make_paella_unet("paella_tiny", num_labels=V, num_classes=2, nhead=(0, 3))
  with pytest.raises(ValueError, match="nhead"):
    bad.init(jax.random.key(0), method=pu.PaellaUNet.init_all)
  with pytest.raises(ValueError, match="c_in"):
    pu.make_paella_unet("paella_tiny", num_labels=V, num_classes=2, c_out=16).init(
        jax.random.key(0), method=pu.PaellaUNet.init_all)
