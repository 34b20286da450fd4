"""DD2's parts without the engine: the continuous-input GPT and its fitted MLP, the teacher's law
and denoisers (LlamaGen's over codes, a DiffLoss teacher's over continuous tokens), and the one-step
generator's causality."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ardiff_jax.methods import dd2_adapt
from ardiff_jax.models import gpt
from tests.helpers import load_config


def test_codebook_vector_inputs_equal_a_table_the_mlp_reproduces():
  """A GPT reading vectors through tok_mlp gives the logits of the table GPT whose rows are the
  MLP's outputs: the only change is the input layer."""
  kw = dict(token_dim=0, seq_len=16, num_classes=10, vocab_size=32, dropout=0.0)
  vec_model = gpt.make_gpt("gpt_tiny", input_dim=8, **kw)
  table_model = gpt.make_gpt("gpt_tiny", **kw)
  params = nn.meta.unbox(vec_model.init(jax.random.key(0), method=gpt.GPT.init_all)["params"])
  params["output"] = {"kernel": jax.random.normal(jax.random.key(1), params["output"]["kernel"].shape)}
  book = jax.random.normal(jax.random.key(2), (32, 8))
  table = gpt.TokenMLP(vec_model.width).apply({"params": params["tok_mlp"]}, book)
  table_params = {k: v for k, v in params.items() if k != "tok_mlp"}
  table_params["tok_embeddings"] = {"embedding": table}
  codes = jax.random.randint(jax.random.key(3), (2, 16), 0, 32)
  labels = jnp.array([1, 10])
  logits = lambda m, p, x: m.apply({"params": p}, m.apply({"params": p}, x, labels), method=gpt.GPT.logits)
  np.testing.assert_allclose(np.asarray(logits(vec_model, params, book[codes])),
                             np.asarray(logits(table_model, table_params, codes)), rtol=1e-5, atol=1e-5)


def test_fit_token_mlp_reaches_a_reachable_table():
  """A table made by an MLP of the same shape is fitted to a small relative error."""
  mlp = gpt.TokenMLP(32)
  book = jax.random.normal(jax.random.key(0), (64, 8))
  target = mlp.apply(mlp.init(jax.random.key(1), book), book)
  start = mlp.init(jax.random.key(2), book)["params"]
  before = float(jnp.linalg.norm(mlp.apply({"params": start}, book) - target) / jnp.linalg.norm(target))
  _, err = dd2_adapt.fit_token_mlp(mlp, start, book, target, steps=800, lr=3e-3)
  assert before > 0.5 and err < 0.1


def test_teacher_log_probs_apply_cfg_then_the_filters():
  """log p of the teacher at every position: CFG mix of the logits, top-k, softmax."""
  from ardiff_jax.methods import dd2_teacher  # pylint: disable=g-import-not-at-top
  model = gpt.make_gpt("gpt_tiny", token_dim=0, seq_len=16, num_classes=10, vocab_size=32,
                       input_dim=8, dropout=0.0)
  params = nn.meta.unbox(model.init(jax.random.key(0), method=gpt.GPT.init_all)["params"])
  params["output"] = {"kernel": jax.random.normal(jax.random.key(1), params["output"]["kernel"].shape)}
  x = jax.random.normal(jax.random.key(2), (2, 16, 8))
  labels = jnp.array([3, 4])
  got = np.asarray(dd2_teacher.teacher_log_probs(model, params, x, labels, 10, 2.0, 5, 1.0, 1.0))
  logits = lambda y: np.asarray(model.apply({"params": params}, model.apply({"params": params}, x, y),
                                            method=gpt.GPT.logits), np.float64)
  mixed = logits(jnp.full((2,), 10)) + 2.0 * (logits(labels) - logits(jnp.full((2,), 10)))
  kth = np.sort(mixed, axis=-1)[..., -5:-4]
  kept = np.where(mixed >= kth, mixed, -np.inf)
  want = kept - np.log(np.sum(np.exp(kept - kept.max(-1, keepdims=True)), -1, keepdims=True)) - kept.max(-1, keepdims=True)
  assert (np.isfinite(got).sum(-1) == 5).all()
  np.testing.assert_allclose(np.where(np.isfinite(want), got, 0), np.where(np.isfinite(want), want, 0),
                             rtol=1e-4, atol=1e-4)


def _head_model(seed=0):
  """A tiny stage-1-shaped GPT (codebook-vector inputs, DiffLoss head) whose head weights are all
  perturbed, so that the head reads the trunk's state."""
  model = gpt.make_gpt("gpt_tiny", token_dim=8, seq_len=16, num_classes=10, input_dim=8,
                       head_width=32, head_depth=1, dropout=0.0)
  params = nn.meta.unbox(model.init(jax.random.key(seed), method=gpt.GPT.init_all)["params"])
  leaves, tree = jax.tree.flatten(params["diffloss"])   # the zero-initialised adaLN layers too
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  params["diffloss"] = jax.tree.unflatten(
      tree, [p + 0.3 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  return model, params


def test_one_step_generator_is_causal_in_its_noise():
  """x_i depends on ε_≤i only: changing ε_k leaves every earlier token bitwise equal and moves
  token k and later ones."""
  from ardiff_jax.sampling import dd2 as dd2_sampling  # pylint: disable=g-import-not-at-top
  model, params = _head_model()
  eps = jax.random.normal(jax.random.key(3), (2, 16, 8))
  labels = jnp.array([1, 2])
  x = np.asarray(dd2_sampling.one_step_generate(model, params, eps, labels))
  k = 9
  x2 = np.asarray(dd2_sampling.one_step_generate(model, params, eps.at[:, k].add(1.0), labels))
  np.testing.assert_array_equal(x2[:, :k], x[:, :k])
  assert (np.abs(x2[:, k:] - x[:, k:]).max(axis=-1) > 1e-6).all()
  # One Euler step from t = 1: x = ε − v(ε, 1).
  z = model.apply({"params": params}, eps, labels)
  v = dd2_sampling.head_velocity(model, params, eps[:, 3], jnp.ones((2,)), z[:, 3])
  np.testing.assert_allclose(x[:, 3], np.asarray(eps[:, 3] - v), rtol=1e-5, atol=1e-6)


def _perturbed(params, key, scale=0.3):
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(tree, [p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


def test_diffloss_teacher_denoises_as_its_own_diffusion_at_the_equal_snr_step():
  """A causal AR + DiffLoss teacher (dd2.teacher_kind=ar_diffusion) on the RF path: at the time
  whose SNR is that of integer step j, its x̂_0 is the Gaussian diffusion's own predict_x0 at step
  j for the input k·x_t; with CFG it mixes ε̂ as MAR does; its samples have the token shape."""
  from ardiff_jax.diffusion.gaussian import create_diffusion  # pylint: disable=g-import-not-at-top
  from ardiff_jax.methods import dd2_teacher  # pylint: disable=g-import-not-at-top
  config = load_config("dd2_tune_ar_digits", "tiny=True")
  config.tokenizer.latent_scale = 1.0     # no cache to read the scale from
  config.ar.clip_denoised = 0.0
  config.dd2.teacher_cfg = 1.0
  teacher = dd2_teacher.make_teacher(config)
  frozen = teacher.init_frozen(jax.random.key(0))
  frozen["teacher"]["diffloss"] = _perturbed(frozen["teacher"]["diffloss"], jax.random.key(1))
  b, l, c = 2, teacher.seq_len, teacher.token_dim
  labels = jnp.array([3, 8])
  prefix = jax.random.normal(jax.random.key(2), (b, l, c))
  diffusion = create_diffusion(1000)
  ab = np.cumprod(1.0 - diffusion.betas)
  steps = np.array([[40, 300, 520] + [700] * (l - 3)] * b)
  t = jnp.asarray(1.0 / (1.0 + np.sqrt(ab[steps] / (1.0 - ab[steps]))), jnp.float32)
  xt = jax.random.normal(jax.random.key(3), (b, l, c))
  got = teacher.denoise(frozen, teacher.posterior(frozen, prefix, labels), xt, t)
  k = 1.0 / jnp.sqrt((1 - t) ** 2 + t ** 2)
  z = teacher.model.apply({"params": frozen["teacher"]}, prefix, labels)
  x_vp = (k[..., None] * xt).reshape(-1, c)
  j = jnp.asarray(steps.reshape(-1), jnp.int32)
  eps = teacher.model.apply({"params": frozen["teacher"]}, x_vp, j.astype(jnp.float32),
                            z.reshape(b * l, -1), method=gpt.GPT.head)[:, :c]
  want = diffusion.predict_x0(x_vp, j, eps).reshape(b, l, c)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-3, atol=2e-3)
  assert float(jnp.abs(want).mean()) > 0.1
  assert teacher.sample(frozen, labels, jax.random.key(4)).shape == (b, l, c)
  # CFG 3 with a constant schedule: ε̂ = ε̂_u + 3(ε̂_c − ε̂_u).
  config.dd2.teacher_cfg, config.ar.cfg_schedule = 3.0, "constant"
  guided = dd2_teacher.make_teacher(config)
  got = guided.denoise(frozen, guided.posterior(frozen, prefix, labels), xt, t)
  z_u = teacher.model.apply({"params": frozen["teacher"]}, prefix, jnp.full_like(labels, 10))
  eps_u = teacher.model.apply({"params": frozen["teacher"]}, x_vp, j.astype(jnp.float32),
                              z_u.reshape(b * l, -1), method=gpt.GPT.head)[:, :c]
  want = diffusion.predict_x0(x_vp, j, eps_u + 3.0 * (eps - eps_u)).reshape(b, l, c)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-3, atol=2e-3)


def test_settings_the_method_cannot_honour_are_refused():
  """Gradient accumulation (ψ trains inside the step) and a tempered DiffLoss teacher (no
  denoiser) are refused with the field named."""
  from ardiff_jax.methods import dd2  # pylint: disable=g-import-not-at-top
  config = load_config("dd2_digits", "tiny=True")
  config.train.grad_accum_steps = 2
  with pytest.raises(ValueError, match="train.grad_accum_steps=2"):
    dd2.make_method(config)
  config = load_config("dd2_ar_digits", "tiny=True")
  config.tokenizer.latent_scale = 1.0
  config.dd2.teacher_temperature = 0.9
  with pytest.raises(ValueError, match="dd2.teacher_temperature=0.9"):
    dd2.make_method(config)


def test_the_generator_reaches_each_tokens_term_through_that_token_only():
  """CSD conditions both scores on G's stop-gradient prefix: the Jacobian of token i's term with
  respect to token k vanishes for k ≠ i (and not for k = i), for the LlamaGen teacher's closed-
  form denoiser and ψ's head alike."""
  from ardiff_jax.methods import dd2, dd2_teacher  # pylint: disable=g-import-not-at-top
  config = load_config("dd2_digits", "tiny=True")
  config.dd2.teacher_cfg = 2.0
  teacher = dd2_teacher.make_teacher(config)
  frozen = teacher.init_frozen(jax.random.key(0))
  frozen["teacher"]["output"] = {"kernel": jax.random.normal(
      jax.random.key(1), frozen["teacher"]["output"]["kernel"].shape)}
  psi = nn.meta.unbox(teacher.student.init(jax.random.key(2), method=gpt.GPT.init_all)["params"])
  psi["diffloss"] = _perturbed(psi["diffloss"], jax.random.key(3))
  l, c = teacher.seq_len, teacher.token_dim
  x = jax.random.normal(jax.random.key(4), (1, l, c))
  t = jax.random.uniform(jax.random.key(5), (1, l), minval=0.2, maxval=0.8)
  eps = jax.random.normal(jax.random.key(6), (1, l, c))
  terms = jax.jit(lambda xx: dd2.csd_terms(teacher, psi, frozen, xx, jnp.array([4]), t, eps)[0])
  for i in (0, 5, l - 1):
    grad = np.abs(np.asarray(jax.grad(lambda xx, i=i: terms(xx)[i])(x)))[0].sum(-1)   # [L]
    assert grad[i] > 0 and np.delete(grad, i).max() == 0, (i, grad)
