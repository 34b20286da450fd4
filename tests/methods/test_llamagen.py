"""LlamaGen over VQ codes: top-k / top-p against NumPy, the sampler against greedy decoding of the
full causal forward (with and without CFG), the loss through the engine, the code cache, and the
mismatches a user can make between tokenizer runs and generators."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ardiff_jax import main as main_lib
from ardiff_jax.data import pipeline, sources, transforms
from ardiff_jax.models import gpt
from ardiff_jax.parallel import sharding as shd
from ardiff_jax.sampling import llamagen as sampler
from ardiff_jax.train.experiment import build_experiment
from ardiff_jax.train.state import init_state, jit_train_step
from tests.helpers import load_config

L, V, NUM_CLASSES = 16, 32, 10


def _numpy_filter(logits, top_k, top_p):
  """The HF/LlamaGen `top_k_top_p_filtering`, one row at a time, in float64."""
  out = np.array(logits, np.float64)
  for row in out:
    if top_k > 0:
      kth = np.sort(row)[::-1][min(top_k, row.size) - 1]
      row[row < kth] = -np.inf
    if top_p < 1.0:
      order = np.argsort(-row, kind="stable")
      finite = row[order]
      probs = np.exp(finite - finite.max())
      probs /= probs.sum()
      remove = np.cumsum(probs) > top_p
      remove[1:] = remove[:-1].copy()
      remove[0] = False
      row[order[remove]] = -np.inf
  return out


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.7), (8, 0.5), (1, 1.0), (0, 0.0)])
def test_top_k_top_p_filtering_matches_numpy(top_k, top_p):
  logits = np.random.default_rng(top_k).normal(size=(4, 50)) * 2
  got = np.asarray(sampler.filter_logits(jnp.asarray(logits, jnp.float32), top_k, top_p))
  want = _numpy_filter(logits, top_k, top_p)
  np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
  np.testing.assert_allclose(got[~np.isinf(got)], want[~np.isinf(want)], rtol=1e-6)
  assert (~np.isinf(got)).sum(-1).min() >= 1


@pytest.fixture(scope="module")
def tiny():
  model = gpt.make_gpt("gpt_tiny", token_dim=0, seq_len=L, num_classes=NUM_CLASSES, vocab_size=V,
                       dropout=0.0)
  params = nn.meta.unbox(model.init(jax.random.key(0), method=gpt.GPT.init_all)["params"])
  # The output layer starts at zero (uniform logits); give it weights so greedy choices differ.
  params = dict(params, output={"kernel": jax.random.normal(jax.random.key(1),
                                                            params["output"]["kernel"].shape)})
  return model, params


def _greedy_by_full_forward(model, params, labels, cfg_scale=1.0, cfg_interval=-1, prefix=None):
  """Greedy decoding with the full causal forward at every step (no cache): code i is the argmax
  of the logits at position i given the codes before it, CFG-mixed as LlamaGen mixes them; the
  codes of `prefix` [B, P] are given."""
  codes = np.zeros((len(labels), L), np.int32)
  given = 0 if prefix is None else prefix.shape[1]
  codes[:, :given] = 0 if prefix is None else prefix
  null = np.full_like(labels, NUM_CLASSES)
  for i in range(given, L):
    fwd = lambda lab: np.asarray(model.apply({"params": params}, model.apply(
        {"params": params}, jnp.asarray(codes), jnp.asarray(lab)), method=gpt.GPT.logits))[:, i]
    logits = fwd(labels)
    guided = cfg_scale > 1.0 and (cfg_interval < 0 or i == 0 or i - 1 <= cfg_interval)
    if guided:
      uncond = fwd(null)
      logits = uncond + cfg_scale * (logits - uncond)
    codes[:, i] = logits.argmax(-1)
  return codes


@pytest.mark.parametrize("cfg_scale,cfg_interval", [(1.0, -1), (3.0, -1), (3.0, 4)])
def test_cached_sampler_with_top_k_1_is_greedy_decoding_of_the_full_forward(tiny, cfg_scale,
                                                                            cfg_interval):
  model, params = tiny
  labels = np.array([0, 3, 7], np.int32)
  got = jax.jit(lambda p, lab, k: sampler.sample_codes(
      model, p, lab, k, cfg_scale=cfg_scale, cfg_interval=cfg_interval, top_k=1))(
          params, jnp.asarray(labels), jax.random.key(0))
  want = _greedy_by_full_forward(model, params, labels, cfg_scale, cfg_interval)
  np.testing.assert_array_equal(np.asarray(got), want)
  assert len(np.unique(want)) > 3                      # not a degenerate constant sequence


def test_a_given_prefix_is_kept_and_continued_as_the_full_forward_would(tiny):
  """sample_codes(prefix=...): random first codes prefilled in one cached step, the rest greedy
  (top-k 1) under CFG equal to the uncached full forward's continuation of the same prefix."""
  model, params = tiny
  labels = np.array([1, 5], np.int32)
  prefix = np.asarray(jax.random.randint(jax.random.key(4), (2, 11), 0, V), np.int32)
  got = np.asarray(sampler.sample_codes(model, params, jnp.asarray(labels), jax.random.key(0),
                                        cfg_scale=3.0, top_k=1, prefix=jnp.asarray(prefix)))
  np.testing.assert_array_equal(got, _greedy_by_full_forward(model, params, labels, 3.0, -1, prefix))
  assert (got[:, :11] == prefix).all()


def test_sampling_draws_from_the_filtered_softmax(tiny):
  """With top-k = 2 every code is one of the two most likely ones given the codes drawn so far."""
  model, params = tiny
  labels = jnp.arange(4, dtype=jnp.int32)
  codes = np.asarray(jax.jit(lambda p, k: sampler.sample_codes(model, p, labels, k, top_k=2))(
      params, jax.random.key(3)))
  logits = np.asarray(model.apply({"params": params}, model.apply(
      {"params": params}, jnp.asarray(codes), labels), method=gpt.GPT.logits))   # [B, L, V]
  top2 = np.argsort(-logits, axis=-1)[..., :2]
  assert ((codes[..., None] == top2).any(-1)).all()


def test_llamagen_sizes_follow_the_paper():
  """GPT-B/L/XL/XXL/3B over 16×16 codes from 16,384 with 1,000 classes: 111M / 343M / 775M /
  1.4B / 3.1B in the paper."""
  counts = {}
  for preset in ("gpt_b", "gpt_xl", "gpt_3b"):
    model = gpt.make_gpt(preset, token_dim=0, seq_len=256, num_classes=1000, vocab_size=16384)
    variables = nn.meta.unbox(jax.eval_shape(lambda k, m=model: m.init(k, method=gpt.GPT.init_all),
                                             jax.random.key(0)))
    counts[preset] = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))
  assert counts == {"gpt_b": 110_888_448, "gpt_xl": 774_699_520, "gpt_3b": 3_096_659_200}


# --------------------------------------------------------------------- through the engine
def _codes_batch(n=16, side=8, vocab=64, seed=0):
  rng = np.random.default_rng(seed)
  return {"codes": rng.integers(0, vocab, (n, side, side)).astype(np.int32),
          "label": (np.arange(n) % NUM_CLASSES).astype(np.int32)}


def test_training_steps_reduce_the_loss_on_a_fixed_batch():
  config = load_config("llamagen_digits", "tiny")
  config.optim.warmup_steps, config.optim.lr = 0, 3e-3
  exp = build_experiment(config)
  assert exp.method.model.vocab_size == 64 and exp.method.model.seq_len == 64
  state = init_state(0, exp.method, exp.tx, exp.shardings)
  step = jit_train_step(exp.method, exp.tx, exp.schedule, config, exp.mesh, exp.shardings)
  batch = shd.global_batch(_codes_batch(), exp.mesh)
  probe = jax.jit(lambda p: exp.method.loss_fn(p, batch, jax.random.key(7), 0, {})[0])
  before = float(probe(state.params))
  assert before == pytest.approx(np.log(64), rel=1e-5)    # zero-initialised head: uniform logits
  for _ in range(30):
    state, _ = step(state, batch)
  assert float(probe(state.params)) < 0.8 * before


def test_code_records_round_trip_and_training_reads_one_view(tmp_path):
  codes = np.random.default_rng(0).integers(0, 16384, (10, 4, 4)).astype(np.int16)
  record = sources.decode_cached_record(sources.encode_codes_record(codes, 7))
  np.testing.assert_array_equal(record["codes"], codes)
  assert record["label"] == 7 and sources.code_dtype(16384) == np.int16
  assert sources.code_dtype(65536) == np.int32
  recs = [{"codes": np.stack([np.full((2, 2), 2 * i), np.full((2, 2), 2 * i + 1)]).astype(np.int16),
           "label": i % 10} for i in range(12)]
  sources.write_cached_shard(str(tmp_path / "train" / "shard-0.array_record"), recs)
  cfg = load_config("llamagen_digits", "tiny").data
  cfg.path = str(tmp_path)
  first = next(iter(pipeline.make_dataset(cfg, split="train", seed=0, batch_size=12, train=False)))
  np.testing.assert_array_equal(first["codes"][:, 0, 0], 2 * np.arange(12))   # the image itself
  cfg.random_flip = True
  batch = next(iter(pipeline.make_dataset(cfg, split="train", seed=0, batch_size=12, train=True)))
  picked = batch["codes"][:, 0, 0] % 2
  assert batch["codes"].dtype == np.int32 and 0 < picked.sum() < 12       # both views drawn


def test_ten_crop_is_torchvisions():
  img = np.arange(5 * 5, dtype=np.float32).reshape(5, 5, 1)
  crops = transforms.ten_crop(img[None], 3)[0]                         # [10, 3, 3, 1]
  assert crops.shape == (10, 3, 3, 1)
  np.testing.assert_array_equal(crops[0], img[:3, :3]);  np.testing.assert_array_equal(crops[3], img[2:, 2:])
  np.testing.assert_array_equal(crops[4], img[1:4, 1:4])                  # round((5 − 3) / 2) = 1
  np.testing.assert_array_equal(crops[5], img[:, ::-1][:3, :3])          # the mirror image's crops


def test_cache_of_a_vq_run_holds_its_codes(vq_run):
  config, workdir, counts = vq_run
  cached = config.data.copy_and_resolve_references()
  cached.source, cached.path = "cached", os.path.join(workdir, "cache")
  batch = next(iter(pipeline.make_dataset(cached, split="test", seed=0, batch_size=8, train=False)))
  assert counts["test"] == pipeline.num_examples(config.data, "test")
  assert batch["codes"].shape == (8, 8, 8) and batch["codes"].dtype == np.int32
  images = next(iter(pipeline.make_dataset(config.data, split="test", seed=0, batch_size=8,
                                           train=False)))["image"]
  from ardiff_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  exp, params, _ = checkpoint.restore_sampling_params(config, workdir)
  np.testing.assert_array_equal(batch["codes"], np.asarray(exp.method.encode(params, images)))


def test_llamagen_trains_and_samples_on_the_vq_run(vq_run, tmp_path):
  _, vq_dir, _ = vq_run
  config = load_config("llamagen_digits", f"tiny,vq={vq_dir}")
  main_lib.run(config, str(tmp_path), "train")
  summary = main_lib.run(config, str(tmp_path), "sample")
  with np.load(os.path.join(str(tmp_path), "samples", "samples_3.npz")) as f:
    assert f["images"].shape == (20, 16, 16, 3) and f["images"].dtype == np.uint8
  assert summary["cfg_scale"] == 2.0
  _probe_writes_its_json(config, str(tmp_path))


def _probe_writes_its_json(config, workdir):
  """`--mode probe` on a finished run: one top-1 per position, from the middle block."""
  config.probe.update(epochs=2, warmup_epochs=1, batch_size=32, max_train=64, num_positions=4)
  out = main_lib.run(config, workdir, "probe")
  with open(os.path.join(workdir, "probe", "3.json")) as f:
    assert json.load(f)["top1"] == out["top1"]
  assert len(out["top1"]) == 4 and all(0.0 <= a <= 1.0 for a in out["top1"])
  assert out["layer"] == 1 and out["positions"] == [15, 31, 47, 63]


def test_st_ar_trains_on_two_views_and_its_student_samples_with_llamagens_sampler(vq_run, tmp_path):
  _, vq_dir, _ = vq_run
  config = load_config("llamagen_digits", f"tiny,vq={vq_dir},st_ar=True")
  main_lib.run(config, str(tmp_path), "train")
  _probe_writes_its_json(config, str(tmp_path))
  from ardiff_jax.methods import get_method  # pylint: disable=g-import-not-at-top
  from ardiff_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  exp, params, _ = checkpoint.restore_sampling_params(config, str(tmp_path))
  assert set(params) == {"gpt", "projector"}
  plain = load_config("llamagen_digits", f"tiny,vq={vq_dir}")
  frozen = checkpoint.load_frozen(exp.method)
  labels = {"label": jnp.arange(4, dtype=jnp.int32)}
  np.testing.assert_array_equal(
      exp.method.generate(params, frozen, labels, jax.random.key(0)),
      get_method(plain).generate(params["gpt"], frozen, labels, jax.random.key(0)))


def test_a_kl_cache_given_to_llamagen_is_refused_before_anything_is_written(tmp_path):
  recs = [{"moments": np.zeros((8, 8, 8), np.float32), "moments_flip": np.zeros((8, 8, 8), np.float32),
           "label": 1}] * 8
  sources.write_cached_shard(str(tmp_path / "cache" / "train" / "s.array_record"), recs)
  config = load_config("llamagen_digits", f"tiny,vq={tmp_path}")
  with pytest.raises(pipeline.DataError, match=r"reads \['codes', 'label'\].*yields \['index', 'label', "
                     r"'moments'\]: 'codes' comes from the cache of a VQ tokenizer run"):
    main_lib.run(config, str(tmp_path / "run"), "train")
  assert not os.path.exists(tmp_path / "run")


def test_a_vq_run_as_the_decoder_of_a_continuous_generator_is_refused(vq_run):
  _, vq_dir, _ = vq_run
  from ardiff_jax.methods import latent_tokens  # pylint: disable=g-import-not-at-top
  from ardiff_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=r"tokenizer_workdir=.* is not a KL tokenizer \(configs/kl_\*.py\) "
                     r"run: its parameters hold \['vq'\], not 'ae'"):
    latent_tokens.tokenizer_loader(vq_dir)(checkpoint.restore_run_params)


def test_codes_out_of_range_are_refused_before_training(tmp_path):
  recs = [{"codes": np.full((1, 8, 8), 70, np.int16), "label": 1}] * 8   # tiny vocab is 64
  sources.write_cached_shard(str(tmp_path / "cache" / "train" / "s.array_record"), recs)
  config = load_config("llamagen_digits", f"tiny,vq={tmp_path}")
  with pytest.raises(ValueError, match=r"cached codes span \[70, 70\] but the VQ tokenizer has 64"):
    main_lib.run(config, str(tmp_path / "run"), "train")


def test_probe_features_read_a_scanned_checkpoint_block_by_block():
  from ardiff_jax.methods import get_method  # pylint: disable=g-import-not-at-top
  from ardiff_jax.models import layers  # pylint: disable=g-import-not-at-top
  config = load_config("llamagen_digits", "tiny")
  config.llamagen.overrides = {"depth": 2}
  config.llamagen.scan_layers = True
  scanned = get_method(config)
  params = nn.meta.unbox(scanned.init_params(jax.random.key(0)))
  config.llamagen.scan_layers = False
  looped = get_method(config)
  codes = jnp.arange(2 * 64).reshape(2, 64) % 64
  np.testing.assert_allclose(scanned.probe_features(params, codes, 0),
                             looped.probe_features(layers.unstack_layers(params, "layers"), codes, 0),
                             rtol=1e-6, atol=1e-6)
