"""The Flax FID InceptionV3 and the converter of pytorch-fid's weights file."""
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from ardiff_jax.convert import inception as convert
from ardiff_jax.convert import torch_pickle
from ardiff_jax.evals import inception
from tests.evals import inception_spec, torch_files


def _synthetic_state_dict(seed=0):
  rng = np.random.default_rng(seed)
  sd = {}
  for key, shape in inception_spec.state_dict_shapes().items():
    if key.endswith("num_batches_tracked"):
      sd[key] = np.array(7, np.int64)
    elif key.endswith("running_var"):
      sd[key] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    else:
      sd[key] = (0.05 * rng.normal(size=shape)).astype(np.float32)
  return sd


def test_output_shapes_and_parameter_count():
  variables = jax.eval_shape(inception.init_variables)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))
  # torchvision's Inception3 has 27,161,264 parameters; without the aux head and with 1008
  # classes that is the spec's count, written out independently in inception_spec.py.
  assert n == inception_spec.num_trainable() == 23_850_960
  out = jax.eval_shape(lambda v, x: inception.InceptionV3().apply(v, x), variables,
                       jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.uint8))
  assert out["pool"].shape == (2, 2048)
  assert out["logits"].shape == out["logits_unbiased"].shape == (2, 1008)


@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_torch_files_read_without_torch(tmp_path, layout):
  sd = {"a.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 4), "b.count": np.array(5, np.int64)}
  path = str(tmp_path / f"w_{layout}.pth")
  (torch_files.save_zip if layout == "zip" else torch_files.save_legacy)(path, sd)
  got = torch_pickle.load_state_dict(path)
  assert set(got) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(got[k], sd[k])
    assert got[k].dtype == sd[k].dtype


def test_torch_reader_refuses_foreign_globals(tmp_path):
  path = str(tmp_path / "evil.pth")
  with open(path, "wb") as f:
    pickle.dump(0x1950A86A20F9469CFC6C, f)
    pickle.dump(1001, f)
    pickle.dump({}, f)
    pickle.dump(print, f)   # a global outside a state dict's vocabulary
  with pytest.raises(pickle.UnpicklingError, match="refusing"):
    torch_pickle.load_state_dict(path)


def test_converter_maps_standard_names_and_layouts(tmp_path):
  sd = _synthetic_state_dict()
  src, dst = str(tmp_path / "pt_inception.pth"), str(tmp_path / "inception.npz")
  torch_files.save_legacy(src, sd)
  convert.convert_file(src, dst)
  variables = inception.load_inception(dst)
  flat = traverse_util.flatten_dict(variables, sep="/")
  # conv OIHW -> HWIO, fc [out, in] -> [in, out], BatchNorm affine -> params, stats -> batch_stats.
  np.testing.assert_array_equal(flat["params/Mixed_6b/branch7x7_2/conv/kernel"],
                                sd["Mixed_6b.branch7x7_2.conv.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(flat["params/fc/kernel"], sd["fc.weight"].T)
  np.testing.assert_array_equal(flat["params/Mixed_7c/branch_pool/bn/scale"],
                                sd["Mixed_7c.branch_pool.bn.weight"])
  np.testing.assert_array_equal(flat["batch_stats/Conv2d_1a_3x3/bn/var"],
                                sd["Conv2d_1a_3x3.bn.running_var"])
  assert len(flat) == len([k for k in sd if not k.endswith("num_batches_tracked")])


def test_converter_rejects_a_different_network(tmp_path):
  sd = _synthetic_state_dict()
  sd["fc.weight"] = sd["fc.weight"][:1000]   # torchvision's 1000-class head, not the FID graph
  del sd["Mixed_5b.branch1x1.conv.weight"]
  with pytest.raises(ValueError, match="missing Mixed_5b.branch1x1.conv.weight"):
    convert.convert_state_dict(sd)


def test_missing_weights_file_says_how_to_convert(tmp_path):
  with pytest.raises(FileNotFoundError, match="convert.inception"):
    inception.load_inception(str(tmp_path / "nothing.npz"))


def test_forward_pass_of_converted_weights_is_finite(tmp_path):
  sd = _synthetic_state_dict(1)
  src, dst = str(tmp_path / "w.pth"), str(tmp_path / "w.npz")
  torch_files.save_zip(src, sd)
  convert.convert_file(src, dst)
  variables = inception.load_inception(dst)
  images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  out = jax.jit(inception.InceptionV3().apply)(variables, images)
  assert np.isfinite(np.asarray(out["pool"])).all()
  assert (np.asarray(out["pool"]) >= 0).all()   # average of ReLU outputs
  np.testing.assert_allclose(np.asarray(out["logits"]) - np.asarray(out["logits_unbiased"]),
                             np.broadcast_to(sd["fc.bias"], (2, 1008)), rtol=1e-5, atol=1e-5)
