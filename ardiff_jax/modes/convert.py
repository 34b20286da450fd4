"""`--mode convert`: a released PyTorch file -> a run directory of this config.

    python -m ardiff_jax.main --config configs/kl16_imagenet256.py --workdir OUT --mode convert \\
        --config.convert.source=kl16.ckpt

The method's converter (`ardiff_jax/convert/`, `convert.CONVERTERS`) maps every tensor of the file
it knows onto the run's parameter tree, all or nothing; parts the file does not hold (e.g. a
tokenizer's discriminator) keep their fresh initialisation. The run is written as training would
leave it at step 0: config.json and an orbax checkpoint whose `params` and `ema_params` are the
converted weights (or the file's own EMA weights where it holds them apart; optimizer state
fresh), so `--mode sample`, `eval`, `cache` and further
training read it as any run. `convert.key` picks the file's entry that holds the state dict
(default per converter, e.g. "model"). Nothing is downloaded; an existing run is never
overwritten.
"""
from __future__ import annotations

import importlib

import jax
import ml_collections
from absl import logging
from etils import epath

from ardiff_jax import configlib
from ardiff_jax.convert import CONVERTERS
from ardiff_jax.train import checkpoint
from ardiff_jax.train.experiment import build_experiment
from ardiff_jax.train.loop import write_config
from ardiff_jax.train.state import init_state


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  if config.method not in CONVERTERS:
    raise ValueError(f"--mode convert: no converter for method {config.method!r}; converters "
                     f"exist for {sorted(CONVERTERS)}")
  ckpt_dir = epath.Path(checkpoint.checkpoint_dir(workdir))
  if ckpt_dir.exists() and any(ckpt_dir.iterdir()):
    raise ValueError(f"--workdir {workdir} already holds a run ({ckpt_dir} is not empty): "
                     "convert into a new directory")
  exp = build_experiment(config)
  converter = importlib.import_module(f"ardiff_jax.convert.{CONVERTERS[config.method]}")
  converted = converter.params_from_file(config.convert.source, config.convert.key,
                                         exp.abstract_state.params)
  state = init_state(config.seed, exp.method, exp.tx, exp.shardings)
  params = jax.device_get(state.params)
  del state
  params = {**params, **converted}
  state = init_state(config.seed, exp.method, exp.tx, exp.shardings, params)
  ema_of = getattr(converter, "ema_params_from_file", None)
  ema = ema_of(config.convert.source, config.convert.key, exp.abstract_state.params) if ema_of else None
  if ema is not None:                 # the file's own EMA (else the EMA starts as the weights)
    ema = {**jax.device_get(state.ema_params), **ema}
    state = state.replace(ema_params=jax.device_put(ema, exp.shardings.ema_params))
  manager = checkpoint.make_manager(workdir, async_save=False)
  write_config(config, workdir)
  checkpoint.save(manager, 0, state, None, configlib.to_dict(config), force=True)
  manager.wait_until_finished()
  logging.info("converted %s into %s (step 0): %s", config.convert.source, workdir,
               ", ".join(sorted(converted)))
  return {"workdir": workdir, "source": config.convert.source, "converted": sorted(converted)}
