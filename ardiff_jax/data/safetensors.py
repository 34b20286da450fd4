"""Reads and writes the safetensors format with NumPy only (no torch, no `safetensors` package).

Layout: an 8-byte little-endian unsigned header length n; n bytes of JSON
`{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}`
(the metadata entry is optional); then the data buffer, little-endian, row-major, each tensor at
[begin, end) counted from the start of the buffer. BF16 is widened to float32 exactly (its 16 bits
are the top half of a float32), so nothing here needs ml_dtypes. The file is memory-mapped and only
the tensors asked for are read, which matters for encoder-decoder checkpoints of many GB.
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Mapping

import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_WRITE_CODES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
                "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
                "bool": "BOOL"}


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
  """uint16 bfloat16 bit patterns [...] -> float32 [...] (exact)."""
  return (bits.astype(np.uint32) << 16).view(np.float32)


def read_header(path: str) -> tuple[dict, int]:
  """(header without "__metadata__", byte offset of the data buffer) of a safetensors file."""
  size = os.path.getsize(path)
  with open(path, "rb") as fh:
    head = fh.read(8)
    if len(head) < 8:
      raise ValueError(f"{path!r}: {size} bytes, too short for a safetensors file (truncated?)")
    (n,) = struct.unpack("<Q", head)
    if 8 + n > size:
      raise ValueError(f"{path!r}: header of {n} bytes but the file has {size}: truncated or not "
                       "a safetensors file")
    try:
      header = json.loads(fh.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"{path!r}: unreadable safetensors header ({e})") from e
  if not isinstance(header, dict):
    raise ValueError(f"{path!r}: the safetensors header is not a JSON object")
  header.pop("__metadata__", None)
  return header, 8 + n


def read_safetensors(path: str, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
  """{name: array} of a safetensors file (only `names` when given; unknown names are skipped).
  F32/F16/F64/int/bool keep their dtype; BF16 becomes float32."""
  header, start = read_header(path)
  size = os.path.getsize(path)
  wanted = header.keys() if names is None else [k for k in names if k in header]
  buffer = np.memmap(path, dtype=np.uint8, mode="r") if size > start else np.zeros(0, np.uint8)
  out = {}
  for name in wanted:
    info = header[name]
    code = info.get("dtype")
    if code not in _DTYPES:
      raise ValueError(f"{path!r}: tensor {name!r} has dtype {code!r}; supported: {sorted(_DTYPES)}")
    dtype = np.dtype(_DTYPES[code]).newbyteorder("<")
    shape = tuple(int(d) for d in info["shape"])
    begin, end = (int(o) for o in info["data_offsets"])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if end - begin != expected:
      raise ValueError(f"{path!r}: tensor {name!r} {code}{list(shape)} needs {expected} bytes, its "
                       f"offsets [{begin}, {end}) hold {end - begin}")
    if start + end > size:
      raise ValueError(f"{path!r}: tensor {name!r} ends at byte {start + end} but the file has "
                       f"{size}: the file is truncated")
    array = buffer[start + begin:start + end].view(dtype).reshape(shape)
    # Copies out of the memory map, in native byte order.
    out[name] = bf16_bits_to_float32(array) if code == "BF16" else np.array(array, dtype.newbyteorder("="))
  del buffer
  return out


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
  """Writes {name: array} (float, int, bool or ml_dtypes.bfloat16 arrays) as a safetensors file."""
  header: dict = {"__metadata__": dict(metadata)} if metadata else {}
  chunks, offset = [], 0
  for name, value in tensors.items():
    array = np.asarray(value)
    code = _WRITE_CODES.get(array.dtype.name)
    if code is None:
      raise ValueError(f"tensor {name!r}: dtype {array.dtype} cannot be written; supported: "
                       f"{sorted(_WRITE_CODES)}")
    data = np.ascontiguousarray(array).view(np.uint16 if code == "BF16" else array.dtype)
    data = data.astype(data.dtype.newbyteorder("<")).tobytes()
    header[name] = {"dtype": code, "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
    chunks.append(data)
    offset += len(data)
  blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
  blob += b" " * (-len(blob) % 8)          # the data buffer starts 8-byte aligned, as the spec advises
  with open(path, "wb") as fh:
    fh.write(struct.pack("<Q", len(blob)))
    fh.write(blob)
    for data in chunks:
      fh.write(data)
