"""The FLOP count behind `--mode bench` MFU and `--mode aot`'s step time, against closed forms."""
import jax
import jax.numpy as jnp
import pytest

from ardiff_jax.modes import bench

B, D, LAYERS = 8, 32, 5


def _stack(x, ws, scan):
  layer = jax.checkpoint(lambda h, w: jnp.tanh(h @ w))
  if scan:
    return jax.lax.scan(lambda h, w: (layer(h, w), None), x, ws)[0]
  for w in ws:
    x = layer(x, w)
  return x


@pytest.mark.parametrize("scan", [False, True])
def test_scanned_and_unrolled_layers_count_the_same_closed_form(scan):
  """Forward: LAYERS matmuls of 2·B·D² FLOPs. Its gradient w.r.t. the weights adds, per layer,
  the rematerialised forward and the two backward matmuls: 4·LAYERS·2·B·D² in all, less layer 0's
  input gradient, which nothing needs (unrolled, JAX drops it; a scan body computes it for every
  layer). XLA's cost analysis of the scanned program counts one layer."""
  x, ws = jnp.ones((B, D)), jnp.ones((LAYERS, D, D)) / D
  one = 2 * B * D * D
  assert bench.traced_flops(lambda x, ws: _stack(x, ws, scan), x, ws) == LAYERS * one
  grad = jax.grad(lambda ws: jnp.sum(_stack(x, ws, scan)))
  assert bench.traced_flops(grad, ws) == 4 * LAYERS * one - (0 if scan else one)
  if scan:   # what the jaxpr count replaces: XLA counts the loop body once
    assert bench.compiled_flops(jax.jit(grad).lower(ws).compile()) < 2 * 4 * one


def test_convolution_and_cond_flops():
  """A 3×3 convolution, 4→6 channels, 2 groups, on 2×10×10: 2·(2·10·10·6)·(3·3·2) FLOPs; a cond
  counts its costlier branch."""
  x, k = jnp.ones((2, 10, 10, 4)), jnp.ones((3, 3, 2, 6))
  conv = lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=2)
  assert bench.traced_flops(conv, x, k) == 2 * (2 * 10 * 10 * 6) * (3 * 3 * 2)
  m = jnp.ones((D, D))
  branchy = lambda p, m: jax.lax.cond(p, lambda m: m @ m @ m, lambda m: m @ m, m)
  assert bench.traced_flops(branchy, True, m) == 2 * (2 * D ** 3)
