"""Loading a local Hugging Face T5 / ByT5 directory (safetensors or pytorch_model.bin), torch-free,
checked against the float64 NumPy encoder on the very tensors written; the safetensors reader."""
import json
import struct

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from ardiff_jax.models import t5_checkpoint as convert
from ardiff_jax.data import safetensors
from tests.helpers import write_hf_folder
from tests.models.test_t5 import TINY, random_hf_state_dict, reference_encoder

CONFIG = {**{k: v for k, v in TINY.items() if k != "relative_attention_max_distance"},
          "relative_attention_max_distance": 6, "model_type": "t5", "num_decoder_layers": 1,
          "architectures": ["T5ForConditionalGeneration"]}


def _with_decoder(sd, seed=5):
  """The state dict of a whole T5ForConditionalGeneration: decoder and lm_head are ignored."""
  rng = np.random.default_rng(seed)
  extra = {"decoder.block.0.layer.0.SelfAttention.q.weight": rng.normal(size=(8, 16)),
           "decoder.final_layer_norm.weight": rng.normal(size=(16,)),
           "lm_head.weight": rng.normal(size=(40, 16))}
  return {**sd, **{k: v.astype(np.float32) for k, v in extra.items()}}


def _checkpoint(path, sd, config=CONFIG, weights="model.safetensors"):
  return write_hf_folder(path, sd, config, weights)


def _ids():
  ids = np.random.default_rng(1).integers(2, CONFIG["vocab_size"], size=(2, 11)).astype(np.int32)
  ids[0, 9:] = 0
  return ids, ids != 0


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_load_matches_numpy_forward(tmp_path, weights):
  sd = random_hf_state_dict(CONFIG, seed=2)
  model, params = convert.load_hf_t5_encoder(_checkpoint(tmp_path, _with_decoder(sd), weights=weights))
  assert (model.d_model, model.num_layers, model.relative_attention_max_distance) == (16, 2, 6)
  ids, mask = _ids()
  got = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(got), reference_encoder(sd, CONFIG, ids, mask),
                             rtol=2e-4, atol=2e-4)


def test_embed_tokens_name_and_bf16_checkpoint(tmp_path):
  sd = random_hf_state_dict(CONFIG, seed=3)
  sd["encoder.embed_tokens.weight"] = sd.pop("shared.weight")
  bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in sd.items()}
  model, params = convert.load_hf_t5_encoder(_checkpoint(tmp_path, bf16))
  np.testing.assert_array_equal(params["shared"]["embedding"],
                                bf16["encoder.embed_tokens.weight"].astype(np.float32))
  np.testing.assert_array_equal(params["block_1"]["attention"]["o"]["kernel"],
                                bf16["encoder.block.1.layer.0.SelfAttention.o.weight"].astype(np.float32).T)
  assert params["block_1"]["attention"]["o"]["kernel"].dtype == np.float32


def test_safetensors_round_trip_and_bf16_exact(tmp_path):
  special = np.array([0.0, -0.0, 1.0, -2.5, np.inf, -np.inf, 3.0e38, 1.0e-40, 7.1875], np.float32)
  bits = np.random.default_rng(0).integers(0, 2 ** 16, size=(3, 5), dtype=np.uint16)
  bits[(bits & 0x7F80) == 0x7F80] = 0x3F80        # keep NaN patterns out (NaN != NaN)
  tensors = {"f32": np.arange(12, dtype=np.float32).reshape(3, 4),
             "f16": np.linspace(-2, 2, 6).astype(np.float16),
             "i64": np.array([-1, 2 ** 40], np.int64), "i32": np.array([[7]], np.int32),
             "scalar": np.array(1.5, np.float32), "empty": np.zeros((0, 3), np.float32),
             "bf16": special.astype(ml_dtypes.bfloat16), "bf16_bits": bits.view(ml_dtypes.bfloat16)}
  path = str(tmp_path / "t.safetensors")
  safetensors.write_safetensors(path, tensors, metadata={"format": "pt"})
  got = safetensors.read_safetensors(path)
  assert set(got) == set(tensors)
  for k in ("f32", "f16", "i64", "i32", "scalar", "empty"):
    assert got[k].dtype == tensors[k].dtype and got[k].shape == tensors[k].shape
    np.testing.assert_array_equal(got[k], tensors[k])
  for k in ("bf16", "bf16_bits"):
    assert got[k].dtype == np.float32
    np.testing.assert_array_equal(got[k], tensors[k].astype(np.float32))
  np.testing.assert_array_equal(got["bf16_bits"].view(np.uint32) >> 16, bits)
  assert set(safetensors.read_safetensors(path, ["i32", "nope"])) == {"i32"}


def test_safetensors_errors(tmp_path):
  path = tmp_path / "t.safetensors"
  safetensors.write_safetensors(str(path), {"a": np.ones((4, 4), np.float32)})
  data = path.read_bytes()
  cut = tmp_path / "cut.safetensors"
  cut.write_bytes(data[:-8])
  with pytest.raises(ValueError, match="'a' ends at byte .* truncated"):
    safetensors.read_safetensors(str(cut))
  cut.write_bytes(data[:20])
  with pytest.raises(ValueError, match="truncated"):
    safetensors.read_safetensors(str(cut))
  cut.write_bytes(data[:5])
  with pytest.raises(ValueError, match="too short"):
    safetensors.read_safetensors(str(cut))
  header = json.dumps({"a": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}).encode()
  bad = tmp_path / "bad.safetensors"
  bad.write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0")
  with pytest.raises(ValueError, match="'a' has dtype 'F8_E4M3'"):
    safetensors.read_safetensors(str(bad))
  with pytest.raises(ValueError, match="cannot be written"):
    safetensors.write_safetensors(str(bad), {"c": np.ones(2, np.complex64)})


def test_loader_errors(tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(ValueError, match="nowhere.* not a directory.*config.json and model.safetensors "
                                       "or pytorch_model.bin.*nothing is downloaded"):
    convert.load_hf_t5_encoder(str(missing))
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ValueError, match="config.json' does not exist"):
    convert.load_hf_t5_encoder(str(empty))
  (empty / "config.json").write_text(json.dumps(CONFIG))
  with pytest.raises(ValueError, match="holds none of .*model.safetensors"):
    convert.load_hf_t5_encoder(str(empty))

  sd = random_hf_state_dict(CONFIG)
  gone = "encoder.block.1.layer.0.SelfAttention.k.weight"
  d = tmp_path / "missing_tensor"
  d.mkdir()
  with pytest.raises(ValueError, match=f"missing tensor {gone}"):
    convert.load_hf_t5_encoder(_checkpoint(d, {k: v for k, v in sd.items() if k != gone}))
  d = tmp_path / "bad_shape"
  d.mkdir()
  wrong = "encoder.block.0.layer.1.DenseReluDense.wo.weight"
  with pytest.raises(ValueError, match=rf"tensor {wrong} has shape \[24, 16\], expected \[16, 24\]"):
    convert.load_hf_t5_encoder(_checkpoint(d, {**sd, wrong: sd[wrong].T.copy()}))
  d = tmp_path / "umt5_like"
  d.mkdir()
  extra = "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"
  with pytest.raises(ValueError, match=f"unexpected tensors.*{extra}"):
    convert.load_hf_t5_encoder(_checkpoint(d, {**sd, extra: np.ones((8, 2), np.float32)}))
  d = tmp_path / "bad_dtype"
  d.mkdir()
  header = json.dumps({"shared.weight": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}).encode()
  (d / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
  (d / "config.json").write_text(json.dumps(CONFIG))
  with pytest.raises(ValueError, match="'shared.weight' has dtype 'C64'"):
    convert.load_hf_t5_encoder(str(d))


def test_sharded_safetensors_index(tmp_path):
  sd = random_hf_state_dict(CONFIG, seed=4)
  names = sorted(sd)
  shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
            "model-00002-of-00002.safetensors": names[len(names) // 2:]}
  for file, keys in shards.items():
    safetensors.write_safetensors(str(tmp_path / file), {k: sd[k] for k in keys})
  weight_map = {k: f for f, keys in shards.items() for k in keys}
  weight_map["decoder.final_layer_norm.weight"] = "model-00003-of-00003.safetensors"  # never read
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  (tmp_path / "config.json").write_text(json.dumps(CONFIG))
  _, params = convert.load_hf_t5_encoder(str(tmp_path))
  np.testing.assert_array_equal(params["final_layer_norm"]["weight"], sd["encoder.final_layer_norm.weight"])
  np.testing.assert_array_equal(params["block_0"]["ffn"]["wi_1"]["kernel"],
                                sd["encoder.block.0.layer.1.DenseReluDense.wi_1.weight"].T)
