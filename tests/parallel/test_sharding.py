import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ardiff_jax import configlib
from ardiff_jax.parallel import mesh as mesh_lib
from ardiff_jax.parallel import sharding as shd


def test_resolve_shape_fills_minus_one():
  assert mesh_lib.resolve_shape((-1, 2, 1), 8) == (4, 2, 1)
  assert mesh_lib.resolve_shape((2, 2, 2), 8) == (2, 2, 2)


@pytest.mark.parametrize("shape,msg", [((-1, -1, 1), "at most one axis"),
                                       ((3, 1, 1), "3 devices but 8"),
                                       ((-1, 3, 1), "not divisible by 3")])
def test_resolve_shape_errors(shape, msg):
  with pytest.raises(ValueError, match=msg):
    mesh_lib.resolve_shape(shape, 8)


def test_logical_to_mesh_spec_replicates_indivisible_dims():
  mesh = mesh_lib.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
  rules = configlib.DEFAULT_RULES
  assert shd.logical_to_mesh_spec(("embed", "mlp"), (64, 128), mesh, rules) == P("fsdp", "tensor")
  # 3 output channels cannot be split over fsdp=2: replicated instead of an error.
  assert shd.logical_to_mesh_spec((None, None, "conv_in", "conv_out"), (3, 3, 8, 3), mesh, rules) == P()
  # The batch takes both data axes when they divide it, one when only that divides.
  assert shd.logical_to_mesh_spec(("batch",), (8,), mesh, rules) == P(("data", "fsdp"))
  assert shd.logical_to_mesh_spec(("batch",), (2,), mesh, rules) == P("data")
  # A mesh axis is used once per array.
  assert shd.logical_to_mesh_spec(("embed", "embed"), (8, 8), mesh, rules) == P("fsdp")


def test_global_batch_is_split_over_data_axes():
  mesh = mesh_lib.make_mesh((4, 2, 1), ("data", "fsdp", "tensor"))
  x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  g = shd.global_batch({"x": x}, mesh)["x"]
  assert g.shape == (16, 3)
  assert len({str(s.index) for s in g.addressable_shards}) == 8
  np.testing.assert_array_equal(np.asarray(g), x)
