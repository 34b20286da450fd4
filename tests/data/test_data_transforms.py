"""Tests for ardiff_jax.data.transforms (checked against direct NumPy arithmetic)."""
import io

import numpy as np
import pytest
from PIL import Image

from ardiff_jax.data import transforms

S = 8


def _rgb(h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_center_crop_identity_on_exact_size():
  arr = _rgb(S, S)
  out = transforms.center_crop_arr(Image.fromarray(arr), S)
  assert out.dtype == np.uint8 and out.shape == (S, S, 3)
  np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize("h, w", [(S, S + 4), (S, S + 3), (S + 5, S)])
def test_center_crop_offsets(h, w):
  # Short side already S: no resize, only the central crop ((dim - S) // 2 offset).
  arr = _rgb(h, w, seed=1)
  out = transforms.center_crop_arr(Image.fromarray(arr), S)
  top, left = (h - S) // 2, (w - S) // 2
  np.testing.assert_array_equal(out, arr[top:top + S, left:left + S])


def test_center_crop_box_halving_matches_block_mean():
  # A 2S x 2S image that is constant on 2x2 blocks: BOX halving gives the blocks exactly.
  blocks = _rgb(S, S, seed=2)
  big = np.repeat(np.repeat(blocks, 2, axis=0), 2, axis=1)
  out = transforms.center_crop_arr(Image.fromarray(big), S)
  np.testing.assert_array_equal(out, blocks)


def test_center_crop_large_nonsquare_shape():
  out = transforms.center_crop_arr(Image.fromarray(_rgb(5 * S + 3, 3 * S + 1)), S)
  assert out.shape == (S, S, 3) and out.dtype == np.uint8


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK"])
def test_center_crop_converts_modes_to_rgb(mode):
  image = Image.fromarray(_rgb(12, 10, seed=3)).convert(mode)
  if mode == "P":
    image.info["transparency"] = 0
  out = transforms.center_crop_arr(image, S)
  assert out.shape == (S, S, 3) and out.dtype == np.uint8
  if mode in ("L", "LA"):
    np.testing.assert_array_equal(out[..., 0], out[..., 1])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_unit_range_endpoints_and_inverse():
  x = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
  y = transforms.to_unit_range(x)
  assert y.dtype == np.float32
  np.testing.assert_allclose(y.ravel(), np.arange(256) / 127.5 - 1.0, atol=1e-6)
  assert y.min() == -1.0 and y.max() == 1.0
  np.testing.assert_array_equal(transforms.from_unit_range(y), x)


def test_hflip_reverses_width_axis():
  x = _rgb(3, 5)
  np.testing.assert_array_equal(transforms.hflip(x), x[:, ::-1, :])
  batch = np.stack([x, x + 1])
  np.testing.assert_array_equal(transforms.hflip(batch), batch[:, :, ::-1, :])
  np.testing.assert_array_equal(transforms.hflip(transforms.hflip(x)), x)


def test_array_to_pil_handles_single_channel_and_float():
  gray = np.full((4, 6, 1), 7, dtype=np.uint8)
  assert transforms.array_to_pil(gray).mode == "L"
  assert transforms.array_to_pil(np.full((4, 6, 3), 300.0)).getpixel((0, 0)) == (255, 255, 255)


def _jpeg_bytes(seed=0):
  buffer = io.BytesIO()
  Image.fromarray(_rgb(32, 32, seed)).save(buffer, format="JPEG")
  return buffer.getvalue()


@pytest.mark.parametrize("data", [
    _jpeg_bytes()[:300],                  # truncated JPEG
    b"definitely not an image" * 10,     # garbage
    b"",                                 # empty file
])
def test_load_image_raises_decode_error(data):
  with pytest.raises(transforms.IMAGE_DECODE_ERRORS):
    transforms.load_image(data)


def test_load_image_from_bytes_and_path(tmp_path):
  data = _jpeg_bytes(seed=4)
  path = tmp_path / "x.jpg"
  path.write_bytes(data)
  a = np.asarray(transforms.load_image(data))
  b = np.asarray(transforms.load_image(str(path)))
  np.testing.assert_array_equal(a, b)
  assert a.shape == (32, 32, 3)


def test_upsample_uint8_replicates_gray():
  x = np.random.default_rng(5).integers(0, 256, size=(3, 4, 4), dtype=np.uint8)
  out = transforms.upsample_uint8(x, 8, Image.NEAREST)
  assert out.shape == (3, 8, 8, 3)
  np.testing.assert_array_equal(out[..., 0], np.repeat(np.repeat(x, 2, axis=1), 2, axis=2))
  np.testing.assert_array_equal(out[..., 0], out[..., 2])
