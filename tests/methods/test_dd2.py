"""DD2 through the engine: the teacher adaptation, stage 1 and stage 2 from a tiny LlamaGen
teacher (warm starts, training, sampling), and the continuous-teacher chain (slow). The parts
without the engine are in test_dd2_parts.py."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ardiff_jax import main as main_lib
from ardiff_jax.methods import dd2_adapt
from ardiff_jax.models import gpt
from ardiff_jax.train import checkpoint
from tests.helpers import load_config


@pytest.fixture(scope="module")
def teacher_runs(vq_run, tmp_path_factory):
  """The shared tiny VQ run (tests/conftest.py) and a 3-step tiny LlamaGen run on its codes."""
  vq = vq_run[1]
  teacher = str(tmp_path_factory.mktemp("llamagen"))
  main_lib.run(load_config("llamagen_digits", f"tiny=True,vq={vq}"), teacher, "train")
  return vq, teacher


@pytest.fixture(scope="module")
def adapted_run(teacher_runs, tmp_path_factory):
  """A 3-step dd2_adapt run from the tiny teacher (seed 1, so that a fresh initialisation would
  differ from the teacher's seed-0 weights): (vq, teacher, workdir, config)."""
  vq, teacher = teacher_runs
  config = load_config("dd2_adapt_digits", f"tiny=True,vq={vq},teacher={teacher}")
  config.seed = 1
  workdir = str(tmp_path_factory.mktemp("adapt"))
  main_lib.run(config, workdir, "train")
  return vq, teacher, workdir, config


def test_adapted_teacher_warm_starts_trains_and_samples(adapted_run, tmp_path):
  vq, teacher, workdir, config = adapted_run
  summary = main_lib.run(config, workdir, "sample")
  assert summary["num_images"] == config.sample.num_samples
  # Every trunk weight started from the teacher's: after 3 steps at lr 1e-4 they are still within
  # 1e-3, where seed 1's fresh initialisation is ~0.02 away.
  t = checkpoint.restore_run_params(teacher)
  a = checkpoint.restore_run_params(workdir)
  assert "tok_mlp" in a and "tok_embeddings" not in a
  # The MLP was fitted to the teacher's table before training: closer than a fresh one (8-wide
  # vectors cannot reproduce a near-random 32-wide table; the AR fine-tuning takes over).
  book = jnp.asarray(checkpoint.restore_run_params(vq)["vq"]["codebook"])
  book = book / jnp.linalg.norm(book, axis=-1, keepdims=True)        # LlamaGen's l2-normalised table
  mlp = gpt.TokenMLP(int(a["tok_mlp"]["fc1"]["kernel"].shape[1]))
  table = jnp.asarray(t["tok_embeddings"]["embedding"])
  rel = lambda p: float(jnp.linalg.norm(mlp.apply({"params": p}, book) - table) / jnp.linalg.norm(table))
  assert rel(a["tok_mlp"]) < 0.85 * rel(mlp.init(jax.random.key(5), book)["params"])
  gap = lambda u, v: max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), u, v)))
  fresh = nn.meta.unbox(dd2_adapt.build_model(config).init(jax.random.key(1), method=gpt.GPT.init_all)["params"])
  assert gap(t["layers_0"], a["layers_0"]) < 1e-3 < 0.01 < gap(t["layers_0"], fresh["layers_0"])
  bad = load_config("dd2_adapt_digits", f"tiny=True,vq={vq},teacher={vq}")
  with pytest.raises(ValueError, match="not a LlamaGen run over codes"):
    main_lib.run(bad, str(tmp_path / "bad"), "train")


def _tune(adapted_run, workdir, gts=True):
  vq, _, adapted, _ = adapted_run
  config = load_config("dd2_tune_digits", f"tiny=True,vq={vq},teacher={adapted},gts={gts}")
  config.seed = 1           # a fresh initialisation would differ from the teacher's (seed 0)
  main_lib.run(config, workdir, "train")
  return config


@pytest.fixture(scope="module")
def tuned_run(adapted_run, tmp_path_factory):
  """A 3-step tiny dd2_tune (GTS) run from the adapted teacher: (workdir, config)."""
  workdir = str(tmp_path_factory.mktemp("tune"))
  return workdir, _tune(adapted_run, workdir)


@pytest.mark.parametrize("gts", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_stage_one_tunes_from_the_adapted_teacher_and_samples(adapted_run, tuned_run, tmp_path, gts):
  """dd2_tune: warm start from a dd2_adapt run, the GTS (or Monte-Carlo) loss on sequences the
  teacher samples in the step, per-token Euler sampling through --mode sample."""
  vq, teacher, adapted, _ = adapted_run
  workdir, config = tuned_run if gts else (str(tmp_path / "tune"), None)
  config = config or _tune(adapted_run, workdir, gts=False)
  summary = main_lib.run(config, workdir, "sample")
  assert summary["num_images"] == config.sample.num_samples
  a, s = checkpoint.restore_run_params(adapted), checkpoint.restore_run_params(workdir)
  assert "diffloss" in s and "output" not in s
  np.testing.assert_allclose(np.asarray(s["cls_embedding"]["embedding"]),   # warm-started:
                             np.asarray(a["cls_embedding"]["embedding"]), atol=2e-3)  # N(0, .02) apart otherwise
  with pytest.raises(ValueError, match="not an adapted teacher run"):
    main_lib.run(load_config("dd2_tune_digits", f"tiny=True,vq={vq},teacher={teacher}"),
                 str(tmp_path / "bad"), "train")


def _restore_state(config, workdir):
  """The newest checkpoint's full train state (G, its EMA, ψ in the extras)."""
  from ardiff_jax.train import experiment  # pylint: disable=g-import-not-at-top
  exp = experiment.build_experiment(config)
  manager = checkpoint.make_manager(workdir)
  state, _ = checkpoint.restore_newest_readable(manager, exp.abstract_state)
  return jax.device_get(state)


@pytest.mark.parametrize("init_g", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_stage_two_distils_from_stage_one_and_samples_in_one_step(adapted_run, tuned_run, tmp_path,
                                                                   init_g):
  """dd2: G and ψ warm-started from the stage-1 run (or G fresh, the ablation), ψ trained K
  times per G step inside the jitted step and checkpointed with the run, G sampled in one
  forward through --mode sample."""
  vq, _, adapted, _ = adapted_run
  tuned, _ = tuned_run
  config = load_config("dd2_digits", f"tiny=True,vq={vq},teacher={adapted},tune={tuned},init_g={init_g}")
  config.seed = 2
  workdir = str(tmp_path / "dd2")
  main_lib.run(config, workdir, "train")
  summary = main_lib.run(config, workdir, "sample")
  assert summary["num_images"] == config.sample.num_samples
  config.dd2.teacher_steps = 3          # the teacher-refined mode: G's first L − 3 codes kept
  assert main_lib.run(config, workdir, "sample")["num_images"] == config.sample.num_samples
  config.bench.steps, config.bench.warmup_steps = 2, 1
  bench = main_lib.run(config, str(tmp_path / "bench"), "bench")   # with and without the decoder
  assert bench["sample_img_per_s"] > 0 and bench["sample_tokens_img_per_s"] > 0
  state = _restore_state(config, workdir)
  s = checkpoint.restore_run_params(tuned)
  gap = lambda u, v: max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), u, v)))
  g, psi = state.params, state.extras["guidance"]
  # ψ took K·3 = 6 Adam steps from the stage-1 weights (lr ≤ 2e-4 each), G 3 from its start;
  # a fresh initialisation is ≥ 0.01 away.
  assert 0 < gap(psi, s) < 3 * 6 * 2e-4
  counts = [int(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(
      state.extras["guidance_opt"])[0] if "count" in jax.tree_util.keystr(path)]
  assert counts and set(counts) == {6}
  if init_g:
    assert 0 < gap(g, s) < 3 * 3 * 1e-4
  else:
    assert gap(g["layers_0"], s["layers_0"]) > 0.01       # a fresh draw, N(0, 0.02) apart
  with pytest.raises(ValueError, match="not a stage-1"):
    main_lib.run(load_config("dd2_digits", f"tiny=True,vq={vq},teacher={adapted},tune={adapted}"),
                 str(tmp_path / "bad"), "train")


@pytest.mark.slow   # the engine path is the LlamaGen teacher's; the denoiser has its own test
def test_continuous_teacher_chain_tunes_distils_and_samples(tmp_path):
  """kl -> cache -> ar_diffusion (teacher) -> dd2_tune_ar -> dd2_ar -> one-step samples."""
  kl, teacher, tune, dd2 = (str(tmp_path / n) for n in ("kl", "teacher", "tune", "dd2"))
  kl_config = load_config("kl_digits", "tiny")
  main_lib.run(kl_config, kl, "train")
  main_lib.run(kl_config, kl, "cache")
  main_lib.run(load_config("ar_diffusion_digits", f"tiny=True,kl={kl}"), teacher, "train")
  main_lib.run(load_config("dd2_tune_ar_digits", f"tiny=True,kl={kl},teacher={teacher}"), tune,
               "train")
  config = load_config("dd2_ar_digits", f"tiny=True,kl={kl},teacher={teacher},tune={tune}")
  main_lib.run(config, dd2, "train")
  assert main_lib.run(config, dd2, "sample")["num_images"] == config.sample.num_samples
  s, g = checkpoint.restore_run_params(tune), checkpoint.restore_run_params(dd2)
  assert "diffloss" in g and set(g) == set(s)
