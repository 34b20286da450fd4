"""Writes state dicts in both `torch.save` layouts, without PyTorch, for converter tests.

The torch globals a real file references (`torch.FloatStorage`, `torch._utils._rebuild_tensor_v2`)
are stood in for by throwaway modules registered only while pickling.
"""
from __future__ import annotations

import collections
import contextlib
import io
import pickle
import struct
import sys
import types
import zipfile

import numpy as np

_STORAGE_NAMES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage"}


@contextlib.contextmanager
def _fake_torch():
  torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")
  for name in _STORAGE_NAMES.values():
    cls = type(name, (), {"__module__": "torch", "__qualname__": name})
    setattr(torch, name, cls)

  def _rebuild_tensor_v2(*args):
    raise AssertionError("never called while writing")

  _rebuild_tensor_v2.__module__ = "torch._utils"
  _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
  utils._rebuild_tensor_v2 = _rebuild_tensor_v2
  torch._utils = utils
  saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
  sys.modules.update({"torch": torch, "torch._utils": utils})
  try:
    yield torch, utils
  finally:
    for k, v in saved.items():
      if v is None:
        sys.modules.pop(k, None)
      else:
        sys.modules[k] = v


class _Storage:
  def __init__(self, key, array):
    self.key, self.array = key, array


class _Tensor:
  def __init__(self, rebuild, storage, shape):
    self.rebuild, self.storage, self.shape = rebuild, storage, shape

  def __reduce__(self):
    stride, acc = [], 1
    for s in reversed(self.shape):
      stride.insert(0, acc)
      acc *= s
    return (self.rebuild, (self.storage, 0, tuple(self.shape), tuple(stride), False,
                           collections.OrderedDict()))


def _tensors(state_dict, rebuild, first=0):
  storages, obj = [], collections.OrderedDict()
  for i, (name, value) in enumerate(state_dict.items()):
    value = np.ascontiguousarray(value)
    storage = _Storage(str(first + i), value)
    storages.append(storage)
    obj[name] = _Tensor(rebuild, storage, value.shape)
  return obj, storages


def save_zip(path: str, state_dict: dict[str, np.ndarray], key: str = "",
             others: dict[str, dict[str, np.ndarray]] | None = None) -> None:
  """A torch.save zip of `state_dict`, or of {key: state_dict, **others} (as MAR's checkpoints
  hold "model" and "model_ema")."""
  with _fake_torch() as (torch, utils):
    obj, storages = _tensors(state_dict, utils._rebuild_tensor_v2)
    if key:
      obj = {key: obj}
      for name, entry in (others or {}).items():
        obj[name], more = _tensors(entry, utils._rebuild_tensor_v2, len(storages))
        storages += more
    buf = io.BytesIO()
    pickler = pickle.Pickler(buf, protocol=2)
    pickler.persistent_id = lambda o: (
        ("storage", getattr(torch, _STORAGE_NAMES[o.array.dtype]), o.key, "cpu", o.array.size)
        if isinstance(o, _Storage) else None)
    pickler.dump(obj)
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", buf.getvalue())
    zf.writestr("archive/version", "3\n")
    for s in storages:
      zf.writestr(f"archive/data/{s.key}", s.array.astype(s.array.dtype.newbyteorder("<")).tobytes())


def save_legacy(path: str, state_dict: dict[str, np.ndarray]) -> None:
  with _fake_torch() as (torch, utils), open(path, "wb") as f:
    obj, storages = _tensors(state_dict, utils._rebuild_tensor_v2)
    pickle.dump(0x1950A86A20F9469CFC6C, f, protocol=2)
    pickle.dump(1001, f, protocol=2)
    pickle.dump({"protocol_version": 1001, "little_endian": True}, f, protocol=2)
    pickler = pickle.Pickler(f, protocol=2)
    pickler.persistent_id = lambda o: (
        ("storage", getattr(torch, _STORAGE_NAMES[o.array.dtype]), o.key, "cpu", o.array.size, None)
        if isinstance(o, _Storage) else None)
    pickler.dump(obj)
    pickle.dump([s.key for s in storages], f, protocol=2)
    for s in storages:
      f.write(struct.pack("<q", s.array.size))
      f.write(s.array.astype(s.array.dtype.newbyteorder("<")).tobytes())
