"""The Flax FID InceptionV3 (against a float64 NumPy reference), the converter of pytorch-fid's
weights file, and FID on Gaussians with closed forms."""
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.signal
import threadpoolctl
from flax import traverse_util

from ardiff_jax.convert import inception as convert
from ardiff_jax.data import torch_pickle
from ardiff_jax.evals import inception
from ardiff_jax.evals import metrics as M
from tests.evals import inception_numpy as ref
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


# --- The Flax blocks against an independent float64 NumPy reference (tests/evals/inception_numpy.py).


def _random_variables(shapes, seed):
  """Random float32 values for a variables tree of shapes, by leaf name: kernels N(0, 1/fan_in),
  BatchNorm scale U(0.5, 1.5), bias and running mean N(0, 0.3²), running var U(0.2, 1.5)."""
  rng = np.random.default_rng(seed)
  values = {}
  for path, leaf in sorted(traverse_util.flatten_dict(shapes).items()):
    shape, name = tuple(leaf.shape), path[-1]
    if name == "kernel":
      values[path] = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
    elif name == "scale":
      values[path] = rng.uniform(0.5, 1.5, shape)
    elif name == "var":
      values[path] = rng.uniform(0.2, 1.5, shape)
    elif name in ("bias", "mean"):
      values[path] = 0.3 * rng.standard_normal(shape)
    else:
      raise KeyError(f"no random rule for {'/'.join(path)}")
    values[path] = values[path].astype(np.float32)
  return traverse_util.unflatten_dict(values)


def _numpy_reference(fn, *args, **kwargs):
  """The float64 reference with single-threaded BLAS: on a shared 2-core machine OpenBLAS's spinning
  threads made the full network 1-30 s instead of 0.6 s."""
  with threadpoolctl.threadpool_limits(1, "blas"):
    return fn(*args, **kwargs)


def _assert_close_float32(got, want):
  """float32 against float64: 1e-4 relative, and 1e-4 of the output's scale absolute."""
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


# kind: (Flax block, NumPy reference, input [B, H, W, Cin], output [B, Ho, Wo, Cout]). The modules fix
# their output channels (torchvision's); the input channels come from the input, so they are small.
# H != W catches a transposed (1, 7)/(7, 1) padding; H = 8 checks the floor in stride-2 VALID layers.
_BLOCKS = {
    "A": (lambda: inception.InceptionA(pool_features=32),
          lambda x, p: ref.inception_a(x, p, pool_features=32), (2, 5, 6, 16), (2, 5, 6, 256)),
    "B": (lambda: inception.InceptionB(), lambda x, p: ref.inception_b(x, p),
          (2, 8, 9, 16), (2, 3, 4, 384 + 96 + 16)),
    "C": (lambda: inception.InceptionC(channels_7x7=16),
          lambda x, p: ref.inception_c(x, p, channels_7x7=16), (2, 5, 6, 24), (2, 5, 6, 768)),
    "D": (lambda: inception.InceptionD(), lambda x, p: ref.inception_d(x, p),
          (2, 7, 9, 16), (2, 3, 4, 320 + 192 + 16)),
    "E_avg": (lambda: inception.InceptionE(max_pool=False),
              lambda x, p: ref.inception_e(x, p, pool="avg"), (2, 4, 5, 16), (2, 4, 5, 2048)),
    "E_max": (lambda: inception.InceptionE(max_pool=True),
              lambda x, p: ref.inception_e(x, p, pool="max"), (2, 4, 5, 16), (2, 4, 5, 2048)),
}


def test_numpy_reference_layers_on_hand_cases():
  """The reference's own layers: conv equals scipy's per-channel correlation (stride, asymmetric
  padding); avg pool divides by 4/6/9 valid elements, or by 9 when padding counts; max pool pads with
  -inf and stride-2 VALID floors; resize gives torch's align_corners=False values."""
  rng = np.random.default_rng(0)
  x, w = rng.standard_normal((2, 6, 7, 3)), rng.standard_normal((3, 2, 3, 4))
  got = ref.conv2d(x, w, stride=(2, 1), padding=((1, 2), (0, 1)))
  xp = np.pad(x, ((0, 0), (1, 2), (0, 1), (0, 0)))
  want = np.stack([np.stack([sum(scipy.signal.correlate2d(xp[b, :, :, c], w[:, :, c, o], mode="valid")
                                 for c in range(3))[::2] for o in range(4)], -1) for b in range(2)])
  assert got.shape == want.shape == (2, 4, 7, 4)
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)

  ones = np.ones((1, 4, 5, 1))
  np.testing.assert_array_equal(ref.avg_pool_3x3(ones, count_include_pad=False), ones)
  counted = ref.avg_pool_3x3(ones, count_include_pad=True)[0, :, :, 0] * 9
  np.testing.assert_allclose(counted, [[4, 6, 6, 6, 4], [6, 9, 9, 9, 6], [6, 9, 9, 9, 6], [4, 6, 6, 6, 4]])
  x = rng.standard_normal((1, 4, 5, 2))
  np.testing.assert_allclose(ref.avg_pool_3x3(x, count_include_pad=False)[0, 0, 0], x[0, :2, :2].mean((0, 1)))
  np.testing.assert_allclose(ref.avg_pool_3x3(x, count_include_pad=False)[0, 2, 3], x[0, 1:4, 2:5].mean((0, 1)))

  neg = -1.0 - rng.uniform(size=(1, 8, 9, 2))
  same = ref.max_pool_3x3(neg, stride=1, padding=1)
  assert same.shape == neg.shape and (same < 0).all()       # never the padding
  np.testing.assert_array_equal(same[0, 0, 0], neg[0, :2, :2].max((0, 1)))
  valid = ref.max_pool_3x3(neg, stride=2, padding=0)
  assert valid.shape == (1, 3, 4, 2)
  np.testing.assert_array_equal(valid[0, 2, 3], neg[0, 4:7, 6:9].max((0, 1)))

  up = ref.resize_bilinear(np.array([0.0, 1.0]).reshape(1, 1, 2, 1), 1, 4)
  np.testing.assert_allclose(up.ravel(), [0.0, 0.25, 0.75, 1.0])
  down = ref.resize_bilinear(np.arange(4.0).reshape(1, 4, 1, 1), 2, 1)
  np.testing.assert_allclose(down.ravel(), [0.5, 2.5])


@pytest.mark.parametrize("kind", list(_BLOCKS))
def test_block_matches_float64_numpy_reference(kind):
  """Each Inception block (A, B, C, D, E with average and with max pool) on random weights and a signed
  random input: the float32 Flax output equals the float64 NumPy reference, which fixes the branch
  order, channel counts, kernel shapes, paddings, strides and pooling."""
  make, reference, in_shape, out_shape = _BLOCKS[kind]
  block = make()
  x = np.random.default_rng(1).standard_normal(in_shape).astype(np.float32)
  variables = _random_variables(jax.eval_shape(block.init, jax.random.key(0), x), seed=2)
  got = np.asarray(jax.jit(block.apply)(variables, x))
  want = _numpy_reference(reference, x.astype(np.float64), ref.Params(variables))
  assert got.shape == want.shape == out_shape
  _assert_close_float32(got, want)


def test_full_network_matches_numpy_reference():
  """InceptionV3 end to end on random weights and a non-square uint8 image (resize to 299, stem,
  Mixed_5b..Mixed_7c, global pool, fc): `pool` [1, 2048] and both logits [1, 1008] equal the
  NumPy blocks stitched together in float64."""
  variables = _random_variables(jax.eval_shape(inception.init_variables), seed=3)
  images = np.random.default_rng(4).integers(0, 256, (1, 12, 16, 3), dtype=np.uint8)
  got = jax.jit(inception.InceptionV3().apply)(variables, images)
  want = _numpy_reference(ref.inception_v3, images, ref.Params(variables))
  for key, shape in (("pool", (1, 2048)), ("logits", (1, 1008)), ("logits_unbiased", (1, 1008))):
    assert np.asarray(got[key]).shape == want[key].shape == shape
    _assert_close_float32(np.asarray(got[key]), want[key])



def test_preprocess_downsampling_is_torch_bilinear_without_antialias():
  """preprocess of a larger image [1, 512, 320, 3] -> [1, 299, 299, 3] equals torch's bilinear
  align_corners=False resize (the full-network test covers upsampling); jax's default antialias=True
  would not. float32 source coordinates near 511 are off by ~3e-5 px, hence atol 2e-4 in [-1, 1]."""
  images = np.random.default_rng(9).integers(0, 256, (1, 512, 320, 3), dtype=np.uint8)
  got = np.asarray(inception.preprocess(images))
  want = 2.0 * ref.resize_bilinear(images / 255.0, 299, 299) - 1.0
  assert got.shape == want.shape == (1, 299, 299, 3)
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-4)


# --- FID through the project's metric code against closed forms for Gaussians.


def _commuting_gaussians(d=8, seed=5):
  """(mu1, S1, mu2, S2, FD): covariances Q diag(a) Qᵀ and Q diag(b) Qᵀ share eigenvectors, so
  FD = |mu1 - mu2|² + Σ_i (a_i + b_i - 2 sqrt(a_i b_i)) exactly."""
  rng = np.random.default_rng(seed)
  q = np.linalg.qr(rng.standard_normal((d, d)))[0]
  a, b = rng.uniform(0.5, 4.0, d), rng.uniform(0.5, 4.0, d)
  mu1 = rng.standard_normal(d)
  mu2 = mu1 + 0.5 * rng.standard_normal(d)
  fd = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2.0 * np.sqrt(a * b))
  return mu1, q, a, mu2, b, fd


def test_feature_stats_are_mean_and_unbiased_covariance():
  """feature_stats of [N, D] features: the sample mean [D] and Σ (x - mean)(x - mean)ᵀ / (N - 1) [D, D]."""
  x = np.random.default_rng(6).standard_normal((5, 3)).astype(np.float32)
  mu, sigma = M.feature_stats(x)
  x64 = x.astype(np.float64)
  mean = x64.sum(0) / 5
  np.testing.assert_allclose(mu, mean, rtol=1e-14)
  np.testing.assert_allclose(sigma, (x64 - mean).T @ (x64 - mean) / 4, rtol=1e-12)
  assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (3, 3)


def test_fid_of_gaussian_samples_matches_closed_form():
  """feature_stats + frechet_distance on 200k samples [N, 8] of each of two Gaussians with commuting
  covariances: within 5 standard deviations (delta method) plus the O(tr S / N) bias of the closed form."""
  n = 200_000
  mu1, q, a, mu2, b, fd = _commuting_gaussians()
  rng = np.random.default_rng(7)
  x1 = mu1 + (rng.standard_normal((n, 8)) * np.sqrt(a)) @ q.T
  x2 = mu2 + (rng.standard_normal((n, 8)) * np.sqrt(b)) @ q.T
  got = M.frechet_distance(*M.feature_stats(x1), *M.feature_stats(x2))
  # Delta method: the mean term moves by 2 Δμ·e with e ~ N(0, (S1 + S2) / N); eigenvalue i of each
  # covariance by a_i sqrt(2 / N) g, which moves FD by (a_i - sqrt(a_i b_i)) sqrt(2 / N) g.
  dm, s, r = mu1 - mu2, (q * (a + b)) @ q.T, np.sqrt(a * b)
  sd = np.sqrt(4.0 * dm @ s @ dm / n + 2.0 / n * np.sum((a - r) ** 2 + (b - r) ** 2))
  bias = 3.0 * (a.sum() + b.sum()) / n
  assert sd < 0.02 and fd > 3.0
  assert abs(got - fd) < 5.0 * sd + bias, (got, fd, sd)


def _trace_sqrt_2x2(m):
  """tr(m^½) of a 2x2 matrix with eigenvalues λ1, λ2 >= 0: (√λ1 + √λ2)² = tr m + 2 sqrt(det m)."""
  return np.sqrt(np.trace(m) + 2.0 * np.sqrt(max(np.linalg.det(m), 0.0)))


def test_frechet_distance_on_exact_statistics():
  """frechet_distance on exact (mu, sigma): commuting covariances against the sum formula; non-commuting
  2x2 (one singular) against tr (S1 S2)^½ = sqrt(tr S1 S2 + 2 sqrt(det S1 det S2)); non-commuting 8x8
  against scipy's sqrtm(S1 S2), itself checked against Σ sqrt(eig(S1 S2)); symmetric in its arguments."""
  mu1, q, a, mu2, b, fd = _commuting_gaussians()
  s1, s2 = (q * a) @ q.T, (q * b) @ q.T
  assert np.abs(s1 @ s2 - s2 @ s1).max() < 1e-12
  assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(fd, rel=1e-10)

  mu_a, mu_b = np.array([1.0, -2.0]), np.array([0.5, 0.0])
  dm2 = 0.25 + 4.0
  for s1, s2 in ((np.array([[2.0, 0.7], [0.7, 1.0]]), np.array([[1.0, -0.4], [-0.4, 3.0]])),
                 (np.diag([2.0, 0.0]), np.array([[1.0, 0.5], [0.5, 2.0]]))):
    assert np.abs(s1 @ s2 - s2 @ s1).max() > 0.1
    want = dm2 + np.trace(s1) + np.trace(s2) - 2.0 * _trace_sqrt_2x2(s1 @ s2)
    assert M.frechet_distance(mu_a, s1, mu_b, s2) == pytest.approx(want, rel=1e-7, abs=1e-7)
  # The singular pair by hand: S1 S2 has eigenvalues 0 and 2, so FD = 4.25 + 2 + 3 - 2 √2.
  assert M.frechet_distance(mu_a, s1, mu_b, s2) == pytest.approx(9.25 - 2.0 * np.sqrt(2.0), abs=1e-7)

  rng = np.random.default_rng(8)
  g1, g2 = rng.standard_normal((8, 8)), rng.standard_normal((8, 8))
  s1, s2 = g1 @ g1.T + 0.1 * np.eye(8), g2 @ g2.T + 0.1 * np.eye(8)
  mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
  tr_sqrtm = np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
  assert tr_sqrtm == pytest.approx(np.sqrt(np.linalg.eigvals(s1 @ s2).real).sum(), rel=1e-9)
  want = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrtm
  assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-9)
  assert M.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(want, rel=1e-9)
