"""Shared test helpers: load configs by path, tiny experiments."""
from __future__ import annotations

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, arg: str | None = None):
  """`get_config(arg)` of configs/<name>.py, unlocked so tests can edit it."""
  from ardiff_jax import configlib  # pylint: disable=g-import-not-at-top
  return configlib.load_config(os.path.join(REPO, "configs", f"{name}.py"), arg)


def perturb_head_outputs(params, scale: float = 0.05):
  """Adds noise to a DiffLoss head's zero-initialised output layers, so that samples depend on
  the conditions (at init the head predicts ε̂ = 0 whatever it is given)."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree_util.tree_map_with_path(
      lambda p, x: x + scale * jax.random.normal(jax.random.key(len(str(p))), x.shape)
      if "final_linear" in str(p) or "adaLN" in str(p) else x, params)


def cache_test_split(config, workdir: str, cache_dir: str, batch_size: int = 8):
  """`--mode cache` of the test split of the run in `workdir` into `cache_dir`; returns
  (the number of records written, the first batch the `cached` source reads back)."""
  from ardiff_jax import main  # pylint: disable=g-import-not-at-top
  from ardiff_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  config.cache.dir = cache_dir
  config.cache.splits = ("test",)
  counts = main.run(config, workdir, "cache")
  assert counts["test"] == pipeline.num_examples(config.data, "test")
  cached = config.data.copy_and_resolve_references()
  cached.source, cached.path = "cached", cache_dir
  return counts, next(iter(pipeline.make_dataset(cached, split="test", seed=0,
                                                 batch_size=batch_size, train=False)))


def write_hf_folder(folder, state_dict: dict, config: dict, weights: str = "model.safetensors") -> str:
  """A Hugging Face checkpoint folder as `save_pretrained` writes it: config.json and the tensors
  (HF names) as model.safetensors or a torch zip pytorch_model.bin. -> the folder's path."""
  import json  # pylint: disable=g-import-not-at-top
  from ardiff_jax.data import safetensors  # pylint: disable=g-import-not-at-top
  from tests.evals import torch_files  # pylint: disable=g-import-not-at-top
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "config.json"), "w") as fh:
    json.dump(config, fh)
  if weights == "model.safetensors":
    safetensors.write_safetensors(os.path.join(folder, weights), state_dict, metadata={"format": "pt"})
  else:
    torch_files.save_zip(os.path.join(folder, weights), state_dict)
  return str(folder)
