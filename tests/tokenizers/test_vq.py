"""The VQ tokenizer: the quantizer against float64 NumPy, its straight-through and loss gradients
against their closed forms, the codebook-usage FIFO, VQ-16's size, and a tiny training run."""
import collections

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ardiff_jax import main
from ardiff_jax.tokenizers import vq
from ardiff_jax.train.metrics import read_metrics
from tests.helpers import load_config


def _np_normalize(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@pytest.mark.parametrize("l2_norm", [True, False])
def test_nearest_codes_match_a_float64_search(l2_norm):
  rng = np.random.default_rng(0)
  f = rng.normal(size=(3, 4, 5, 8))
  book = rng.normal(size=(64, 8))
  ids, f_searched, z_q, affinity = vq.nearest_codes(jnp.asarray(f, jnp.float32),
                                                    jnp.asarray(book, jnp.float32), l2_norm)
  f64 = _np_normalize(f) if l2_norm else f
  table = _np_normalize(book) if l2_norm else book
  dist = ((f64[..., None, :] - table) ** 2).sum(-1)                   # [3, 4, 5, 64]
  np.testing.assert_array_equal(np.asarray(ids), dist.argmin(-1))
  np.testing.assert_allclose(np.asarray(z_q), table[dist.argmin(-1)], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(f_searched), f64, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(affinity), -dist, rtol=1e-4, atol=1e-4)


def test_straight_through_and_codebook_loss_gradients_follow_their_closed_forms():
  """L = mean(z_q − sg(f̂))² + β·mean(sg(z_q) − f̂)² + Σ w·ST(f̂, z_q), with f̂ = f/‖f‖ and
  z_q = W_k/‖W_k‖: ∂L/∂f = J(f)ᵀ[(−2β(z_q − f̂) + N·w)/N] and ∂L/∂W_k = Σ_{i: k_i = k} J(W_k)ᵀ
  2(z_q,i − f̂_i)/N, with J(x) = (I − x̂x̂ᵀ)/‖x‖ and N the number of elements, in float64."""
  rng = np.random.default_rng(1)
  f, book, w = rng.normal(size=(6, 4)), rng.normal(size=(5, 4)), rng.normal(size=(6, 4))
  beta, n = 0.25, f.size

  def loss(f_, book_):
    ids, fn, z_q, _ = vq.nearest_codes(f_, book_, True)
    codebook, commit = vq.codebook_losses(fn, z_q, beta)
    return codebook + commit + jnp.sum(jnp.asarray(w, jnp.float32) * vq.straight_through(fn, z_q))

  g_f, g_book = jax.grad(loss, argnums=(0, 1))(jnp.asarray(f, jnp.float32),
                                              jnp.asarray(book, jnp.float32))
  jac = lambda x: (np.eye(x.size) - np.outer(_np_normalize(x), _np_normalize(x))) / np.linalg.norm(x)
  fn, table = _np_normalize(f), _np_normalize(book)
  ids = ((fn[:, None] - table) ** 2).sum(-1).argmin(-1)
  z_q = table[ids]
  want_f = np.stack([jac(f[i]).T @ (-2 * beta * (z_q[i] - fn[i]) / n + w[i]) for i in range(6)])
  want_book = np.zeros_like(book)
  for i, k in enumerate(ids):
    want_book[k] += jac(book[k]).T @ (2 * (z_q[i] - fn[i]) / n)
  np.testing.assert_allclose(np.asarray(g_f), want_f, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(g_book), want_book, rtol=1e-4, atol=1e-6)


def test_entropy_loss_matches_float64():
  rng = np.random.default_rng(2)
  affinity = rng.normal(size=(2, 3, 7))
  t = 0.5
  logits = affinity.reshape(-1, 7) / t
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  shifted = logits + 1e-5
  logp = shifted - shifted.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  avg = p.mean(0)
  want = -np.mean((p * logp).sum(-1)) + np.sum(avg * np.log(avg + 1e-5))
  got = float(vq.entropy_loss(jnp.asarray(affinity, jnp.float32), t))
  assert got == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_usage_fifo_counts_distinct_codes_of_the_last_window():
  window, k = 10, 8
  buf = vq.init_usage(window)
  fifo = collections.deque(maxlen=window)
  assert float(vq.codebook_usage(buf, k)) == 0.0        # empty: nothing used yet
  rng = np.random.default_rng(3)
  for n in (3, 4, 6, 12):
    ids = rng.integers(0, k, size=n)
    buf = vq.push_usage(buf, jnp.asarray(ids))
    fifo.extend(ids.tolist())
    np.testing.assert_array_equal(np.asarray(buf)[-len(fifo):], list(fifo))
    assert float(vq.codebook_usage(buf, k)) == pytest.approx(len(set(fifo)) / k)


def _official_vq_param_count(ch=128, ch_mult=(1, 1, 2, 2, 4), enc_blocks=2, dec_blocks=3,
                             z=256, embed=8, k=16384):
  """The number of parameters of LlamaGen's `VQModel` (vq_model.py), counted module by module
  (convs with bias, GroupNorm affine, attention only at the lowest level and in the mids)."""
  conv = lambda i, o, s: i * o * s * s + o
  norm = lambda c: 2 * c
  res = lambda i, o: norm(i) + conv(i, o, 3) + norm(o) + conv(o, o, 3) + (conv(i, o, 1) if i != o else 0)
  attn = lambda c: norm(c) + 4 * conv(c, c, 1)
  levels = len(ch_mult)
  total = conv(3, ch, 3)                                        # encoder
  block_in = ch
  for i, m in enumerate(ch_mult):
    for _ in range(enc_blocks):
      total += res(block_in, ch * m) + (attn(ch * m) if i == levels - 1 else 0)
      block_in = ch * m
    total += conv(block_in, block_in, 3) if i < levels - 1 else 0
  total += 2 * res(block_in, block_in) + attn(block_in) + norm(block_in) + conv(block_in, z, 3)
  block_in = ch * ch_mult[-1]                                   # decoder
  total += conv(z, block_in, 3) + 2 * res(block_in, block_in) + attn(block_in)
  for i in reversed(range(levels)):
    for _ in range(dec_blocks):
      total += res(block_in, ch * ch_mult[i]) + (attn(ch * ch_mult[i]) if i == levels - 1 else 0)
      block_in = ch * ch_mult[i]
    total += conv(block_in, block_in, 3) if i > 0 else 0
  total += norm(block_in) + conv(block_in, 3, 3)
  return total + conv(z, embed, 1) + conv(embed, z, 1) + k * embed


def test_vq16_has_llamagens_size_and_shapes():
  model = vq.make_vq("vq16")
  x = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
  params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), x)["params"])
  n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  assert n == _official_vq_param_count() == 71_883_403        # LlamaGen: "about 72M"
  assert params["codebook"].shape == (16384, 8)
  ids = jax.eval_shape(lambda p, x: model.apply({"params": p}, x, method=model.encode_codes),
                       params, x)
  assert ids.shape == (1, 16, 16) and ids.dtype == jnp.int32
  out = jax.eval_shape(lambda p, i: model.apply({"params": p}, i, method=model.decode_codes),
                       params, ids)
  assert out.shape == (1, 256, 256, 3)


def test_tiny_vq_run_trains_samples_and_tracks_usage(tmp_path):
  config = load_config("vq_digits", "tiny")
  state = main.run(config, str(tmp_path), "train")
  usage = np.asarray(state.extras["code_usage"])     # 4 steps × 16 images × 8×8 codes > 256
  assert usage.shape == (256,) and (usage >= 0).all() and usage.max() < 64
  rows = read_metrics(str(tmp_path))
  assert 0 < rows[-1]["codebook_usage"] <= 1 and np.isfinite(rows[-1]["commit_loss"])
  summary = main.run(config, str(tmp_path), "sample")
  assert np.isfinite(summary["psnr"]) and summary["num_images"] == 32
