"""Paella's renoise sampler and the MaskGIT baseline, on stand-in models given as logits functions."""
import jax
import jax.numpy as jnp
import numpy as np

from ardiff_jax.sampling import paella as sampler

B, H, V = 3, 4, 16
SHAPE = (B, H, H)


def _peaked(target, gap=1e4):
  """A model certain of `target` [B, h, w] whatever it is given."""
  logits = jax.nn.one_hot(target, V) * gap

  def logits_fn(x, t, w):
    del x, t, w
    return logits
  return logits_fn


def _target(seed=0):
  return jax.random.randint(jax.random.key(seed), SHAPE, 0, V, jnp.int32)


def test_noise_levels_are_papers_twelve_steps():
  np.testing.assert_allclose(np.asarray(sampler.noise_levels(12))[:12], np.linspace(1, 0, 13)[:12],
                             atol=1e-7)


def test_a_peaked_model_gives_its_argmax_with_either_sampler():
  target = _target()
  got = sampler.sample_renoise(_peaked(target), jax.random.key(1), SHAPE, V)
  np.testing.assert_array_equal(got, target)
  got = sampler.sample_mask_freeze(_peaked(target), jax.random.key(1), SHAPE, V)
  np.testing.assert_array_equal(got, target)


def test_renoising_at_level_one_returns_the_fixed_start():
  """With t_{i+1} = 1 every token goes back to u_init, whatever the model drew."""
  rng = jax.random.key(3)
  start = sampler.initial_codes(jax.random.split(rng)[0], SHAPE, V)
  got = sampler.sample_renoise(_peaked(_target(7)), rng, SHAPE, V, steps=3, t_start=1.0,
                               t_end=1.0, renoise_steps=3)
  np.testing.assert_array_equal(got, start)
  assert not np.array_equal(got, _target(7))


def test_each_step_redraws_every_token_and_renoises_a_t_next_share_toward_the_start():
  """Two steps: the model's target at step 1 is A; after renoising at t_1 = 1/2 about half the
  tokens are u_init's; the model sees exactly A or u_init at each position."""
  big = (64, 16, 16)
  a = jax.random.randint(jax.random.key(0), big, 0, V, jnp.int32)
  rng = jax.random.key(5)
  start = sampler.initial_codes(jax.random.split(rng)[0], big, V)
  seen = []

  def logits_fn(x, t, w):
    jax.debug.callback(lambda x, t: seen.append((np.asarray(x), np.asarray(t))), x, t)
    return jax.nn.one_hot(a, V) * 1e4

  sampler.sample_renoise(logits_fn, rng, big, V, steps=2)
  (x0, t0), (x1, t1) = seen
  np.testing.assert_array_equal(x0, start)
  np.testing.assert_allclose(t0, 1.0)
  np.testing.assert_allclose(t1, 0.5)
  from_start = (x1 == start) & (x1 != a)
  assert np.all((x1 == a) | (x1 == start))
  share = from_start.mean() / np.mean(start != a)       # renoised share among positions that differ
  assert abs(share - 0.5) < 0.02, share


def test_inpainting_keeps_the_known_tokens():
  known = _target(2)
  keep = jnp.arange(H)[None, :, None] < 2 * jnp.ones(SHAPE, bool)   # the top two rows
  got = sampler.sample_renoise(_peaked(_target(9)), jax.random.key(0), SHAPE, V, init_x=known,
                               keep=keep)
  np.testing.assert_array_equal(np.asarray(got)[:, :2], np.asarray(known)[:, :2])
  np.testing.assert_array_equal(np.asarray(got)[:, 2:], np.asarray(_target(9))[:, 2:])


def test_guidance_and_temperature_schedules():
  np.testing.assert_allclose(sampler.step_schedule(5, 0.7, 0.3), np.linspace(0.7, 0.3, 5), atol=1e-7)
  np.testing.assert_allclose(sampler.guidance_schedule(4, (8.0, 8.0), 2), [8, 8, 1, 1])


def test_mask_freeze_freezes_tokens_and_follows_the_cosine_schedule():
  """A model whose guesses change every step: a token once unmasked keeps its value, and after
  step i exactly max(1, min(n_unknown − 1, floor(N·cos(π/2·(i+1)/S)))) tokens are masked."""
  steps, n = 6, H * H
  seen = []

  def logits_fn(x, t, w):
    jax.debug.callback(lambda x: seen.append(np.asarray(x)), x)
    return jax.random.normal(jax.random.fold_in(jax.random.key(0), jnp.sum(x)), x.shape + (V,))

  final = np.asarray(sampler.sample_mask_freeze(logits_fn, jax.random.key(1), SHAPE, V, steps=steps))
  assert len(seen) == steps and (final < V).all()
  unknown = n
  for i in range(1, steps):
    masked = (seen[i] == V).reshape(B, -1).sum(-1)
    want = max(1, min(unknown - 1, int(np.floor(n * np.cos(np.pi / 2 * i / steps)))))
    np.testing.assert_array_equal(masked, want)
    prev, cur = seen[i - 1], seen[i]
    frozen = prev != V
    np.testing.assert_array_equal(cur[frozen], prev[frozen])
    unknown = want
  frozen = seen[-1] != V
  np.testing.assert_array_equal(final[frozen], seen[-1][frozen])


def test_keep_without_init_x_is_refused_with_the_fix():
  import pytest  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="give init_x"):
    sampler.sample_renoise(_peaked(_target()), jax.random.key(0), SHAPE, V,
                           keep=jnp.ones(SHAPE, bool))
