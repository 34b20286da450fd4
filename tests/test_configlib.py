import pytest

from ardiff_jax import configlib


def test_parse_arg_types_and_flags():
  a = configlib.parse_arg("steps=12,lr=0.5,tiny,name=x", steps=1, lr=1.0, tiny=False, name="")
  assert a.steps == 12 and isinstance(a.steps, int)
  assert a.lr == 0.5 and a.tiny is True and a.name == "x"
  assert configlib.parse_arg(None, steps=3).steps == 3


def test_parse_arg_rejects_unknown_key_with_valid_list():
  with pytest.raises(ValueError, match=r"unknown config argument 'stpes'.*\['steps'\]"):
    configlib.parse_arg("stpes=3", steps=1)


def test_parse_arg_rejects_bad_value():
  with pytest.raises(ValueError, match="steps=.*expected int"):
    configlib.parse_arg("steps=abc", steps=1)


def test_base_config_has_the_shared_fields():
  c = configlib.base_config()
  for field in ("seed", "train.num_steps", "train.batch_size", "train.log_every", "train.ckpt_every",
                "train.keep_checkpoints", "data.source", "data.path", "data.image_size", "mesh.shape",
                "sample.num_samples", "sample.cfg_scale", "eval.num_samples", "eval.source",
                "bench.steps", "aot.topology", "nan_policy"):
    node = c
    for part in field.split("."):
      node = node[part]
