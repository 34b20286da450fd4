"""`--mode bench`: train-step and sampling throughput, compile time and MFU, as `bench.json`.

The train step is the real jitted, sharded step on one real data batch (reused, so the input
pipeline is not measured), or with `bench.synthetic_data` on a random batch of the same shapes
(speed only: a machine without the dataset, e.g. `configs/mar_imagenet256.py` on a GPU). FLOPs
are counted on the step's jaxpr (`traced_flops`); MFU divides achieved FLOP/s by the device's
peak dense bf16 FLOP/s where that peak is known, else it is null.
"""
from __future__ import annotations

import json
import math
import os
import time

import flax.linen as nn
import jax
from jax.extend import core as jex_core
import ml_collections
import numpy as np
from absl import logging

from ardiff_jax.methods import latent_tokens, vq_tokenizer
from ardiff_jax.parallel import sharding as shd
from ardiff_jax.train.experiment import build_experiment
from ardiff_jax.train.loop import train_data_iter
from ardiff_jax.train.state import frozen_for_training, init_state, jit_train_step

# Peak dense bf16 FLOP/s per device, from the vendors' data sheets.
PEAK_FLOPS = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6": 918e12,
    "TPU v5": 459e12,   # v5p reports itself as "TPU v5"; after "TPU v5 lite", which matches first
}


def peak_flops(device: jax.Device) -> float | None:
  kind = device.device_kind
  for name, peak in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return peak
  return None


def _eqn_flops(eqn) -> float:
  """Multiply-add FLOPs (2 per MAC) of one dot_general or convolution equation; 0 for others."""
  name = eqn.primitive.name
  if name == "dot_general":
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    (lc, _), (lb, _) = eqn.params["dimension_numbers"]
    contract = math.prod(lhs[i] for i in lc)
    batch = math.prod(lhs[i] for i in lb)
    return 2.0 * math.prod(lhs) * math.prod(rhs) / (contract * batch)   # 2·batch·M·N·K
  if name == "conv_general_dilated":
    rhs = eqn.invars[1].aval.shape
    out = eqn.outvars[0].aval.shape
    out_dim = eqn.params["dimension_numbers"].rhs_spec[0]
    # each output element: one MAC per kernel element of its group (rhs is [O, I/groups, *k])
    return 2.0 * math.prod(out) * math.prod(rhs) / rhs[out_dim]
  return 0.0


def jaxpr_flops(jaxpr) -> float:
  """Matmul and convolution FLOPs of a (closed) jaxpr, with every sub-jaxpr counted as often as it
  runs: a `scan` body `length` times (XLA's cost analysis counts a loop body once, so a step with
  `scan_layers` would report one layer's FLOPs), the costliest branch of a `cond`, a `while` body
  once (its trip count is not static). Global shapes: divide by the device count for a share."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    total += _eqn_flops(eqn)
    subs = [v for v in eqn.params.values() if isinstance(v, (jex_core.Jaxpr, jex_core.ClosedJaxpr))]
    branches = [jaxpr_flops(b) for b in eqn.params.get("branches", ())]
    if branches:
      total += max(branches)
    times = eqn.params["length"] if eqn.primitive.name == "scan" else 1
    total += times * sum(jaxpr_flops(sub) for sub in subs)
  return total


def traced_flops(fn, *args) -> float:
  """Matmul + convolution FLOPs of one call of `fn` on (abstract) `args`, all devices together,
  from its jaxpr (`jaxpr_flops`): rematerialised forwards are counted, elementwise work is not."""
  return jaxpr_flops(jax.make_jaxpr(fn)(*args))


def compiled_flops(compiled) -> float | None:
  """FLOPs of one call of a compiled function (per device under SPMD), from XLA's cost analysis."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def _time(fn, steps: int) -> float:
  t0 = time.perf_counter()
  for _ in range(steps):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / steps


def _measure_train_step(config: ml_collections.ConfigDict, local: dict):
  """(experiment, state after the timed steps, compile s, step s, FLOPs) of the real train step."""
  exp = build_experiment(config)
  state = init_state(config.seed, exp.method, exp.tx, exp.shardings)
  batch = shd.global_batch({k: local[k] for k in exp.method.batch_keys}, exp.mesh)
  step_fn = jit_train_step(exp.method, exp.tx, exp.schedule, config, exp.mesh, exp.shardings)
  frozen = frozen_for_training(exp.method, exp.mesh,
                               exp.method.init_frozen and (lambda: exp.method.init_frozen(
                                   jax.random.key(1))))
  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batch, frozen).compile()
  compile_time = time.perf_counter() - t0
  holder = {"state": state}

  def one_step():
    holder["state"], m = compiled(holder["state"], batch, frozen)
    return m

  _time(one_step, config.bench.warmup_steps)
  step_time = _time(one_step, config.bench.steps)
  return exp, holder["state"], compile_time, step_time, traced_flops(step_fn, state, batch, frozen)


def without_condref(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict | None:
  """The same config with condition refinement off, or None when it is off already: what the
  refinement's share of a step (here and in `--mode aot`) is measured against."""
  if "condref" not in config or config.condref.mode == "off":
    return None
  off = config.copy_and_resolve_references()
  off.condref.mode = "off"
  return off


def _condref_share(config: ml_collections.ConfigDict, local: dict, step_time: float) -> dict:
  """The condition refinement's share of the train step: 1 − t(refinement off) / t(on)."""
  off = without_condref(config)
  if off is None:
    return {}
  *_, off_time, _ = _measure_train_step(off, local)
  return {"condref_mode": config.condref.mode, "step_time_condref_off_s": off_time,
          "condref_step_share": 1.0 - off_time / step_time}


def batch_shapes(config: ml_collections.ConfigDict, batch_keys, batch_size: int) -> dict:
  """{key: (shape, dtype)} of a data batch of `batch_size` with the method's `batch_keys`."""
  b, size = batch_size, config.data.image_size
  shapes = {"image": ((b, size, size, 3), np.float32), "label": ((b,), np.int32),
            "index": ((b,), np.int32)}
  if "moments" in batch_keys:
    ae = latent_tokens.build_autoencoder(config)
    side = size // 2 ** (len(ae.enc_ch_mult) - 1)
    shapes["moments"] = ((b, side, side, 2 * ae.embed_dim), np.float32)
  if "codes" in batch_keys:
    side, _, _ = vq_tokenizer.code_geometry(config)
    views = int(config.data.views)
    shapes["codes"] = ((b, side, side) if views == 1 else (b, views, side, side), np.int32)
  missing = [k for k in batch_keys if k not in shapes]
  if missing:
    raise ValueError(f"the shapes of batch keys {missing} are not known here (modes/bench.py)")
  return {k: shapes[k] for k in batch_keys}


def synthetic_batch(config: ml_collections.ConfigDict, batch_keys, batch_size: int) -> dict:
  """A random host batch of `batch_shapes` (seeded): images in [-1, 1], moments with a small
  log-variance, labels and codes in range, indices 0..B−1. Only for timing."""
  rng = np.random.default_rng(config.seed)
  out = {}
  for k, (shape, dtype) in batch_shapes(config, batch_keys, batch_size).items():
    if k == "image":
      out[k] = rng.uniform(-1, 1, shape).astype(dtype)
    elif k == "moments":
      c = shape[-1] // 2
      out[k] = np.concatenate([rng.normal(size=shape[:-1] + (c,)),
                               np.full(shape[:-1] + (c,), -6.0)], -1).astype(dtype)
    elif k == "label":
      out[k] = rng.integers(0, config.data.num_classes, shape).astype(dtype)
    elif k == "codes":
      out[k] = rng.integers(0, vq_tokenizer.code_geometry(config)[2], shape).astype(dtype)
    else:
      out[k] = np.arange(shape[0], dtype=dtype)
  return out


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Measures the train step and the sampler; writes and returns `bench.json`'s dict."""
  if config.bench.get("synthetic_data", False):
    keys = build_experiment(config).method.batch_keys
    local = synthetic_batch(config, keys, config.train.batch_size // jax.process_count())
  else:
    local = next(train_data_iter(config))
  exp, state, compile_time, step_time, flops = _measure_train_step(config, local)
  result = {
      "method": config.method,
      "num_params": shd.count_params(state.params),
      "device": f"{jax.device_count()}x {jax.devices()[0].device_kind} ({jax.default_backend()})",
      "mesh": dict(exp.mesh.shape),
      "global_batch_size": config.train.batch_size,
      "compute_dtype": config.train.compute_dtype,
      "compile_time_s": compile_time,
      "step_time_s": step_time,
      "train_img_per_s": config.train.batch_size / step_time,
      "flops_per_step": flops,
      "mfu": None,
      "sample_img_per_s": None,
  }
  peak = peak_flops(jax.devices()[0])
  if flops and peak:
    result["mfu"] = flops / jax.device_count() / step_time / peak
  result.update(_condref_share(config, local, step_time))
  if exp.method.generate is not None:
    result.update(_bench_sampling(exp, exp.method.sampling_params(state.ema_params, state.extras),
                                  local, config))
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "bench.json"), "w") as f:
      json.dump(result, f, indent=2)
  logging.info("bench: %s", result)
  print(json.dumps(result, indent=2))
  return result


def _sampler_settings(config) -> dict:
  """The sampling settings that decide its cost, as configured."""
  out = {"cfg_scale": float(config.sample.cfg_scale)}
  for section in ("mar", "ar"):
    if section in config:
      for key in ("num_ar_steps", "num_sampling_steps", "cfg_schedule", "temperature"):
        if key in config[section]:
          out[key] = config[section][key]
  return out


def _bench_sampling(exp, params, local_batch, config) -> dict:
  """Throughput of `Method.generate` at `sample.batch_size` (generated images per second,
  the tokenizer's decode included; its weights are freshly initialised: only speed is measured),
  and of `Method.generate_tokens` (the generator without the decoder) where the method has one."""
  n = config.sample.batch_size
  if exp.method.generate_from == "labels":
    batch = {"label": (np.arange(n) % config.data.num_classes).astype(np.int32)}
  else:
    reps = -(-n // len(local_batch["label"]))
    batch = {k: np.concatenate([v] * reps)[:n] for k, v in local_batch.items()}
  frozen = exp.method.init_frozen(jax.random.key(1)) if exp.method.init_frozen else None
  rules = exp.rules

  def gen(p, f, b, r):
    with nn.logical_axis_rules(rules):
      return exp.method.generate(p, f, b, r)

  def timed(fn):
    """(compile time, seconds per call) of fn(params, frozen, batch, rng), jitted."""
    rng = jax.random.key(0)
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(params, frozen, batch, rng).compile()
    compile_time = time.perf_counter() - t0
    jax.block_until_ready(compiled(params, frozen, batch, rng))
    return compile_time, _time(lambda: compiled(params, frozen, batch, rng),
                               max(1, config.bench.steps // 2))

  compile_time, t = timed(gen)
  out = {"sample_img_per_s": n / t, "sample_batch_size": n, "sample_compile_time_s": compile_time,
         "sampler": _sampler_settings(config)}
  if exp.method.generate_tokens is not None:      # the generator alone, without the decoder

    def tokens(p, f, b, r):
      with nn.logical_axis_rules(rules):
        return exp.method.generate_tokens(p, f, b, r)

    out["sample_tokens_img_per_s"] = n / timed(tokens)[1]
  return out
