"""NumPy/PIL image transforms for the input pipeline (no TensorFlow, no JAX).

Shape letters: B batch, H height, W width, C channels, S output side.
All functions are pure: they return new arrays/images and never mutate inputs.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

# Errors PIL (or a broken file) raises for unreadable images. ValueError is
# included because some decoders report malformed tiles with it;
# DecompressionBombError guards against absurd headers in corrupt files.
IMAGE_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def to_rgb(pil_image: Image.Image) -> Image.Image:
  """Converts any PIL mode (L, LA, P, RGBA, CMYK, I;16, ...) to RGB.

  Alpha is dropped (as ADM and torchvision's `.convert("RGB")` do). Palette
  images with a transparency entry go through RGBA first, which is the
  conversion PIL asks for (it warns otherwise).
  """
  if pil_image.mode == "RGB":
    return pil_image
  if pil_image.mode == "P" and "transparency" in pil_image.info:
    pil_image = pil_image.convert("RGBA")
  return pil_image.convert("RGB")


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
  """ADM / MAR center crop: returns uint8 [S, S, 3] with S = image_size.

  1. While the short side is >= 2S, halve the image with BOX resampling
     (cheap, alias-free anti-aliasing for large downscales).
  2. BICUBIC resize so that the short side is exactly S.
  3. Crop the central S x S window.
  The image is converted to RGB first, so grayscale/RGBA/palette inputs work.
  """
  pil_image = to_rgb(pil_image)
  while min(pil_image.size) >= 2 * image_size:
    half = tuple(side // 2 for side in pil_image.size)
    pil_image = pil_image.resize(half, resample=Image.BOX)
  scale = image_size / min(pil_image.size)
  # max(..., S) protects against round() landing one pixel short on the short side.
  new_size = tuple(max(round(side * scale), image_size) for side in pil_image.size)
  pil_image = pil_image.resize(new_size, resample=Image.BICUBIC)
  arr = np.asarray(pil_image, dtype=np.uint8)
  top = (arr.shape[0] - image_size) // 2
  left = (arr.shape[1] - image_size) // 2
  return np.array(arr[top:top + image_size, left:left + image_size])


def load_image(path_or_bytes: str | bytes) -> Image.Image:
  """Opens and fully decodes an image from a file path or encoded bytes.

  `Image.open` is lazy; `load()` forces the decode here so that truncated
  files raise now (inside the caller's error handling), not later.
  Raises one of IMAGE_DECODE_ERRORS for corrupt or unreadable input.
  """
  if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
    image = Image.open(io.BytesIO(bytes(path_or_bytes)))
  else:
    image = Image.open(path_or_bytes)
  image.load()
  return image


def array_to_pil(arr: np.ndarray) -> Image.Image:
  """uint8 [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] array -> PIL image."""
  arr = np.asarray(arr)
  if arr.ndim == 3 and arr.shape[-1] == 1:
    arr = arr[..., 0]  # PIL has no single-channel HxWx1 mode.
  if arr.dtype != np.uint8:
    arr = np.clip(arr, 0, 255).astype(np.uint8)
  return Image.fromarray(arr)


def to_unit_range(images: np.ndarray) -> np.ndarray:
  """uint8 [..., H, W, C] in 0..255 -> float32 in [-1, 1] (x / 127.5 - 1)."""
  return np.asarray(images, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)


def from_unit_range(images: np.ndarray) -> np.ndarray:
  """float [..., H, W, C] in [-1, 1] -> uint8 0..255 (rounded, clipped)."""
  scaled = (np.asarray(images, dtype=np.float32) + 1.0) * 127.5
  return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def hflip(x: np.ndarray) -> np.ndarray:
  """Horizontal flip of [..., H, W, C] (images, batches or latent maps).

  Flips the W axis (-2), so it works for [H, W, C] and [B, H, W, C] alike.
  Returns a contiguous copy so later in-place ops cannot alias the input.
  """
  return np.ascontiguousarray(np.flip(x, axis=-2))


def five_crop_offsets(size: int, crop: int) -> list[tuple[int, int]]:
  """(top, left) of torchvision's FiveCrop on a square `size` image: the four corners, then the
  centre (rounded as torchvision rounds it)."""
  centre = int(round((size - crop) / 2.0))
  far = size - crop
  return [(0, 0), (0, far), (far, 0), (far, far), (centre, centre)]


def ten_crop(images: np.ndarray, crop: int) -> np.ndarray:
  """torchvision's TenCrop of square images [..., S, S, C] -> [..., 10, crop, crop, C]: the five
  crops of the image, then the five crops of its mirror image (LlamaGen's code extraction)."""
  images = np.asarray(images)
  crops = []
  for source in (images, np.flip(images, axis=-2)):
    for top, left in five_crop_offsets(images.shape[-2], crop):
      crops.append(source[..., top:top + crop, left:left + crop, :])
  return np.stack(crops, axis=-4)


def upsample_uint8(images: np.ndarray, image_size: int, resample: int) -> np.ndarray:
  """uint8 [B, h, w] grayscale -> uint8 [B, S, S, 3], resized with PIL `resample`."""
  out = np.empty((images.shape[0], image_size, image_size, 3), dtype=np.uint8)
  for i, img in enumerate(images):
    resized = Image.fromarray(np.ascontiguousarray(img)).resize((image_size, image_size), resample=resample)
    out[i] = np.asarray(resized)[..., None]  # replicate gray to 3 channels
  return out
