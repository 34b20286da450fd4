"""LPIPS (Zhang et al., 2018), the VGG16 perceptual distance LlamaGen and LDM train tokenizers with.

For images x, y [B,H,W,3] in [-1, 1]:
  s(x)      = (x − shift) / scale                     shift (−.030, −.088, −.188), scale (.458, .448, .450)
  φ_l       = VGG16 activations after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3  (64/128/256/512/512 ch)
  n(a)      = a / (‖a‖_channels + 1e-10)
  LPIPS     = Σ_l mean_{h,w} Σ_c w_{l,c} (n(φ_l(s(x))) − n(φ_l(s(y))))²_c            [B]
with w_l ≥ 0 the learned linear layers (1×1 convolutions without bias). The network runs in
evaluation mode (LlamaGen calls `LPIPS().eval()`: its dropout before each linear layer is off).

Weights are never bundled or downloaded: `load_variables` reads the user's two PyTorch files through
the torch-free reader (`data.torch_pickle`):
  - torchvision's VGG16 (`vgg16-397923af.pth`): `features.<i>.weight` [O,I,3,3] and
    `features.<i>.bias` for the 13 convolutions i ∈ {0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28}
    (the classifier is ignored); the slices of LPIPS's own state dict (`net.slice<k>.<i>.*`) are
    read as well;
  - LPIPS's linear layers (`vgg.pth`): `lin<l>.model.1.weight` [1,C,1,1] (`model.0` in a file saved
    without dropout).
Flax names follow torchvision's indices (`features_<i>`, `lin<l>`), so the mapping is one to one.
"""
from __future__ import annotations

import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ardiff_jax.data import torch_pickle

# torchvision `vgg16().features` indices of the 3×3 convolutions, grouped into LPIPS's five slices;
# slices 2–5 begin with a 2×2 max-pool (indices 4, 9, 16, 23), and each slice's output is the ReLU
# after its last convolution.
VGG16_STAGES: tuple[tuple[int, ...], ...] = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
CHANNELS = (64, 128, 256, 512, 512)
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10


def normalize_channels(a: jax.Array) -> jax.Array:
  """a [..., C] / (‖a‖ over C + 1e-10), LPIPS's `normalize_tensor`."""
  return a / (jnp.sqrt(jnp.sum(jnp.square(a), axis=-1, keepdims=True)) + EPS)


class VGG16Features(nn.Module):
  """VGG16's convolutional trunk up to relu5_3; returns the five LPIPS activations [B,h_l,w_l,C_l]."""

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    outputs = []
    for stage, (convs, channels) in enumerate(zip(VGG16_STAGES, CHANNELS)):
      if stage:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      for i in convs:
        x = nn.relu(nn.Conv(channels, (3, 3), padding=((1, 1), (1, 1)), name=f"features_{i}")(x))
      outputs.append(x)
    return outputs


class LPIPS(nn.Module):
  """LPIPS distance between two image batches [B,H,W,3] in [-1, 1] -> [B] (float32)."""

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    shift, scale = jnp.asarray(SHIFT, jnp.float32), jnp.asarray(SCALE, jnp.float32)
    both = (jnp.concatenate([x, y]).astype(jnp.float32) - shift) / scale   # one VGG pass for both
    total = jnp.zeros((x.shape[0],), jnp.float32)
    for l, feats in enumerate(VGG16Features(name="net")(both)):
      fx, fy = jnp.split(normalize_channels(feats), 2)
      weighted = nn.Conv(1, (1, 1), use_bias=False, name=f"lin{l}")(jnp.square(fx - fy))
      total = total + jnp.mean(weighted, axis=(1, 2, 3))
    return total


_VGG_KEY = re.compile(r"^(?:features|net\.slice\d)\.(\d+)\.(weight|bias)$")
_LIN_KEY = re.compile(r"^lin(\d)\.model\.[01]\.weight$")


def _read(path: str, what: str, config_field: str) -> dict[str, np.ndarray]:
  if not os.path.exists(path):
    raise FileNotFoundError(f"{config_field}={path!r}: no such file; point it at {what}, or set "
                            "the tokenizer's perceptual_weight=0 to train without LPIPS")
  return torch_pickle.load_state_dict(path)


def variables_from_state_dicts(vgg: dict[str, np.ndarray], lin: dict[str, np.ndarray],
                               vgg_name: str = "vgg16", lin_name: str = "lpips") -> dict:
  """Torch state dicts of VGG16 and of LPIPS's linear layers -> Flax {"params": ...} of `LPIPS`.

  Raises ValueError naming the file and the first missing or misshapen weights."""
  convs = {}
  for key, value in vgg.items():
    m = _VGG_KEY.match(key)
    if m:
      convs[(int(m.group(1)), m.group(2))] = np.asarray(value, np.float32)
  lins = {int(m.group(1)): np.asarray(v, np.float32)
          for k, v in lin.items() if (m := _LIN_KEY.match(k))}
  net, problems, fan_in = {}, [], 3
  for convs_of_stage, channels in zip(VGG16_STAGES, CHANNELS):
    for i in convs_of_stage:
      w, b = convs.get((i, "weight")), convs.get((i, "bias"))
      if w is None or b is None:
        problems.append(f"{vgg_name} lacks features.{i}.weight/bias")
      elif w.shape != (channels, fan_in, 3, 3) or b.shape != (channels,):
        problems.append(f"{vgg_name} features.{i}: weight {w.shape}, bias {b.shape}; VGG16 has "
                        f"{(channels, fan_in, 3, 3)}, {(channels,)}")
      else:
        net[f"features_{i}"] = {"kernel": w.transpose(2, 3, 1, 0), "bias": b}
      fan_in = channels
  params = {"net": net}
  for l, channels in enumerate(CHANNELS):
    w = lins.get(l)
    if w is None:
      problems.append(f"{lin_name} lacks lin{l}.model.1.weight")
    elif w.shape != (1, channels, 1, 1):
      problems.append(f"{lin_name} lin{l}: weight {w.shape}; LPIPS has {(1, channels, 1, 1)}")
    else:
      params[f"lin{l}"] = {"kernel": w.transpose(2, 3, 1, 0)}
  if problems:
    raise ValueError("these are not torchvision's VGG16 and LPIPS's vgg.pth: "
                     + "; ".join(problems[:4]) + ("; ..." if len(problems) > 4 else ""))
  return {"params": params}


def load_variables(vgg16_path: str, lin_path: str, *, vgg16_field: str = "lpips_vgg16",
                   lin_field: str = "lpips_lin") -> dict:
  """The user's `vgg16` and LPIPS `vgg.pth` files -> Flax variables of `LPIPS` (float32).
  `*_field` name the config fields in error messages."""
  vgg = _read(vgg16_path, "torchvision's vgg16 weights (vgg16-397923af.pth)", vgg16_field)
  lin = vgg if lin_path == vgg16_path else _read(lin_path, "LPIPS's vgg.pth", lin_field)
  return variables_from_state_dicts(vgg, lin, vgg_name=vgg16_path, lin_name=lin_path)
