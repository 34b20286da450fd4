"""LlamaGen-style GPT: 2D RoPE layout, KV-cache decoding = full causal forward, AR sampler."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ardiff_jax.diffusion.gaussian import create_diffusion
from ardiff_jax.models import gpt
from ardiff_jax.sampling.ar import sample_tokens
from tests.helpers import perturb_head_outputs

L, C = 16, 4


@pytest.fixture(scope="module")
def tiny():
  model = gpt.make_gpt("gpt_tiny", token_dim=C, seq_len=L, num_classes=10, dropout=0.0)
  params = model.init(jax.random.key(0), method=gpt.GPT.init_all)["params"]
  params = perturb_head_outputs(params)
  return model, params


def test_rope_table_layout():
  table = gpt.rope_2d_table(grid=4, head_dim=8)
  assert table.shape == (1 + 16, 4, 2)
  np.testing.assert_array_equal(table[0], 0.0)            # class prefix: cos = sin = 0
  # Position (row r, col c) = 1 + 4r + c: the first half of the pairs turns with r, the second with c.
  freqs = 1.0 / 10000 ** (np.array([0, 2]) / 4)
  r, c = 2, 3
  np.testing.assert_allclose(table[1 + 4 * r + c, :2, 0], np.cos(r * freqs), rtol=1e-6)
  np.testing.assert_allclose(table[1 + 4 * r + c, 2:, 1], np.sin(c * freqs), rtol=1e-6)


def test_rope_rotates_interleaved_pairs():
  x = jnp.arange(8, dtype=jnp.float32).reshape(1, 1, 1, 8)
  table = jnp.asarray(np.stack([np.cos([0.5, 1.0, 1.5, 2.0]), np.sin([0.5, 1.0, 1.5, 2.0])], -1)[None])
  out = np.asarray(gpt.apply_rope(x, table)).reshape(4, 2)
  pairs = np.arange(8.0).reshape(4, 2)
  ang = np.array([0.5, 1.0, 1.5, 2.0])
  want = np.stack([pairs[:, 0] * np.cos(ang) - pairs[:, 1] * np.sin(ang),
                   pairs[:, 1] * np.cos(ang) + pairs[:, 0] * np.sin(ang)], -1)
  np.testing.assert_allclose(out, want, rtol=1e-6)


def test_ffn_hidden_rounds_to_256():
  assert gpt.ffn_hidden(768) == 2048 and gpt.ffn_hidden(1280) == 3584


def test_kv_cache_decoding_equals_the_full_causal_forward(tiny):
  model, params = tiny
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.normal(size=(2, L, C)), jnp.float32)
  labels = jnp.array([3, 10])                              # 10 = the null class
  full = np.asarray(model.apply({"params": params}, tokens, labels))
  apply = lambda *a, **kw: model.apply({"params": params}, *a, **kw)
  cache = apply(2, method=gpt.GPT.init_cache)
  z, cache = apply(apply(labels, method=gpt.GPT.embed_class), 0, cache, method=gpt.GPT.decode_step)
  outs = [np.asarray(z[:, 0])]
  for i in range(L - 1):
    z, cache = apply(apply(tokens[:, i:i + 1], method=gpt.GPT.embed_tokens), i + 1, cache,
                     method=gpt.GPT.decode_step)
    outs.append(np.asarray(z[:, 0]))
  np.testing.assert_allclose(np.stack(outs, 1), full, rtol=1e-5, atol=1e-5)
  # Causality: changing a later token leaves earlier conditions unchanged.
  changed = np.asarray(model.apply({"params": params}, tokens.at[:, 9].add(5.0), labels))
  np.testing.assert_allclose(changed[:, :10], full[:, :10], rtol=1e-5, atol=1e-5)
  assert not np.allclose(changed[:, 10:], full[:, 10:])


def test_random_order_kv_cache_decoding_equals_the_full_forward():
  """A random-order model: the cached decode in each image's own order gives the full forward's
  conditions (returned in grid order); a token only influences the positions after it in that
  order."""
  model = gpt.make_gpt("gpt_tiny", token_dim=C, seq_len=L, num_classes=10, dropout=0.0,
                       random_order=True)
  params = perturb_head_outputs(model.init(jax.random.key(0), method=gpt.GPT.init_all)["params"])
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.normal(size=(2, L, C)), jnp.float32)
  labels = jnp.array([3, 10])
  order = jnp.asarray(np.stack([rng.permutation(L), rng.permutation(L)]), jnp.int32)
  apply = lambda *a, **kw: model.apply({"params": params}, *a, **kw)
  full = np.asarray(apply(tokens, labels, order=order))
  cache = apply(2, method=gpt.GPT.init_cache)
  emb = apply(labels, method=gpt.GPT.embed_class) + apply(order[:, :1], method=gpt.GPT.target_embed)
  z, cache = apply(emb, 0, cache, apply(jnp.full((2, 1), -1), method=gpt.GPT.rope_rows),
                   method=gpt.GPT.decode_step)
  outs = [np.asarray(z[:, 0])]
  for i in range(L - 1):
    x = jnp.take_along_axis(tokens, order[:, i:i + 1, None], axis=1)
    emb = apply(x, method=gpt.GPT.embed_tokens) + apply(order[:, i + 1:i + 2], method=gpt.GPT.target_embed)
    z, cache = apply(emb, i + 1, cache, apply(order[:, i:i + 1], method=gpt.GPT.rope_rows),
                     method=gpt.GPT.decode_step)
    outs.append(np.asarray(z[:, 0]))
  in_order = np.take_along_axis(full, np.asarray(order)[..., None], axis=1)
  np.testing.assert_allclose(np.stack(outs, 1), in_order, rtol=1e-5, atol=1e-5)
  # Changing the token generated 5th in image 0's order changes exactly the 11 conditions after it.
  changed = np.asarray(apply(tokens.at[0, int(order[0, 4])].add(5.0), labels, order=order))
  moved = ~np.isclose(changed[0], full[0], atol=1e-5).all(-1)
  np.testing.assert_array_equal(np.sort(np.nonzero(moved)[0]), np.sort(np.asarray(order[0, 5:])))
  # The sampler runs in random orders and CFG scale 1 equals no CFG there too.
  diffusion = create_diffusion(1000, "5")
  run = lambda **kw: np.asarray(sample_tokens(model, params, labels[:1] * 0 + 2, jax.random.key(2),
                                              diffusion=diffusion, **kw))
  plain = run(cfg_scale=1.0, use_cfg=False)
  assert np.isfinite(plain).all() and (np.abs(plain) > 0).all()
  np.testing.assert_allclose(run(cfg_scale=1.0, use_cfg=True), plain, rtol=1e-5, atol=1e-5)


def test_ar_sampler_and_cfg_scale_one(tiny):
  model, params = tiny
  diffusion = create_diffusion(1000, "5")
  labels = jnp.array([1, 7])
  run = lambda **kw: np.asarray(jax.jit(lambda p: sample_tokens(
      model, p, labels, jax.random.key(2), diffusion=diffusion, **kw))(params))
  plain = run(cfg_scale=1.0, use_cfg=False)
  assert plain.shape == (2, L, C) and np.isfinite(plain).all() and (np.abs(plain) > 0).all()
  np.testing.assert_allclose(run(cfg_scale=1.0, use_cfg=True), plain, rtol=1e-5, atol=1e-5)
  assert not np.allclose(run(cfg_scale=3.0), plain, atol=1e-3)


def test_preset_sizes_follow_llamagen():
  # LlamaGen GPT-B is 111M with a 16384-way VQ head; ours swaps the vocabulary for a linear token
  # input and the DiffLoss head, so compare the transformer trunk: 12 blocks of 12·768² weights.
  model = gpt.make_gpt("gpt_b", token_dim=16, seq_len=256, num_classes=1000)
  shapes = jax.eval_shape(lambda r: model.init(r, method=gpt.GPT.init_all), jax.random.key(0))
  block = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]["layers_0"]))
  assert block == 4 * 768 * 768 + 3 * 768 * 2048 + 2 * 768


def test_block_drops_out_each_branch_once_as_llamagen():
  """Residual dropout after W_o and FFN dropout once, after W₂ (LlamaGen's FeedForward): exactly
  two dropout layers, and the second one's output is W₂'s output masked and rescaled."""
  p = 0.5
  block = gpt.Block(width=32, num_heads=2, dropout=p)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 32)), jnp.float32)
  rope = jnp.asarray(gpt.rope_2d_table(2, 16)[:5])
  variables = block.init(jax.random.key(0), x, rope)
  _, state = block.apply(variables, x, rope, deterministic=False, rngs={"dropout": jax.random.key(1)},
                         capture_intermediates=True, mutable=["intermediates"])
  inter = state["intermediates"]
  dropouts = sorted(k for k in inter if k.startswith("Dropout"))
  assert dropouts == ["Dropout_0", "Dropout_1"], sorted(inter)
  w2_out = np.asarray(inter["w2"]["__call__"][0])
  dropped = np.asarray(inter["Dropout_1"]["__call__"][0])
  kept = dropped != 0
  assert 0.3 < kept.mean() < 0.7
  np.testing.assert_allclose(dropped[kept], w2_out[kept] / (1 - p), rtol=1e-6)


def test_bf16_compute_keeps_the_residual_stream_and_logits_in_float32():
  """With dtype=bfloat16 the blocks' outputs (the residual stream) are float32 and the result
  stays within bf16 rounding of the float32 forward."""
  model32 = gpt.make_gpt("gpt_tiny", token_dim=C, seq_len=L, num_classes=10, dropout=0.0, depth=3)
  model16 = gpt.make_gpt("gpt_tiny", token_dim=C, seq_len=L, num_classes=10, dropout=0.0, depth=3,
                         dtype=jnp.bfloat16)
  params = model32.init(jax.random.key(0), method=gpt.GPT.init_all)["params"]
  tokens = jnp.asarray(np.random.default_rng(1).normal(size=(2, L, C)), jnp.float32)
  labels = jnp.array([1, 10])
  z32 = model32.apply({"params": params}, tokens, labels)
  z16, state = model16.apply({"params": params}, tokens, labels, capture_intermediates=True,
                             mutable=["intermediates"])
  inter = state["intermediates"]
  for i in range(3):
    assert inter[f"layers_{i}"]["__call__"][0][0].dtype == jnp.float32
  assert z16.dtype == jnp.float32
  rel = float(jnp.linalg.norm(z16 - z32) / jnp.linalg.norm(z32))
  assert rel < 2e-2, rel
