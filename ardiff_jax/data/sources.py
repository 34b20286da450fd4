"""Random-access data sources (`__len__` / `__getitem__`) for `grain.MapDataset.source`.

Each source returns one record (a dict) per index; the pipeline decodes it:

  DigitsSource  {"image": uint8 [S, S, 3], "label": int}    (already final)
  FolderSource  {"path": str, "label": int}                  (decoded lazily)
  TfdsSource    {"image": uint8 array or encoded bytes, "label": int, "key": str}
  CocoCaptionsSource {"path": str, "label": 0, "caption": str}   one record per (image, caption)
  CachedSource  {"moments": f32 [h, w, 2C], "moments_flip": f32 [h, w, 2C], "label": int}
                (continuous tokenizers) or {"codes": int [V, h, w], "label": int} (VQ tokenizers:
                V views of the image, e.g. it and its mirror image, or LlamaGen's ten crops)

`decode_image_record` turns an image record into uint8 [S, S, 3] (ADM center crop).
No TensorFlow is imported: tfds is used only through `tfds.data_source`, and it is
imported lazily so that the other sources do not pay for it.
"""
from __future__ import annotations

import functools
import glob
import json
import os
import struct
from typing import Any, Iterable, Mapping

import numpy as np
from PIL import Image

from ardiff_jax.data import transforms

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
CACHED_EXTENSION = ".array_record"
# group_size:1 puts every record in its own chunk, which is what grain's
# ArrayRecordDataSource needs for O(1) random access (it warns otherwise).
CACHED_WRITER_OPTIONS = "group_size:1"

# ------------------------------------------------------------------- digits
DIGITS_NUM_CLASSES = 10
# Bilinear, not bicubic: 8x8 -> S upsampling by 4-8x makes bicubic ring
# (overshoot clipped at 0/255); bilinear stays inside the input's value range.
DIGITS_RESAMPLE = Image.BILINEAR


@functools.lru_cache(maxsize=1)
def _load_digits_uint8() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's bundled digits -> (uint8 [1797, 8, 8] in 0..255, int64 [1797])."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  digits = load_digits()
  images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
  images.setflags(write=False)  # shared by every source through the cache
  return images, digits.target.astype(np.int64)


def digits_split_indices(split: str, *, seed: int, test_fraction: float) -> np.ndarray:
  """Sorted indices of the digits `split` ("train" | "test"); int64 [N_split].

  Stratified by label (scikit-learn `train_test_split(stratify=labels)`), so both
  splits keep the 10-class balance; `seed` fixes which images are held out. The
  split sizes depend only on `test_fraction` (n_test = ceil(fraction * 1797)).
  """
  from sklearn.model_selection import train_test_split  # pylint: disable=g-import-not-at-top
  if split not in ("train", "test"):
    raise ValueError(f"digits has splits 'train' and 'test', got split={split!r}.")
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"digits_test_fraction must be in (0, 1), got {test_fraction}.")
  _, labels = _load_digits_uint8()
  train_idx, test_idx = train_test_split(
      np.arange(len(labels)), test_size=test_fraction,
      random_state=seed % 2**32, stratify=labels)
  return np.sort(train_idx if split == "train" else test_idx)


class DigitsSource:
  """8x8 scikit-learn digits upsampled to uint8 [S, S, 3] (gray replicated to RGB).

  Upsampling happens per record (cheap), so the source pickles small for grain workers.
  """

  def __init__(self, split: str, *, image_size: int, seed: int, test_fraction: float):
    images, labels = _load_digits_uint8()
    indices = digits_split_indices(split, seed=seed, test_fraction=test_fraction)
    self._images = images[indices]
    self._labels = labels[indices]
    self._image_size = image_size

  def __len__(self) -> int:
    return len(self._labels)

  def __getitem__(self, index: int) -> dict[str, Any]:
    image = transforms.upsample_uint8(self._images[index:index + 1], self._image_size, DIGITS_RESAMPLE)
    return {"image": image[0], "label": int(self._labels[index])}


# ------------------------------------------------------------------- folder
def _folder_hint(split_dir: str) -> str:
  return (f"expected one subfolder per class holding images, e.g. "
          f"'{os.path.join(split_dir, '<class_name>', 'img0001.jpg')}', "
          f"with extensions {', '.join(IMAGE_EXTENSIONS)} (case-insensitive)")


def _require_dir(split_dir: str) -> None:
  if not os.path.isdir(split_dir):
    raise FileNotFoundError(f"Image folder split directory not found: '{split_dir}'; {_folder_hint(split_dir)}.")


def folder_class_names(root: str, split: str) -> list[str]:
  """Sorted class subfolder names of `<root>/<split>/` (hidden folders ignored)."""
  split_dir = os.path.join(root, split)
  _require_dir(split_dir)
  names = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
  if not names:
    raise ValueError(f"Image folder '{split_dir}' has no class subfolders; {_folder_hint(split_dir)}.")
  return names


def _is_image_file(name: str) -> bool:
  # Hidden files such as macOS '._x.jpg' resource forks are not images.
  return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _list_class_files(class_dir: str) -> list[str]:
  """All image files below `class_dir` (nested folders allowed), sorted."""
  found = []
  for dirpath, dirnames, filenames in os.walk(class_dir):
    dirnames.sort()  # deterministic walk order
    found.extend(os.path.join(dirpath, f) for f in filenames if _is_image_file(f))
  return sorted(found)


def list_image_folder(root: str, split: str, class_names: list[str] | None = None
                      ) -> tuple[list[str], np.ndarray, list[str]]:
  """Lists `<root>/<split>/<class>/*` -> (paths [N], int64 labels [N], class names).

  Label ids follow `class_names` (default: this split's sorted subfolders). Pass
  the train split's names when listing an eval split, so ids agree across splits.
  """
  split_dir = os.path.join(root, split)
  own_names = folder_class_names(root, split)
  names = list(class_names) if class_names is not None else own_names
  unknown = sorted(set(own_names) - set(names))
  if unknown:
    raise ValueError(f"Image folder '{split_dir}' has class subfolders {unknown} that are not among "
                     f"the {len(names)} known classes {names}.")
  paths, labels = [], []
  for label, name in enumerate(names):
    class_dir = os.path.join(split_dir, name)
    files = _list_class_files(class_dir) if os.path.isdir(class_dir) else []
    paths.extend(files)
    labels.extend([label] * len(files))
  if not paths:
    raise ValueError(f"Image folder '{split_dir}' has class subfolders {own_names} but no image files; "
                     f"{_folder_hint(split_dir)}.")
  return paths, np.asarray(labels, dtype=np.int64), names


class FolderSource:
  """Class-per-subfolder images: records {"path": str, "label": int}, decoded lazily."""

  def __init__(self, root: str, split: str, class_names: list[str] | None = None):
    self._paths, self._labels, self.class_names = list_image_folder(root, split, class_names)

  def __len__(self) -> int:
    return len(self._paths)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"path": self._paths[index], "label": int(self._labels[index])}


# --------------------------------------------------------------------- coco
def coco_files(root: str, split: str) -> tuple[str, str]:
  """(captions JSON, image folder) of a COCO 2017 split: annotations/captions_{split}2017.json
  and {split}2017/, as cocodataset.org's zips unpack."""
  return (os.path.join(root, "annotations", f"captions_{split}2017.json"),
          os.path.join(root, f"{split}2017"))


class CocoCaptionsSource:
  """COCO captions: one record per (image, caption) pair, so an epoch shows each image with each
  of its (about five) captions; {"path", "label": 0, "caption"}. Records are ordered by image id,
  then annotation id. Splits are COCO's names: train, val."""

  def __init__(self, root: str, split: str):
    annotations, images = coco_files(root, split)
    if not os.path.isfile(annotations):
      raise ValueError(f"data.source='coco' reads {annotations!r}, which does not exist: point "
                       f"data.path at a COCO 2017 folder holding annotations/captions_{{train,val}}"
                       f"2017.json and {{train,val}}2017/ (split {split!r}; splits are train and val)")
    with open(annotations, encoding="utf-8") as fh:
      meta = json.load(fh)
    files = {im["id"]: im["file_name"] for im in meta.get("images", [])}
    pairs = sorted((a["image_id"], a["id"], a["caption"]) for a in meta.get("annotations", [])
                   if a.get("image_id") in files)
    if not pairs:
      raise ValueError(f"{annotations!r} holds no captions of its images: not a COCO captions file")
    self._records = [(os.path.join(images, files[image]), caption.strip())
                     for image, _, caption in pairs]
    self.class_names = ["image"]

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict[str, Any]:
    path, caption = self._records[index]
    return {"path": path, "label": 0, "caption": caption}


# --------------------------------------------------------------------- tfds
class TfdsSource:
  """`tfds.data_source(name, split, data_dir, download=False)` reduced to {"image", "label", "key"}.

  Other fields (file names, ids: strings that cannot be batched) are dropped here.
  `key` ("name/split#index") names the record in warnings about unreadable images.
  Nothing is downloaded: the dataset must have been prepared by the user, in the array_record
  format that random access needs (`tfds_builder` says how when it is not).
  """

  def __init__(self, name: str, split: str, data_dir: str | None = None):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    builder = tfds_builder(name, data_dir)
    try:
      self._source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    except NotImplementedError as e:   # prepared, but as TFRecord files
      raise ValueError(f"tfds dataset {name!r} in {builder.data_dir} is not in a random-access "
                       f"format; prepare it again with `{_tfds_build_command(name, data_dir)}`"
                       ) from e
    except ValueError as e:   # an unknown split
      raise ValueError(f"tfds dataset {name!r} has no split {split!r} "
                       f"(splits: {sorted(builder.info.splits)}): {e}") from e
    self._prefix = f"{name}/{split}"

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = self._source[index]
    return {"image": record["image"], "label": int(record["label"]), "key": f"{self._prefix}#{index}"}


def _tfds_build_command(name: str, data_dir: str | None) -> str:
  where = f" --data_dir={data_dir}" if data_dir else ""
  return f"tfds build {name}{where} --file_format=array_record"


def tfds_builder(name: str, data_dir: str | None = None):
  """The prepared tfds builder of `name` in `data_dir` (data.path; "" = tfds' default directory).

  Raises a one-line ValueError naming the dataset, the directory and the command that prepares
  it, for an unknown name or an unprepared dataset: ardiff_jax never downloads data.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"data.tfds_name={name!r} is not a tfds dataset "
                     f"({str(e).splitlines()[0]})") from None
  if not builder.is_prepared():
    raise ValueError(
        f"tfds dataset {name!r} is not prepared in data_dir={os.fspath(builder.data_dir_root)!r} "
        f"(ardiff_jax downloads nothing): prepare it once with "
        f"`{_tfds_build_command(name, data_dir)}` (for ImageNet, put the archives in "
        f"<data_dir>/downloads/manual first), or set data.path to the data_dir that holds it")
  return builder


def tfds_class_names(name: str, data_dir: str | None = None) -> list[str]:
  """Label names from the prepared builder's metadata (no data is read)."""
  return list(tfds_builder(name, data_dir).info.features["label"].names)


def decode_image_record(record: Mapping[str, Any], image_size: int) -> np.ndarray:
  """Image record (path, encoded bytes or array) -> uint8 [S, S, 3] via the ADM crop.

  Arrays that already are uint8 [S, S, 3] pass through untouched (digits).
  Raises one of `transforms.IMAGE_DECODE_ERRORS` for unreadable images.
  """
  if "path" in record:
    return transforms.center_crop_arr(transforms.load_image(record["path"]), image_size)
  image = record["image"]
  if isinstance(image, (bytes, bytearray, memoryview)):
    return transforms.center_crop_arr(transforms.load_image(image), image_size)
  image = np.asarray(image)
  if image.dtype == np.uint8 and image.shape == (image_size, image_size, 3):
    return image
  return transforms.center_crop_arr(transforms.array_to_pil(image), image_size)


def record_name(record: Mapping[str, Any]) -> str:
  """Human-readable name of an image record for warnings (path or tfds key)."""
  return str(record.get("path", record.get("key", "<in-memory image>")))


# ------------------------------------------------------------------- cached
def cached_shard_paths(root: str, split: str) -> list[str]:
  """Sorted `<root>/<split>/*.array_record`; clear errors when missing or empty."""
  split_dir = os.path.join(root, split)
  if not os.path.isdir(split_dir):
    raise FileNotFoundError(f"Cached latent directory not found: '{split_dir}'; expected "
                            f"'{split_dir}/*{CACHED_EXTENSION}' shards written by `--mode cache`.")
  paths = sorted(glob.glob(os.path.join(split_dir, f"*{CACHED_EXTENSION}")))
  if not paths:
    raise ValueError(f"Cached latent directory '{split_dir}' holds no '*{CACHED_EXTENSION}' shards; "
                     f"run `--mode cache` first.")
  return paths


_CACHED_MAGIC = b"ADJC1"
_CACHED_HEADER = struct.Struct("<5s3Iq")   # magic, h, w, 2C, label


def encode_cached_record(moments: np.ndarray, moments_flip: np.ndarray, label: int) -> bytes:
  """One cache record: a fixed header (magic, h, w, 2C, label) then the f32 little-endian bytes
  of `moments` [h, w, 2C] and `moments_flip`.

  A plain binary layout rather than `np.savez`: decoding needs no header parsing (NumPy parses
  .npy headers with `ast`, which CPython 3.11 can fail to do concurrently in grain's threads).
  """
  moments = np.asarray(moments, dtype="<f4")
  moments_flip = np.asarray(moments_flip, dtype="<f4")
  if moments.shape != moments_flip.shape or moments.ndim != 3:
    raise ValueError(f"moments and moments_flip must both be [h, w, 2C]; got {moments.shape} "
                     f"and {moments_flip.shape}.")
  header = _CACHED_HEADER.pack(_CACHED_MAGIC, *moments.shape, int(label))
  return header + moments.tobytes() + moments_flip.tobytes()


def decode_cached_record(data: bytes) -> dict[str, Any]:
  """Inverse of `encode_cached_record` and `encode_codes_record`; a clear error for records of
  another format."""
  if data[:len(_CODES_MAGIC)] == _CODES_MAGIC:
    return decode_codes_record(data)
  if len(data) < _CACHED_HEADER.size or data[:len(_CACHED_MAGIC)] != _CACHED_MAGIC:
    raise ValueError("not an ardiff_jax cache record (unknown format or an older cache); "
                     "rewrite the cache with --mode cache")
  _, h, w, c, label = _CACHED_HEADER.unpack_from(data)
  n = h * w * c
  body = np.frombuffer(data, dtype="<f4", offset=_CACHED_HEADER.size)
  if body.size != 2 * n:
    raise ValueError(f"truncated cache record: expected {2 * n} floats, found {body.size}")
  return {"moments": body[:n].reshape(h, w, c), "moments_flip": body[n:].reshape(h, w, c),
          "label": int(label)}


_CODES_MAGIC = b"ADJQ1"
_CODES_HEADER = struct.Struct("<5s4Iq")   # magic, views V, h, w, bytes per code, label


def code_dtype(codebook_size: int) -> np.dtype:
  """int16 for codebooks of up to 32,768 entries (VQ-16's 16,384), else int32 (little-endian)."""
  return np.dtype("<i2") if codebook_size <= 2**15 else np.dtype("<i4")


def encode_codes_record(codes: np.ndarray, label: int) -> bytes:
  """One record of VQ codes: a fixed header (magic, V, h, w, bytes per code, label) then the codes
  [V, h, w] as little-endian int16 or int32, whichever `codes` holds."""
  codes = np.asarray(codes)
  if codes.ndim != 3 or codes.dtype.kind not in "iu" or codes.dtype.itemsize not in (2, 4):
    raise ValueError(f"codes must be int16 or int32 [views, h, w]; got {codes.dtype} {codes.shape}")
  codes = codes.astype(f"<i{codes.dtype.itemsize}")
  return _CODES_HEADER.pack(_CODES_MAGIC, *codes.shape, codes.dtype.itemsize, int(label)) + codes.tobytes()


def decode_codes_record(data: bytes) -> dict[str, Any]:
  """Inverse of `encode_codes_record`: {"codes": int [V, h, w], "label": int}."""
  _, v, h, w, size, label = _CODES_HEADER.unpack_from(data)
  body = np.frombuffer(data, dtype=f"<i{size}", offset=_CODES_HEADER.size)
  if body.size != v * h * w:
    raise ValueError(f"truncated codes record: expected {v * h * w} codes, found {body.size}")
  return {"codes": body.reshape(v, h, w), "label": int(label)}


def write_cached_shard(filename: str, records: Iterable[Mapping[str, Any]]) -> int:
  """Writes dicts with `moments`, `moments_flip`, `label` (or `codes`, `label`) to one ArrayRecord
  shard.

  Returns the number of records written. Uses group_size:1 (random access).
  """
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(os.path.abspath(filename)), exist_ok=True)
  writer = array_record_module.ArrayRecordWriter(filename, CACHED_WRITER_OPTIONS)
  count = 0
  try:
    for record in records:
      if "codes" in record:
        writer.write(encode_codes_record(record["codes"], record["label"]))
      else:
        writer.write(encode_cached_record(record["moments"], record["moments_flip"], record["label"]))
      count += 1
  finally:
    writer.close()
  return count


class CachedSource:
  """Tokenizer moments or codes cached as ArrayRecord, decoded per record."""

  def __init__(self, root: str, split: str):
    import grain  # pylint: disable=g-import-not-at-top
    self.paths = cached_shard_paths(root, split)
    self._source = grain.sources.ArrayRecordDataSource(self.paths)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return decode_cached_record(self._source[index])
