"""`--mode train`: the engine's loop (train/loop.py), with the evaluator every `eval.every_steps`."""
from __future__ import annotations

import ml_collections

from ardiff_jax.train.loop import train_and_evaluate
from ardiff_jax.train.state import TrainState


def run(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains (resuming from the newest checkpoint in `workdir`); returns the final state."""
  evaluate = None
  if config.eval.every_steps:
    from ardiff_jax.modes import eval as eval_mode  # pylint: disable=g-import-not-at-top
    evaluate = lambda params, step: eval_mode.run(config, workdir, params=params, step=step)
  return train_and_evaluate(config, workdir, evaluate)
