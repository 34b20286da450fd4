"""`--mode aot`: compile the real train step for a TPU pod on this (CPU) machine, and report what
one step needs per chip: memory (arguments, temporaries, outputs), FLOPs, and the step time those
FLOPs imply at the chip's peak.

    python -m ardiff_jax.main --config configs/mar_imagenet256.py:model=huge --workdir W \
        --mode aot --config.aot.topology=v5e:16x16 --config.mesh.shape=-1,16,1

Needs libtpu (`pip install -e ".[tpu]"`), which provides the compiler; no TPU is needed or used.
The step is the one `--mode train` runs (same method, optimizer, mesh rules, remat and scan
switches), traced on abstract inputs: nothing is allocated. Writes `<workdir>/aot/<topology>.json`.

FLOPs are the step's matmuls and convolutions counted on its jaxpr (`bench.traced_flops`: a
scanned layer stack counts every layer, rematerialised forwards included), split evenly over the
chips. XLA's own per-chip count is kept as `xla_flops_per_chip`; it counts a loop body once, so
with `scan_layers` it reports about one layer's work.
Caveats: the implied time counts FLOPs only (a lower bound; no communication or memory-bound
time), and memory is XLA's static estimate for one chip.
"""
from __future__ import annotations

import json
import os
import time

import jax
import ml_collections
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from ardiff_jax.modes import bench
from ardiff_jax.parallel import sharding as shd
from ardiff_jax.train.experiment import build_experiment
from ardiff_jax.train.state import jit_train_step


def topology_devices(topology: str) -> list:
  """The devices of a named TPU topology, e.g. "v5e:16x16" or "v4:4x4x4" (needs libtpu)."""
  if not topology:
    raise ValueError("--mode aot needs a TPU topology: --config.aot.topology=v5e:16x16 (chip "
                     "generation and slice shape, as in gcloud's --accelerator-type)")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  # Compiling needs no TPU, so several compilations (or a test beside a run) may share the host.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    return list(topologies.get_topology_desc(topology, "tpu").devices)
  except Exception as e:  # pylint: disable=broad-except
    raise RuntimeError(
        f"cannot describe TPU topology {topology!r} ({type(e).__name__}: {e}). Install the TPU "
        "compiler with `pip install -e \".[tpu]\"` and name a topology such as v5e:4x4, "
        "v5e:16x16, v4:2x2x2 or v5p:4x4x4") from e


def abstract_batch(config: ml_collections.ConfigDict, batch_keys, mesh) -> dict:
  """Shape-only global batch for the method's keys, sharded along the batch axis."""
  data = shd.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=data)
          for k, (shape, dtype) in bench.batch_shapes(config, batch_keys,
                                                      config.train.batch_size).items()}


def memory_report(compiled) -> dict:
  """Per-chip bytes from XLA's memory analysis."""
  m = compiled.memory_analysis()
  get = lambda name: int(getattr(m, name, 0) or 0)
  report = {"argument_bytes": get("argument_size_in_bytes"), "output_bytes": get("output_size_in_bytes"),
            "temp_bytes": get("temp_size_in_bytes"), "alias_bytes": get("alias_size_in_bytes"),
            "code_bytes": get("generated_code_size_in_bytes")}
  # Donated state buffers are aliased into the outputs: count them once.
  report["total_bytes"] = (report["argument_bytes"] + report["output_bytes"] + report["temp_bytes"]
                           - report["alias_bytes"])
  return report


def _write(result: dict, workdir: str, topology: str) -> str:
  os.makedirs(os.path.join(workdir, "aot"), exist_ok=True)
  path = os.path.join(workdir, "aot", f"{topology.replace(':', '_')}.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=2)
  return path


def abstract_frozen(method, mesh):
  """Shapes of the frozen weights a method's loss reads (`init_frozen` traced, nothing
  materialised), replicated on the mesh; None when its loss reads none."""
  if not method.loss_reads_frozen:
    return None
  if method.init_frozen is None:
    raise ValueError(f"method {method.name!r} reads frozen weights in its loss but has no "
                     "init_frozen to give their shapes")
  replicated = NamedSharding(mesh, P())
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                      jax.eval_shape(method.init_frozen, jax.random.key(0)))


def _compile_step(config: ml_collections.ConfigDict, devices) -> tuple:
  """(experiment, {"fits", "compile_s", and when it fits "memory_per_chip", "flops_per_step",
  "xla_flops_per_chip"} or the compiler's refusal as "error") of the train step on `devices`."""
  exp = build_experiment(config, devices=devices)
  step = jit_train_step(exp.method, exp.tx, exp.schedule, config, exp.mesh, exp.shardings)
  batch = abstract_batch(config, exp.method.batch_keys, exp.mesh)
  frozen = abstract_frozen(exp.method, exp.mesh)
  t0 = time.time()
  lowered = step.lower(exp.abstract_state, batch, frozen)
  try:
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    # The TPU compiler refuses a program that cannot fit in HBM: that is the answer.
    return exp, {"fits": False, "compile_s": time.time() - t0,
                 "error": str(e).strip().splitlines()[0][:500]}
  return exp, {"fits": True, "compile_s": time.time() - t0,
               "memory_per_chip": memory_report(compiled),
               "flops_per_step": bench.traced_flops(step, exp.abstract_state, batch, frozen),
               "xla_flops_per_chip": bench.compiled_flops(compiled)}


def condref_share(config: ml_collections.ConfigDict, devices, on: dict) -> dict:
  """Condition refinement's share of the step compiled with it (`on`, what `_compile_step`
  returned): the same step compiled with `condref.mode=off`, then 1 − off/on for the FLOPs and
  for the per-chip memory (total and temporaries). Empty when refinement is off."""
  off_config = bench.without_condref(config)
  if off_config is None or not on["fits"]:
    return {}
  _, off = _compile_step(off_config, devices)
  if not off["fits"]:
    return {"condref_mode": config.condref.mode, "condref_off_fits": False}
  share = lambda a, b: 1.0 - a / b if b else None
  mem_on, mem_off = on["memory_per_chip"], off["memory_per_chip"]
  return {"condref_mode": config.condref.mode,
          "condref_off_flops_per_step": off["flops_per_step"],
          "condref_flops_share": share(off["flops_per_step"], on["flops_per_step"]),
          "condref_off_memory_per_chip": mem_off,
          "condref_memory_share": share(mem_off["total_bytes"], mem_on["total_bytes"]),
          "condref_temp_memory_share": share(mem_off["temp_bytes"], mem_on["temp_bytes"])}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Compiles the train step for `aot.topology`; writes and returns `aot/<topology>.json`'s dict.
  With condition refinement on, the step is compiled a second time without it, and its FLOP and
  memory shares are reported (`condref_*`)."""
  devices = topology_devices(config.aot.topology)
  exp, compiled = _compile_step(config, devices)
  params = shd.count_params(exp.abstract_state.params)
  result = {
      "config_method": config.method, "topology": config.aot.topology,
      "device_kind": devices[0].device_kind, "num_chips": len(devices),
      "mesh": dict(exp.mesh.shape), "global_batch_size": config.train.batch_size,
      "num_params": params}
  result.update(compiled)
  if not compiled["fits"]:
    _write(result, workdir, config.aot.topology)
    print(f"{config.method} on {config.aot.topology}, mesh {dict(exp.mesh.shape)}, batch "
          f"{config.train.batch_size}: does not fit in one chip's memory.\n  {result['error']}\n"
          "  Shard more (a larger fsdp axis), lower the batch, or turn on remat / scan_layers.")
    return result
  flops_per_chip = result["flops_per_step"] / len(devices)
  peak = bench.peak_flops(devices[0])
  result.update({
      "flops_per_chip": flops_per_chip,
      "peak_flops_per_chip": peak,
      "step_s_at_peak": None if not (flops_per_chip and peak) else flops_per_chip / peak,
  })
  if result["step_s_at_peak"]:
    result["img_per_s_at_peak"] = config.train.batch_size / result["step_s_at_peak"]
  result.update(condref_share(config, devices, compiled))
  path = _write(result, workdir, config.aot.topology)
  gib = lambda n: n / 2**30
  mem = result["memory_per_chip"]
  print(f"{config.method} on {config.aot.topology} ({len(devices)} × {devices[0].device_kind}), "
        f"mesh {dict(exp.mesh.shape)}, batch {config.train.batch_size}: {params / 1e6:.1f}M params")
  print(f"  per chip: arguments {gib(mem['argument_bytes']):.2f} GiB, temporaries "
        f"{gib(mem['temp_bytes']):.2f} GiB, outputs {gib(mem['output_bytes']):.2f} GiB "
        f"(aliased {gib(mem['alias_bytes']):.2f}), total {gib(mem['total_bytes']):.2f} GiB")
  if flops_per_chip:
    line = f"  FLOPs per step {result['flops_per_step']:.3e} ({flops_per_chip:.3e} per chip)"
    if result["step_s_at_peak"]:
      line += (f"; at {peak / 1e12:.0f} TFLOP/s per chip: {result['step_s_at_peak'] * 1e3:.1f} ms "
               f"per step, {result['img_per_s_at_peak']:.0f} img/s")
    print(line)
  if "condref_flops_share" in result:
    print(f"  condition refinement ({result['condref_mode']}): {result['condref_flops_share']:.1%} "
          f"of the FLOPs, {result['condref_memory_share']:.1%} of the per-chip memory "
          f"({result['condref_temp_memory_share']:.1%} of the temporaries)")
  print(f"  compiled in {compiled['compile_s']:.0f} s; written to {path}")
  logging.info("aot result: %s", result)
  return result
