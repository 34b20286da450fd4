"""Remat and scan-over-layers switches: the same function and gradients as the plain loop."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ardiff_jax.diffusion.gaussian import create_diffusion
from ardiff_jax.models import gpt, layers, mar
from ardiff_jax.sampling.ar import sample_tokens
from ardiff_jax import optim
from tests.helpers import perturb_head_outputs

L, C = 16, 4


def _build(kind, **switches):
  if kind == "mar":
    return mar.make_mar("mar_tiny", token_dim=C, seq_len=L, num_classes=10, enc_depth=2,
                        dec_depth=3, **switches)
  return gpt.make_gpt("gpt_tiny", token_dim=C, seq_len=L, num_classes=10, dropout=0.0, **switches)


def _stacks(kind):
  return ("encoder_blocks", "decoder_blocks") if kind == "mar" else ("layers",)


def _forward(kind, model, params, tokens, labels):
  """The conditions z [B, L, D] and the head's output on them (deterministic)."""
  def f(m):
    if kind == "mar":
      mask = jnp.arange(L)[None] % 3 == 0
      z = m(tokens, jnp.broadcast_to(mask, labels.shape + (L,)), m.class_embedding(labels))
    else:
      z = m(tokens, labels)
    return z, m.head(tokens[:, 0], labels, z[:, 0])
  return model.apply({"params": params}, method=lambda m: f(m))


@pytest.mark.parametrize("kind,scan,remat", [
    ("mar", True, "full"),
    pytest.param("gpt", True, "dots", marks=pytest.mark.slow),
    pytest.param("mar", False, "full", marks=pytest.mark.slow)])
def test_scanned_and_rematerialised_stack_equals_the_loop(kind, scan, remat):
  scanned = _build(kind, scan_layers=scan, remat=remat)
  loop = _build(kind)
  params = perturb_head_outputs(scanned.init(jax.random.key(0), method=type(scanned).init_all)["params"])
  unstacked = params
  for name in _stacks(kind) if scan else ():   # scanned: one [depth, ...] entry per parameter
    assert layers.SCAN_LAYER in params[name]
    unstacked = layers.unstack_layers(unstacked, name)
  want_tree = jax.tree.map(jnp.shape, loop.init(jax.random.key(0), method=type(loop).init_all)["params"])
  assert jax.tree.map(jnp.shape, unstacked) == want_tree

  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.normal(size=(2, L, C)), jnp.float32)
  labels = jnp.array([3, 7])
  # Jitted: eagerly, each of the many small ops compiles on its own (seconds each on 2 cores).
  got, want = (jax.jit(lambda p, m=m: _forward(kind, m, p, tokens, labels))(p)
               for m, p in [(scanned, params), (loop, unstacked)])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)

  loss = lambda m, p: sum(jnp.sum(jnp.square(x)) for x in _forward(kind, m, p, tokens, labels))
  g_scan = jax.jit(jax.grad(lambda p: loss(scanned, p)))(params)
  g_loop = jax.jit(jax.grad(lambda p: loss(loop, p)))(unstacked)
  for name in _stacks(kind) if scan else ():
    g_scan = layers.unstack_layers(g_scan, name)
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_loop))   # float32 sums reorder
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale),
               g_scan, g_loop)


def test_dropout_runs_through_scanned_rematerialised_blocks():
  """Training mode: each scanned layer draws its own dropout mask (the loop's keys differ, so
  only the behaviour is compared): outputs change with the dropout key and differ from eval."""
  model = gpt.make_gpt("gpt_tiny", token_dim=C, seq_len=L, num_classes=10, dropout=0.5,
                       scan_layers=True, remat="full")
  params = model.init(jax.random.key(0), method=gpt.GPT.init_all)["params"]
  tokens, labels = jnp.ones((2, L, C)), jnp.array([1, 2])
  run = lambda key: model.apply({"params": params}, tokens, labels, deterministic=key is None,
                                rngs=None if key is None else {"dropout": key})
  a, b, ev = run(jax.random.key(1)), run(jax.random.key(2)), run(None)
  assert np.isfinite(a).all() and not np.allclose(a, b) and not np.allclose(a, ev)
  np.testing.assert_array_equal(run(jax.random.key(1)), a)


@pytest.mark.slow
def test_scanned_gpt_kv_cache_sampling_equals_the_loop():
  scanned, loop = _build("gpt", scan_layers=True), _build("gpt")
  params = perturb_head_outputs(scanned.init(jax.random.key(0), method=gpt.GPT.init_all)["params"])
  unstacked = layers.unstack_layers(params, "layers")
  diffusion = create_diffusion(1000, "5")
  labels = jnp.array([1, 7])
  run = lambda m, p: np.asarray(sample_tokens(m, p, labels, jax.random.key(2), diffusion=diffusion,
                                              cfg_scale=2.0))
  np.testing.assert_allclose(run(scanned, params), run(loop, unstacked), rtol=1e-4, atol=1e-5)


def test_weight_decay_mask_ignores_the_layer_axis():
  model = _build("mar", scan_layers=True)
  params = nn.meta.unbox(model.init(jax.random.key(0), method=mar.MAR.init_all)["params"])
  mask = optim.default_decay_mask(params)
  block = mask["encoder_blocks"][layers.SCAN_LAYER]
  assert block["attn"]["qkv"]["kernel"] and not block["attn"]["qkv"]["bias"]
  assert not block["norm1"]["scale"]


def test_unknown_remat_policy_is_named():
  with pytest.raises(ValueError, match="remat='everything'"):
    _build("mar", remat="everything").init(jax.random.key(0), method=mar.MAR.init_all)
