"""Every shipped config loads, and the paper-scale ones build the right models (abstractly)."""
import glob
import json
import os

import jax
import numpy as np
import pytest

from ardiff_jax.train.experiment import build_experiment
from tests import config_fixtures
from tests.helpers import REPO, load_config

CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "configs", "*.py")))


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_with_its_defaults(name):
  config = load_config(name)
  assert config.method and config.train.num_steps > 0 and config.train.batch_size > 0


with open(config_fixtures.FIXTURE) as _f:
  FROZEN = json.load(_f)


@pytest.mark.parametrize("name,arg", config_fixtures.cases(),
                         ids=[config_fixtures.key(n, a) for n, a in config_fixtures.cases()])
def test_config_resolves_to_its_frozen_config_json(name, arg):
  """Each config, with its main argument variants, gives the frozen config.json field by field
  (rewrite tests/fixtures/configs.json with `python -m tests.config_fixtures` after an intended
  change, and review the diff)."""
  want = FROZEN.get(config_fixtures.key(name, arg))
  assert want is not None, "new config: add it with `python -m tests.config_fixtures`"
  assert config_fixtures.resolve(name, arg) == want


def _num_params(config) -> int:
  exp = build_experiment(config)
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(exp.abstract_state.params))


@pytest.mark.parametrize("model,want", [("base", 207.9e6), ("large", 478.3e6), ("huge", 942.4e6)])
def test_mar_imagenet_configs_build_the_papers_models(model, want):
  config = load_config("mar_imagenet256", f"model={model}")
  assert config.optim.lr == pytest.approx(8e-4) and config.optim.grad_clip_norm == 3.0
  assert abs(_num_params(config) / want - 1) < 0.005


def test_ar_imagenet_config_uses_llamagen_sizes():
  config = load_config("ar_diffusion_imagenet256", "model=b")
  exp = build_experiment(config)
  params = exp.abstract_state.params
  assert len([k for k in params if k.startswith("layers_")]) == 12
  assert params["tok_embeddings"]["kernel"].shape == (16, 768)


def test_unknown_model_size_is_refused():
  with pytest.raises(ValueError, match="choose one of"):
    load_config("mar_imagenet256", "model=giant")


@pytest.mark.parametrize("cpu", [False, True])
def test_cifar10_mar_and_causal_ar_share_one_budget(cpu):
  """The CIFAR-10 comparison is at an equal budget: same tokens, steps, batch, optimiser,
  sampler settings and evaluation; only the generator differs."""
  arg = f"tok=kl_tiny,kl=K,steps=123,batch=32,cpu={cpu}"
  mar, ar = load_config("mar_cifar10", arg), load_config("ar_diffusion_cifar10", arg)
  for field in ("tokenizer", "data", "train", "optim", "sample", "eval"):
    assert mar[field].to_dict() == ar[field].to_dict(), field
  assert mar.mar.patch_size == ar.ar.patch_size == 2
  assert mar.mar.tokenizer_workdir == ar.ar.tokenizer_workdir == "K"
  assert mar.train.num_steps == 123 and mar.data.path == "K/cache"
  assert mar.eval.data.source == "folder" and mar.eval.feature_net.arch == "pooled"
  assert mar.optim.lr == (1e-3 if cpu else 1e-4 * 32 / 256)


def test_cifar10_llamagen_runs_at_the_comparison_budget():
  """LlamaGen's CPU row of the CIFAR-10 table trains, samples and evaluates as MAR's; only its
  tokens (VQ codes) and its recipe's optimiser (weight decay, clip) differ."""
  run = "steps=123,batch=32,cpu=True"
  lg = load_config("llamagen_cifar10", f"tok=vq_tiny,vq=V,{run}")
  mar = load_config("mar_cifar10", f"tok=kl_tiny,kl=K,{run}")
  for field in ("train", "sample", "eval"):
    assert lg[field].to_dict() == mar[field].to_dict(), field
  for field in ("lr", "warmup_steps", "schedule", "b1", "b2"):
    assert lg.optim[field] == mar.optim[field], field
  assert lg.data.path == "V/cache" and lg.data.source == "cached"
  assert lg.eval.data.source == "folder" and lg.tokenizer.preset == "vq_tiny"


@pytest.mark.parametrize("stage", ["adapt", "tune", "distil"])
def test_dd2_imagenet_stages_sit_on_the_llamagen_l_teacher(stage):
  """Each DD2 stage reads the teacher's own config (every shape fits LlamaGen-L's weights) and
  the paper's schedule: 200k / 100k / 12k iterations at batch 256 / 512 / 1024; the distillation
  at K = 5, rates 1e-4 (G) / 2e-4 (ψ) from 1e-6 over 8k / 40k, the progressive EMA."""
  c = load_config("dd2_llamagen_imagenet256", f"stage={stage}")
  teacher = load_config("llamagen_imagenet256", f"model=l,batch={c.train.batch_size}")
  assert c.llamagen.to_dict() == teacher.llamagen.to_dict()
  assert c.tokenizer.to_dict() == teacher.tokenizer.to_dict()
  want = {"adapt": ("dd2_adapt", 200_000, 256), "tune": ("dd2_tune", 100_000, 512),
          "distil": ("dd2", 12_000, 1024)}[stage]
  assert (c.method, c.train.num_steps, c.train.batch_size) == want
  if stage == "distil":
    assert (c.dd2.guidance_updates, c.optim.lr, c.dd2.guidance_lr) == (5, 1e-4, 2e-4)
    assert (c.optim.warmup_start, c.optim.warmup_steps, c.dd2.guidance_warmup) == (1e-6, 8000, 40000)
    assert c.train.ema_progressive and c.dd2.teacher_top_k == 8000 and c.dd2.alpha == 1.0
