"""Reads a `torch.save`d state dict into NumPy arrays without importing PyTorch.

Both on-disk layouts of `torch.save` are understood:
  - zip (PyTorch ≥ 1.6): `<prefix>/data.pkl` holds the pickled object, whose tensors refer through
    persistent ids `('storage', StorageType, key, location, numel)` to raw little-endian bytes in
    `<prefix>/data/<key>`;
  - legacy (earlier releases, e.g. pytorch-fid's Inception file): a stream of pickles (magic number,
    protocol version, system info, the object, the sorted storage keys) followed, per key, by an
    int64 element count and the raw bytes.
Tensors are rebuilt from (storage, offset, size, stride) as NumPy views. Only the globals a state
dict needs are resolved; anything else is refused, so loading never executes foreign code.
"""
from __future__ import annotations

import collections
import pickle
import struct
import zipfile
from typing import Any, BinaryIO, Callable

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _StorageType:
  def __init__(self, name: str):
    if name == "BFloat16Storage":
      import ml_dtypes  # pylint: disable=g-import-not-at-top
      self.dtype = np.dtype(ml_dtypes.bfloat16)
    elif name in _STORAGE_DTYPES:
      self.dtype = np.dtype(_STORAGE_DTYPES[name])
    else:
      raise pickle.UnpicklingError(f"unsupported torch storage type {name!r}")


class _LazyTensor:
  """A tensor whose storage bytes are read after the pickle (legacy files store them last)."""

  def __init__(self, storage: tuple[str, np.dtype], offset: int, size, stride):
    self.key, self.dtype = storage
    self.offset, self.size, self.stride = int(offset), tuple(size), tuple(stride)

  def materialize(self, storage: np.ndarray) -> np.ndarray:
    itemsize = storage.dtype.itemsize
    last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride)) if all(self.size) else 0
    if last >= max(len(storage), 1) and all(self.size):
      raise ValueError(f"tensor of size {self.size} at offset {self.offset} overruns its storage "
                       f"{self.key!r} of {len(storage)} elements: the file is truncated or corrupt")
    view = np.lib.stride_tricks.as_strided(
        storage[self.offset:], shape=self.size, strides=tuple(s * itemsize for s in self.stride))
    return np.array(view)  # own the memory: the storage buffer may be shared by several tensors


def _rebuild_tensor(storage, offset, size, stride, *unused):
  return _LazyTensor(storage, offset, size, stride)


def _rebuild_parameter(data, *unused):
  return data


_ALLOWED: dict[tuple[str, str], Callable[..., Any]] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _Unpickler(pickle.Unpickler):

  def find_class(self, module: str, name: str):
    if module == "torch" and name.endswith("Storage"):
      return _StorageType(name)
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a tensor state dict")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
    storage_type, key = pid[1], str(pid[2])
    if len(pid) > 5 and pid[5] is not None:
      raise pickle.UnpicklingError("storage views (legacy view_metadata) are not supported")
    return (key, storage_type.dtype)


def _materialize(obj, storages: Callable[[str, np.dtype], np.ndarray]):
  if isinstance(obj, _LazyTensor):
    return obj.materialize(storages(obj.key, obj.dtype))
  if isinstance(obj, dict):
    return collections.OrderedDict((k, _materialize(v, storages)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialize(v, storages) for v in obj)
  return obj


def _lazy_tensors(obj):
  if isinstance(obj, _LazyTensor):
    yield obj
  elif isinstance(obj, dict):
    for v in obj.values():
      yield from _lazy_tensors(v)
  elif isinstance(obj, (list, tuple)):
    for v in obj:
      yield from _lazy_tensors(v)


def _load_zip(path: str):
  with zipfile.ZipFile(path) as zf:
    pkl = [n for n in zf.namelist() if n.endswith("data.pkl")]
    if not pkl:
      raise ValueError(f"{path!r} is a zip file without data.pkl: not a torch.save checkpoint")
    prefix = pkl[0][: -len("data.pkl")]
    with zf.open(pkl[0]) as fh:
      obj = _Unpickler(fh).load()
    return _materialize(obj, lambda key, dtype: np.frombuffer(
        zf.read(f"{prefix}data/{key}"), dtype=dtype.newbyteorder("<")))


def _load_legacy(fh: BinaryIO, path: str):
  magic = pickle.load(fh)
  if magic != LEGACY_MAGIC:
    raise ValueError(f"{path!r} is neither a zip nor a legacy torch.save file (bad magic number)")
  pickle.load(fh)   # protocol version
  pickle.load(fh)   # system info (endianness, type sizes)
  obj = _Unpickler(fh).load()
  keys = pickle.load(fh)
  dtypes = {t.key: t.dtype for t in _lazy_tensors(obj)}
  storages = {}
  for key in keys:
    (numel,) = struct.unpack("<q", fh.read(8))
    dtype = dtypes.get(str(key), np.dtype(np.uint8))
    storages[str(key)] = np.frombuffer(fh.read(numel * dtype.itemsize), dtype=dtype.newbyteorder("<"))
  return _materialize(obj, lambda key, dtype: storages[key])


def load_state_dict(path: str, key: str = "") -> dict[str, np.ndarray]:
  """{name: array} from a torch.save file of a state dict, or of a dict holding one under `key`
  (e.g. MAR's checkpoints: "model", "model_ema"); without `key`, one under 'state_dict' is taken
  when present."""
  if zipfile.is_zipfile(path):
    obj = _load_zip(path)
  else:
    with open(path, "rb") as fh:
      obj = _load_legacy(fh, path)
  if key:
    if not isinstance(obj, dict) or not isinstance(obj.get(key), dict):
      held = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
      raise ValueError(f"{path!r} holds no state dict under {key!r}: it holds {held}")
    obj = obj[key]
  elif isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
    obj = obj["state_dict"]
  if not isinstance(obj, dict):
    raise ValueError(f"{path!r} holds a {type(obj).__name__}, not a state dict")
  return {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}
