"""ST-AR: the student's attention mask against a NumPy Llama block, the key-mask sampler, the
contrastive losses against a float64 NumPy loop (also on 8 devices), the EMA teacher, and the
two-view data it reads."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ardiff_jax.data import pipeline, sources
from ardiff_jax.methods import st_ar
from ardiff_jax.models import gpt
from ardiff_jax.parallel import sharding as shd
from ardiff_jax.train.experiment import build_experiment
from ardiff_jax.train.state import init_state, jit_train_step
from tests.helpers import load_config

T, D, HEADS = 16, 32, 2


def _numpy_block(p, x, rope, key_mask):
  """One Llama block in float64: RMSNorm, fused qkv, interleaved RoPE, causal attention restricted
  to key_mask [B, T] (True: may be attended to), W_o, RMSNorm, SwiGLU."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  rms = lambda h, w: h / np.sqrt(np.mean(h * h, -1, keepdims=True) + 1e-5) * w
  b, t, d = x.shape
  hd = d // HEADS
  q, k, v = np.split(rms(x, p["attention_norm"]["weight"]) @ p["wqkv"]["kernel"], 3, axis=-1)

  def rotate(a):
    a = a.reshape(b, t, HEADS, hd // 2, 2)
    cos, sin = rope[None, :, None, :, 0], rope[None, :, None, :, 1]
    return np.stack([a[..., 0] * cos - a[..., 1] * sin, a[..., 1] * cos + a[..., 0] * sin], -1)

  q, k = rotate(q).reshape(b, t, HEADS, hd), rotate(k).reshape(b, t, HEADS, hd)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
  allowed = np.tril(np.ones((t, t), bool))[None, None] & key_mask[:, None, None, :]
  logits = np.where(allowed, logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = np.einsum("bhqk,bkhd->bqhd", probs, v.reshape(b, t, HEADS, hd)).reshape(b, t, d)
  x = x + out @ p["wo"]["kernel"]
  h = rms(x, p["ffn_norm"]["weight"])
  gate = h @ p["w1"]["kernel"]
  return x + (gate / (1 + np.exp(-gate)) * (h @ p["w3"]["kernel"])) @ p["w2"]["kernel"]


def test_masked_attention_matches_numpy_and_spares_rows_before_the_first_masked_key():
  block = gpt.Block(width=D, num_heads=HEADS, dropout=0.0)
  x = jax.random.normal(jax.random.key(0), (3, T, D))
  rope = gpt.rope_2d_table(4, D // HEADS)[:T]
  params = nn.meta.unbox(block.init(jax.random.key(1), x, rope)["params"])
  mask = np.ones((3, T), bool)
  mask[0, [5, 9]] = False
  mask[1, 1:] = False                  # every image token masked: the class key remains
  mask[2, 12] = False
  run = lambda m: np.asarray(block.apply({"params": params}, x, rope, key_mask=m)[0])
  got = run(jnp.asarray(mask))
  np.testing.assert_allclose(got, _numpy_block(params, np.asarray(x, np.float64), rope, mask),
                             rtol=2e-5, atol=2e-5)
  plain = run(None)
  np.testing.assert_array_equal(run(jnp.ones((3, T), bool)), plain)
  for row, first_masked in ((0, 5), (1, 1), (2, 12)):   # queries before it never see the change
    np.testing.assert_array_equal(got[row, :first_masked], plain[row, :first_masked])
    assert np.abs(got[row, first_masked:] - plain[row, first_masked:]).max() > 1e-4


def test_key_masks_keep_the_class_slot_and_mask_an_exact_share_of_image_slots():
  mask = np.asarray(st_ar.sample_key_mask(jax.random.key(0), (2, 500), 65, 0.25))
  assert mask.shape == (2, 500, 65) and mask[..., 0].all()          # no query row is ever empty
  np.testing.assert_array_equal((~mask).sum(-1), 16)               # round(0.25 · 64)
  share = (~mask[..., 1:]).mean((0, 1))                              # uniform over the slots
  assert np.abs(share - 0.25).max() < 0.08
  assert not np.array_equal(mask[0, 0], mask[0, 1]) and not np.array_equal(mask[0], mask[1])


def _numpy_contrastive(anchors, keys, tau):
  """The definition, one anchor and one positive at a time, in float64."""
  unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)
  q, t = unit(np.asarray(anchors, np.float64)), unit(np.asarray(keys, np.float64))
  b, m, k, _ = q.shape
  step, view = [], []
  for bi in range(b):
    negatives = np.concatenate([t[o].reshape(-1, t.shape[-1]) for o in range(b) if o != bi])
    for mi in range(m):
      for ki in range(k):
        anchor = q[bi, mi, ki]
        neg = np.exp(negatives @ anchor / tau).sum()
        term = lambda key: -np.log(np.exp(key @ anchor / tau) / (np.exp(key @ anchor / tau) + neg))
        step.append(np.mean([term(t[bi, mi, j]) for j in range(k) if j != ki]))
        view.append(np.mean([term(t[bi, o, ki]) for o in range(m) if o != mi]))
  return np.mean(step), np.mean(view)


def test_contrastive_losses_match_numpy_on_one_device_and_across_eight():
  rng = np.random.default_rng(0)
  anchors = rng.normal(size=(8, 2, 4, 16)).astype(np.float32)
  keys = (anchors + rng.normal(size=anchors.shape)).astype(np.float32)
  want = _numpy_contrastive(anchors, keys, 0.2)
  loss = jax.jit(lambda a, k: st_ar.contrastive_losses(a, k, 0.2))
  one = loss(anchors, keys)
  np.testing.assert_allclose(np.asarray(one), want, rtol=1e-5)
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  split = NamedSharding(mesh, P("data"))          # one image per device: every negative is remote
  a8, k8 = jax.device_put(anchors, split), jax.device_put(keys, split)
  assert len(a8.addressable_shards) == 8 and a8.addressable_shards[0].data.shape[0] == 1
  np.testing.assert_allclose(np.asarray(loss(a8, k8)), np.asarray(one), rtol=1e-6)


def _two_view_batch(config, n=16, seed=0):
  side = config.data.image_size // 2   # the tiny VQ tokenizer's stride is 2
  rng = np.random.default_rng(seed)
  return {"codes": rng.integers(0, 64, (n, 2, side, side)).astype(np.int32),
          "label": (np.arange(n) % 10).astype(np.int32)}


def test_the_teacher_starts_as_the_student_gets_no_gradient_and_tracks_the_ema():
  config = load_config("llamagen_digits", "tiny,st_ar=True")
  config.st_ar.teacher_decay = 0.9
  exp = build_experiment(config)
  state = init_state(0, exp.method, exp.tx, exp.shardings)
  teacher = jax.device_get(state.extras["teacher"]["gpt"])
  jax.tree.map(np.testing.assert_array_equal, teacher, jax.device_get(state.params["gpt"]))
  batch = shd.global_batch(_two_view_batch(config), exp.mesh)
  grads = jax.jit(jax.grad(lambda t: exp.method.loss_fn(
      state.params, batch, jax.random.key(3), 0, {"teacher": t})[0]))(state.extras["teacher"])
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))
  step = jit_train_step(exp.method, exp.tx, exp.schedule, config, exp.mesh, exp.shardings)
  for _ in range(3):
    before = jax.device_get(state.params["gpt"])
    state, metrics = step(state, batch)
    teacher = jax.tree.map(lambda t, p: 0.9 * t + 0.1 * p, teacher, before)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), teacher,
                 jax.device_get(state.extras["teacher"]["gpt"]))
  assert {"loss_ar", "loss_mim", "loss_step", "loss_view"} <= set(metrics)
  kernel = lambda tree: tree["layers_0"]["wqkv"]["kernel"]
  assert not np.array_equal(kernel(teacher), kernel(jax.device_get(state.params["gpt"])))


def test_two_distinct_views_per_item_in_training_and_the_first_two_otherwise(tmp_path):
  recs = [{"codes": (10 * i + np.arange(10)[:, None, None] * np.ones((1, 2, 2))).astype(np.int16),
           "label": i % 10} for i in range(12)]
  sources.write_cached_shard(str(tmp_path / "train" / "shard-0.array_record"), recs)
  cfg = load_config("llamagen_digits", "tiny,st_ar=True").data
  cfg.path = str(tmp_path)          # digits: random_flip=False, the two views are drawn all the same
  batch = next(iter(pipeline.make_dataset(cfg, split="train", seed=0, batch_size=12, train=True)))
  views = batch["codes"][:, :, 0, 0] % 10
  assert batch["codes"].shape == (12, 2, 2, 2) and (views[:, 0] != views[:, 1]).all()
  assert len(set(map(tuple, views))) > 3                    # drawn, not always the same pair
  first = next(iter(pipeline.make_dataset(cfg, split="train", seed=0, batch_size=12, train=False)))
  np.testing.assert_array_equal(first["codes"][:, :, 0, 0] % 10, np.tile([0, 1], (12, 1)))
  cfg.views = 11
  with pytest.raises(ValueError, match=r"data.views=11 distinct views per example, but the cache "
                     r"holds 10 per image"):
    next(iter(pipeline.make_dataset(cfg, split="train", seed=0, batch_size=12, train=True)))


@pytest.mark.parametrize("field,value,message", [
    ("data.views", 1, r"method=st_ar trains on two views per image: set data.views=2 \(got 1\)"),
    ("st_ar.mask_scope", "head", r"st_ar.mask_scope='head': expected one of \('sample', 'layer'\)"),
    ("st_ar.contrastive_layer", 3, r"st_ar.contrastive_layer=3: the model has blocks 1..1"),
    ("llamagen.scan_layers", True, r"set llamagen.scan_layers=False"),
])
def test_settings_st_ar_cannot_run_are_refused_with_the_fix(field, value, message):
  config = load_config("llamagen_digits", "tiny,st_ar=True")
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(ValueError, match=message):
    build_experiment(config)


def test_the_sharded_loss_gathers_negatives_across_eight_devices():
  """The whole loss on a 1-device mesh and on 8 devices holding 2 images each."""
  config = load_config("llamagen_digits", "tiny,st_ar=True")
  batch = _two_view_batch(config)
  out = []
  for devices in (jax.devices()[:1], jax.devices()[:8]):
    exp = build_experiment(config, devices=devices)
    state = init_state(0, exp.method, exp.tx, exp.shardings)
    loss = jax.jit(lambda p, b, e: exp.method.loss_fn(p, b, jax.random.key(5), 0, e)[:2])
    out.append(jax.device_get(loss(state.params, shd.global_batch(batch, exp.mesh), state.extras)))
  (one, m1), (eight, m8) = out
  np.testing.assert_allclose(eight, one, rtol=1e-5)
  for key in ("loss_ar", "loss_mim", "loss_step", "loss_view"):
    np.testing.assert_allclose(m8[key], m1[key], rtol=1e-5, err_msg=key)


def test_only_the_student_is_masked_and_one_mask_serves_every_block():
  config = load_config("llamagen_digits", "tiny,st_ar=True")
  config.llamagen.overrides = {"dropout": 0.0}
  mim = {}
  for ratio in (0.0, 0.25):   # at step 0 the teacher is the student: only the mask can part them
    config.st_ar.mask_ratio = ratio
    exp = build_experiment(config)
    state = init_state(0, exp.method, exp.tx, exp.shardings)
    batch = shd.global_batch(_two_view_batch(config), exp.mesh)
    loss = jax.jit(lambda p, b, e: exp.method.loss_fn(p, b, jax.random.key(5), 0, e)[1])
    mim[ratio] = float(loss(state.params, batch, state.extras)["loss_mim"])
  assert abs(mim[0.0]) < 1e-6 and mim[0.25] > 1e-3
  model = gpt.make_gpt("gpt_tiny", token_dim=0, seq_len=T, num_classes=10, vocab_size=32,
                       depth=2, dropout=0.0)
  codes, labels = jnp.arange(2 * T).reshape(2, T) % 32, jnp.array([1, 10])
  params = model.init(jax.random.key(0), method=gpt.GPT.init_all)
  mask = st_ar.sample_key_mask(jax.random.key(1), (2,), T, 0.25)
  states = lambda m: model.apply(params, codes, labels, key_mask=m, capture=1,
                                 method=gpt.GPT.hidden_states)
  shared, per_block = states(mask), states(jnp.stack([mask, mask]))
  for key in ("mid", "last"):
    np.testing.assert_array_equal(shared[key], per_block[key])
  assert np.abs(np.asarray(states(None)["last"] - shared["last"])).max() > 1e-4
