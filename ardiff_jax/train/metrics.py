"""Metric writing: `metrics.jsonl` (one JSON object per logged step) and TensorBoard events.

Only process 0 writes; other processes get a writer that does nothing. A workdir may be a URL
(`gs://bucket/run`, through etils.epath): metrics.jsonl is then rewritten whole at each write
(object stores cannot append) and TensorBoard events are not written.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import numpy as np
from etils import epath


def is_remote(path: str) -> bool:
  """True for a URL workdir such as gs://bucket/run (object store, no appends or renames)."""
  return "://" in str(path)


def _to_python(v: Any) -> Any:
  v = np.asarray(v)
  if v.size != 1:
    return v.tolist()
  v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)  # JSON has no NaN/inf; keep the information as text
  return v


class MetricWriter:
  """Appends `{"step": ..., **scalars}` lines to <workdir>/metrics.jsonl and TensorBoard events."""

  def __init__(self, workdir: str, tensorboard: bool = True):
    self.active = jax.process_index() == 0
    self._tb = None
    if not self.active:
      return
    self._remote = is_remote(workdir)
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    self._path = os.path.join(workdir, "metrics.jsonl")
    self._lines = []
    if self._remote:
      target = epath.Path(self._path)
      self._lines = target.read_text().splitlines(keepends=True) if target.exists() else []
      tensorboard = False
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict[str, Any]) -> dict[str, Any]:
    row = {"step": int(step), **{k: _to_python(v) for k, v in sorted(scalars.items())}}
    if not self.active:
      return row
    line = json.dumps(row) + "\n"
    if self._remote:
      self._lines.append(line)
      epath.Path(self._path).write_text("".join(self._lines))
    else:
      with open(self._path, "a") as f:
        f.write(line)
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, step)
      self._tb.flush()
    return row

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  path = epath.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
