"""MAR backbone, masking and sampler: fixed-shape padding, statistics, schedule, guidance."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from ardiff_jax.diffusion.gaussian import create_diffusion
from ardiff_jax.models import mar
from ardiff_jax.sampling.mar import sample_tokens
from tests.helpers import perturb_head_outputs

L, C = 16, 4


@pytest.fixture(scope="module")
def tiny():
  model = mar.make_mar("mar_tiny", token_dim=C, seq_len=L, num_classes=10, dropout=0.0)
  params = model.init(jax.random.key(0), method=mar.MAR.init_all)["params"]
  # Non-zero head output layers, so the sampler's outputs depend on the conditions.
  params = perturb_head_outputs(params)
  return model, params


def test_presets_match_the_papers_parameter_counts():
  # reference/mar.md §2.2: recomputed from the module shapes with KL-16 at 256 px.
  for preset, want in [("mar_base", 207.9e6), ("mar_large", 478.3e6), ("mar_huge", 942.4e6)]:
    model = mar.make_mar(preset, token_dim=16, seq_len=256, num_classes=1000)
    shapes = jax.eval_shape(lambda r: model.init(r, method=mar.MAR.init_all), jax.random.key(0))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))
    assert abs(n / want - 1) < 0.005, (preset, n)


def test_padded_and_unpadded_encoders_agree(tiny):
  model, params = tiny
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.normal(size=(3, L, C)), jnp.float32)
  orders = mar.sample_orders(jax.random.key(1), 3, L)
  num_masked = 11                                        # ratio 0.69 -> 5 visible tokens
  mask = mar.mask_by_order(orders, num_masked)
  cls = model.apply({"params": params}, jnp.array([1, 2, 3]), method=mar.MAR.class_embedding)
  run = lambda n: np.asarray(model.apply({"params": params}, tokens, mask, cls, encoder_len=n))
  buf = model.buffer_size
  exact = run(buf + L - num_masked)                       # no padding slot at all
  np.testing.assert_allclose(run(buf + L - 9), exact, rtol=1e-5, atol=1e-5)    # padded
  np.testing.assert_allclose(run(None), exact, rtol=1e-5, atol=1e-5)           # every slot
  # Masked tokens' values never reach z.
  noisy = jnp.where(mask[..., None], 100.0, tokens)
  np.testing.assert_allclose(np.asarray(model.apply({"params": params}, noisy, mask, cls)), exact,
                             rtol=1e-5, atol=1e-5)


def test_mask_ratio_is_a_truncated_normal_and_masks_follow_the_order():
  ratios = np.asarray(jax.vmap(lambda k: mar.sample_mask_ratio(k, 0.7))(
      jax.random.split(jax.random.key(0), 20000)))
  assert ratios.min() >= 0.7 and ratios.max() <= 1.0
  ref = stats.truncnorm((0.7 - 1.0) / 0.25, 0, loc=1.0, scale=0.25)
  assert abs(ratios.mean() - ref.mean()) < 0.003 and abs(ratios.std() - ref.std()) < 0.003
  assert stats.kstest(ratios[:2000], ref.cdf).pvalue > 1e-3
  orders = mar.sample_orders(jax.random.key(2), 4, 256)
  mask = np.asarray(mar.mask_by_order(orders, math.ceil(256 * 0.8)))
  assert (mask.sum(1) == 205).all()
  assert len({m.tobytes() for m in mask}) == 4               # one random order per image
  assert mar.training_encoder_len(256, 64, 0.7) == 140         # reference/mar.md §7


@pytest.mark.parametrize("seq_len,steps", [(256, 64), (256, 256), (256, 16), (16, 4), (16, 32)])
def test_schedule_generates_each_position_exactly_once(seq_len, steps):
  s = mar.cosine_schedule(seq_len, steps)
  covered = np.zeros(seq_len, int)
  for start, end in zip(s.starts, s.ends):
    covered[start:end] += 1
  assert (covered == 1).all() and sum(e - st for st, e in zip(s.starts, s.ends)) == seq_len
  counts = [e - st for st, e in zip(s.starts, s.ends)]
  if (seq_len, steps) == (256, 64):
    assert counts[0] == 1 and max(counts) == 7              # reference/mar.md §3
  if (seq_len, steps) == (256, 256):
    assert set(counts) == {1}


def test_sampler_fills_every_position_and_is_deterministic(tiny):
  model, params = tiny
  diffusion = create_diffusion(1000, "10")
  schedule = mar.cosine_schedule(L, 4)
  fn = jax.jit(lambda p, y, r: sample_tokens(model, p, y, r, diffusion=diffusion, schedule=schedule,
                                             cfg_scale=2.0))
  labels = jnp.array([0, 3, 7])
  a = np.asarray(fn(params, labels, jax.random.key(5)))
  assert a.shape == (3, L, C) and np.isfinite(a).all() and (np.abs(a) > 0).all()
  np.testing.assert_array_equal(a, np.asarray(fn(params, labels, jax.random.key(5))))


def test_cfg_scale_one_equals_no_guidance(tiny):
  model, params = tiny
  diffusion = create_diffusion(1000, "5")
  schedule = mar.cosine_schedule(L, 3)
  labels = jnp.array([1, 4])
  run = lambda use_cfg: np.asarray(sample_tokens(model, params, labels, jax.random.key(3),
                                                 diffusion=diffusion, schedule=schedule,
                                                 cfg_scale=1.0, use_cfg=use_cfg))
  np.testing.assert_allclose(run(True), run(False), rtol=1e-5, atol=1e-5)
  guided = np.asarray(sample_tokens(model, params, labels, jax.random.key(3), diffusion=diffusion,
                                    schedule=schedule, cfg_scale=3.0))
  assert not np.allclose(guided, run(False), atol=1e-3)


def test_patchify_round_trip_and_layout():
  x = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
  t = mar.patchify(x, 2)
  assert t.shape == (2, 4, 12)
  # Token 0 holds the top-left 2×2 patch, channel-major: channel 0 of its 4 pixels first.
  np.testing.assert_array_equal(t[0, 0, :4], x[0, :2, :2, 0].reshape(-1))
  np.testing.assert_array_equal(mar.unpatchify(t, 2, 3), x)
