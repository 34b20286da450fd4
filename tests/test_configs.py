"""Every shipped config loads, and the paper-scale ones build the right models (abstractly)."""
import glob
import os

import jax
import numpy as np
import pytest

from ardiff_jax.train.loop import build_experiment
from tests.helpers import REPO, load_config

CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "configs", "*.py")))


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_with_its_defaults(name):
  config = load_config(name)
  assert config.method and config.train.num_steps > 0 and config.train.batch_size > 0


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
