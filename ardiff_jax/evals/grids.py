"""Image grids as PNG files."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image


def make_grid(images: np.ndarray, columns: int, pad: int = 2, pad_value: int = 255) -> np.ndarray:
  """Tiles uint8 [N,H,W,C] into one uint8 [rows·(H+pad)+pad, columns·(W+pad)+pad, C] image."""
  images = np.asarray(images)
  if images.ndim != 4 or images.dtype != np.uint8:
    raise ValueError(f"make_grid expects uint8 [N,H,W,C], got {images.dtype} {images.shape}")
  n, h, w, c = images.shape
  columns = max(1, min(columns, n))
  rows = -(-n // columns)
  grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), pad_value, np.uint8)
  for i in range(n):
    r, col = divmod(i, columns)
    y, x = pad + r * (h + pad), pad + col * (w + pad)
    grid[y:y + h, x:x + w] = images[i]
  return grid


def save_grid(images: np.ndarray, path: str, columns: int, upscale: int = 1) -> str:
  """Writes a PNG grid; `upscale` repeats pixels so small images stay visible."""
  grid = make_grid(images, columns)
  if upscale > 1:
    grid = grid.repeat(upscale, axis=0).repeat(upscale, axis=1)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
  return path
