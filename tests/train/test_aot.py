"""`--mode aot`: the real train step compiled for a TPU topology on a CPU machine (needs libtpu,
the `tpu` extra; skipped without it)."""
import importlib.util
import json
import os

import pytest

from ardiff_jax import main
from tests.helpers import load_config


def test_missing_topology_says_how_to_name_one(tmp_path):
  config = load_config("mar_digits", "tiny")
  config.tokenizer.latent_scale = 1.0
  with pytest.raises(ValueError, match="--config.aot.topology=v5e:16x16"):
    main.run(config, str(tmp_path), "aot")


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="needs the TPU compiler: pip install -e '.[tpu]'")
def test_tiny_mar_compiles_for_a_v5e_slice_and_fsdp_shards_the_state(tmp_path):
  results = {}
  for mesh in [(4, 1, 1), (1, 4, 1)]:
    config = load_config("mar_digits", "tiny")
    config.tokenizer.latent_scale = 1.0   # no cached latent statistics needed
    config.train.batch_size = 16
    config.aot.topology = "v5e:2x2"
    config.mesh.shape = mesh
    results[mesh] = main.run(config, str(tmp_path), "aot")
  data, fsdp = results[(4, 1, 1)], results[(1, 4, 1)]
  for r in (data, fsdp):
    assert r["num_chips"] == 4 and r["device_kind"].startswith("TPU v5")
    assert r["flops_per_step"] == pytest.approx(4 * r["flops_per_chip"])
    assert r["step_s_at_peak"] == pytest.approx(r["flops_per_chip"] / r["peak_flops_per_chip"])
    mem = r["memory_per_chip"]
    assert mem["argument_bytes"] > 0 and mem["temp_bytes"] > 0
  # FSDP shards the parameters and Adam moments that data parallelism replicates on every chip
  # (in this tiny model many are small norms and biases, which stay replicated).
  assert fsdp["memory_per_chip"]["argument_bytes"] < 0.75 * data["memory_per_chip"]["argument_bytes"]
  # The same model and global batch: the same work, up to the partitioning's own overheads.
  assert fsdp["flops_per_step"] == pytest.approx(data["flops_per_step"], rel=0.2)
  with open(os.path.join(tmp_path, "aot", "v5e_2x2.json")) as f:
    assert json.load(f)["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}


def test_abstract_batch_of_llamagen_is_its_code_grid():
  """The shape-only batch `--mode aot` compiles a LlamaGen step with: the VQ tokenizer's grid."""
  from ardiff_jax.modes import aot  # pylint: disable=g-import-not-at-top
  from ardiff_jax.train.experiment import build_experiment  # pylint: disable=g-import-not-at-top
  config = load_config("llamagen_digits", "tiny")
  exp = build_experiment(config)
  batch = aot.abstract_batch(config, exp.method.batch_keys, exp.mesh)
  assert batch["codes"].shape == (16, 8, 8) and batch["codes"].dtype == "int32"
  assert batch["label"].shape == (16,)


def test_condref_share_compiles_the_step_with_and_without_refinement():
  """The refinement's FLOP and memory shares come from the same step compiled twice (here for
  this machine's CPU, which needs no TPU compiler): the Sinkhorn work is counted, so the share
  of FLOPs is positive and below one."""
  import jax  # pylint: disable=g-import-not-at-top
  from ardiff_jax.modes import aot  # pylint: disable=g-import-not-at-top
  config = load_config("mar_digits", "tiny")
  config.tokenizer.latent_scale = 1.0
  config.condref.mode = "runtime"
  config.condref.update(num_points=32, num_reference=64, queue_size=128, push_per_step=32,
                        sinkhorn_iterations=10)
  devices = jax.devices()[:1]
  _, on = aot._compile_step(config, devices)   # pylint: disable=protected-access
  share = aot.condref_share(config, devices, on)
  assert 0.0 < share["condref_flops_share"] < 1.0
  assert share["condref_off_flops_per_step"] < on["flops_per_step"]
  assert "condref_memory_share" in share
  config.condref.mode = "off"
  assert aot.condref_share(config, devices, on) == {}


def test_synthetic_bench_batch_has_the_compiled_shapes():
  """`bench.synthetic_data` times the step on a random batch of exactly the shapes `--mode aot`
  compiles, with labels and codes in range (a lent GPU needs no dataset)."""
  from ardiff_jax.methods import vq_tokenizer  # pylint: disable=g-import-not-at-top
  from ardiff_jax.modes import aot, bench  # pylint: disable=g-import-not-at-top
  from ardiff_jax.train.experiment import build_experiment  # pylint: disable=g-import-not-at-top
  for name in ("llamagen_digits", "mar_digits"):
    config = load_config(name, "tiny")
    config.tokenizer.latent_scale = 1.0
    if "condref" in config:
      config.condref.mode = "runtime"      # its batches carry the examples' ids
    exp = build_experiment(config)
    batch = bench.synthetic_batch(config, exp.method.batch_keys, 16)
    spec = aot.abstract_batch(config, exp.method.batch_keys, exp.mesh)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        k: (v.shape, v.dtype) for k, v in spec.items()}
    assert 0 <= batch["label"].min() and batch["label"].max() < config.data.num_classes
    if "codes" in batch:
      assert batch["codes"].max() < vq_tokenizer.code_geometry(config)[2]
