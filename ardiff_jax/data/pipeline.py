"""grain input pipelines: `make_dataset(data_cfg, ...)` -> per-process batches.

Layout of one pipeline (B = per-process batch, S = image side):

  MapDataset.source(source)                   global, random access
    .map_with_index(attach source index)      the example's id, stable across epochs and views
    [train] .shuffle(seed).repeat()           new permutation each epoch (grain seeds epoch e with seed+e)
    .map_with_index(decode [+ flip])          uses the GLOBAL stream index -> independent of process count
    [p::P]                                    process p takes global positions p, p+P, p+2P, ...
  .to_iter_dataset()                          threads decode ahead, order preserved
    [num_workers>0] .mp_prefetch()            worker processes decode; grain interleaves them round robin,
                                              which restores the in-process element order
    .filter(drop_unreadable)                  main process: counts corrupt images, warns once
    .batch(B, drop_remainder=train)           main process, so batches do not depend on num_workers
    .map(finalize)                            uint8 -> float32 [-1, 1], labels and ids -> int32

Decoding in workers but batching in the main process moves single examples
between processes (uint8 images, 4x smaller than float) and keeps the element
order, the skip count and the warning exact for any `num_workers`.
With P processes at global batch P*B, the union of the P local step-k batches is
the single-process step-k batch (as a set), as long as no image is skipped.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import threading
from typing import Any

import grain
import numpy as np

from ardiff_jax.data import captions, sources
from ardiff_jax.data import transforms

_LOG = logging.getLogger(__name__)
SOURCES = ("digits", "folder", "tfds", "cached", "coco")
# Marker key of an element whose image could not be decoded; its value names it.
_UNREADABLE = "_unreadable"
# Salt separating the flip stream from any other use of (seed, index).
_FLIP_SALT = 0x5F11B


# ------------------------------------------------------ skipped-image count
class _SkipCounter:
  """Process-local count of unreadable images, plus the warn-once flag."""

  def __init__(self):
    self._lock = threading.Lock()
    self.count = 0
    self.warned = False

  def record(self, name: str, error: str) -> None:
    with self._lock:
      self.count += 1
      first = not self.warned
      self.warned = True
    if first:
      _LOG.warning("Skipping unreadable image '%s' (%s). Later unreadable images are skipped "
                   "silently and counted in num_skipped_images().", name, error)

  def reset(self) -> None:
    with self._lock:
      self.count, self.warned = 0, False


_SKIPPED = _SkipCounter()


def num_skipped_images() -> int:
  """Unreadable images dropped so far by pipelines in this process."""
  return _SKIPPED.count


class DataError(ValueError):
  """The data cannot be trained on as configured; the message says what to change."""


# A skipped fraction is judged only after this many images were read, so that one unreadable
# file among the first few does not stop a run.
MIN_IMAGES_FOR_SKIP_CHECK = 500


def check_skipped_fraction(num_skipped: int, num_read: int, max_fraction: float,
                           min_read: int = MIN_IMAGES_FOR_SKIP_CHECK) -> None:
  """Raises DataError when more than `max_fraction` of the `num_read` images read so far (once at
  least `min_read` were read) were unreadable: a folder of mostly corrupt images must not train,
  or be evaluated, on its few good ones (`data.max_skipped_fraction`)."""
  if num_read < min_read or num_skipped <= max_fraction * num_read:
    return
  raise DataError(
      f"{num_skipped} of the {num_read} images read so far ({num_skipped / num_read:.1%}) could not "
      f"be decoded, more than data.max_skipped_fraction={max_fraction}: repair or remove the "
      "unreadable files (the first one is named in the log), or raise data.max_skipped_fraction")


def reset_skipped_images() -> None:
  """Zeroes the skip count and re-arms the one-time warning (tests, new runs)."""
  _SKIPPED.reset()


def _keep_readable(element: dict[str, Any]) -> bool:
  """grain filter: False (drop) for unreadable-image markers, which are counted."""
  if _UNREADABLE in element:
    _SKIPPED.record(element[_UNREADABLE], element["error"])
    return False
  return True


# ------------------------------------------------------------- per-element
def flip_coin(seed: int, index: int) -> bool:
  """Deterministic fair coin for global stream position `index` under `seed`."""
  return bool(np.random.default_rng([_FLIP_SALT, seed % 2**32, index]).random() < 0.5)


def _decode_image(index: int, record: dict[str, Any], *, image_size: int,
                  flip_seed: int | None, caption_ids=None) -> dict[str, Any]:
  """Record -> {"image": uint8 [S, S, 3], "label": int}, or an unreadable marker; a captioned
  record adds `caption_ids(record["caption"])` ({"caption_ids", "clip_ids"}, data/captions.py).

  `flip_seed=None` disables flipping; otherwise the flip depends on (seed, index).
  """
  try:
    image = sources.decode_image_record(record, image_size)
  except transforms.IMAGE_DECODE_ERRORS as error:  # corrupt files must never crash a run
    return {_UNREADABLE: sources.record_name(record), "error": f"{type(error).__name__}: {error}"}
  if flip_seed is not None and flip_coin(flip_seed, index):
    image = transforms.hflip(image)
  out = {"image": image, "label": record["label"]}
  if caption_ids is not None and "caption" in record:
    out.update(caption_ids(record["caption"]))
  return out


def _select_view(index: int, record: dict[str, Any], *, flip_seed: int | None,
                 views: int = 1, view_seed: int | None = None) -> dict[str, Any]:
  """Cached record -> {"moments": f32 [h, w, 2C] | "codes": int [h, w], "label"}: in training one
  of its views at random (the mirror image with p = 0.5; one of V codes views uniformly), else
  the first (the image itself). With `views` = k > 1 (codes only; ST-AR's two views) "codes" is
  [k, h, w]: k distinct views drawn uniformly without replacement under `view_seed` (training,
  with or without random flips), else the first k."""
  if "moments" in record:
    use_flip = flip_seed is not None and flip_coin(flip_seed, index)
    return {"moments": record["moments_flip" if use_flip else "moments"], "label": record["label"]}
  available = record["codes"].shape[0]
  if views > 1:
    if views > available:
      raise ValueError(f"data.views={views} distinct views per example, but the cache holds "
                       f"{available} per image: cache with cache.ten_crop=True (10 views) or "
                       f"lower data.views")
    chosen = (np.arange(views) if view_seed is None else
              np.random.default_rng([_FLIP_SALT, view_seed % 2**32, index]).choice(
                  available, views, replace=False))
    return {"codes": record["codes"][chosen], "label": record["label"]}
  if flip_seed is None or available == 1:
    view = 0
  elif available == 2:
    view = int(flip_coin(flip_seed, index))
  else:
    view = int(np.random.default_rng([_FLIP_SALT, flip_seed % 2**32, index]).integers(available))
  return {"codes": record["codes"][view], "label": record["label"]}


def _attach_index(index: int, record: Any, *, size: int) -> tuple[int, Any]:
  """Before the shuffle, `index` modulo the source's `size` is the record's position in its
  source (grain's repeat and shuffle address later epochs by indices past the end): the
  example's id."""
  return index % size, record


def _decode_with_id(index: int, item: tuple[int, Any], *, decode) -> dict[str, Any]:
  """(stream index, (source index, record)) -> decode(stream index, record) plus "index": the
  source index, so that a method can tell two draws of one example apart from two examples."""
  source_index, record = item
  out = decode(index, record)
  if _UNREADABLE not in out:
    out["index"] = source_index
  return out


def _finalize_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Stacked batch -> contract dtypes: image f32 [b, S, S, 3] in [-1, 1] (or moments f32, codes
  int32), label int32 [b], index int32 [b] (each example's position in its source split)."""
  out = {"label": np.asarray(batch["label"], dtype=np.int32),
         "index": np.asarray(batch["index"], dtype=np.int32)}
  for key in ("caption_ids", "clip_ids"):
    if key in batch:
      out[key] = np.asarray(batch[key], dtype=np.int32)
  if "image" in batch:
    out["image"] = transforms.to_unit_range(batch["image"])
  elif "codes" in batch:
    out["codes"] = np.asarray(batch["codes"], dtype=np.int32)
  else:
    out["moments"] = np.asarray(batch["moments"], dtype=np.float32)
  return out


# ----------------------------------------------------------------- sources
def _check_source(data_cfg) -> str:
  if data_cfg.source not in SOURCES:
    raise ValueError(f"data.source must be one of {SOURCES}, got {data_cfg.source!r}.")
  return data_cfg.source


def class_names(data_cfg) -> list[str]:
  """Label names, index = label id (folder: sorted subfolders of the train split)."""
  source = _check_source(data_cfg)
  if source == "digits":
    return [str(d) for d in range(sources.DIGITS_NUM_CLASSES)]
  if source == "folder":
    split = data_cfg.train_split
    if not os.path.isdir(os.path.join(data_cfg.path, split)):
      split = data_cfg.eval_split  # eval-only folders (e.g. FID reference sets)
    return sources.folder_class_names(data_cfg.path, split)
  if source == "tfds":
    return sources.tfds_class_names(data_cfg.tfds_name, data_cfg.path)
  if source == "coco":
    return ["image"]
  return [str(i) for i in range(data_cfg.num_classes)]  # cached: ids only


def num_source_classes(data_cfg, source) -> int | None:
  """The number of classes `source` holds (its metadata; for a cache, the largest label seen plus
  one, from the labels of up to LABEL_PROBE records), or None where it is not known."""
  if data_cfg.source == "digits":
    return sources.DIGITS_NUM_CLASSES
  if data_cfg.source in ("folder", "coco"):
    return len(source.class_names)
  if data_cfg.source == "tfds":
    return len(sources.tfds_class_names(data_cfg.tfds_name, data_cfg.path))
  if len(source) == 0:
    return None
  indices = np.unique(np.linspace(0, len(source) - 1, min(LABEL_PROBE, len(source))).astype(int))
  return 1 + max(int(source[int(i)]["label"]) for i in indices)


LABEL_PROBE = 256


def check_num_classes(data_cfg, source, split: str) -> None:
  """Refuses a source with more classes than `data.num_classes`: its labels at or above it would
  index past a class embedding (NaN) or be read as the CFG null class. Fewer classes than
  configured only leave class embeddings unused: a warning (not for a cache, whose labels are
  only sampled)."""
  found = num_source_classes(data_cfg, source)
  want = int(data_cfg.num_classes)
  if found is None or found == want:
    return
  where = {"folder": f"data.path={data_cfg.path!r}", "tfds": f"data.tfds_name={data_cfg.tfds_name!r}",
           "cached": f"the cache at data.path={data_cfg.path!r}", "digits": "digits"}[data_cfg.source]
  what = (f"has labels up to {found - 1}" if data_cfg.source == "cached" else f"has {found} classes")
  if data_cfg.source == "folder":
    what += f" ({', '.join(source.class_names[:12])}{', ...' if found > 12 else ''})"
  if found < want:
    if data_cfg.source != "cached":
      _LOG.warning("split %r of %s %s, fewer than data.num_classes=%d", split, where, what, want)
    return
  raise DataError(f"split {split!r} of {where} {what}, but data.num_classes={want}: set "
                  f"--config.data.num_classes={found} (or point data at the dataset you meant)")


def make_source(data_cfg, split: str, seed: int):
  """The random-access source of `split` (seed only matters for the digits split)."""
  source = _check_source(data_cfg)
  if source == "digits":
    return sources.DigitsSource(split, image_size=data_cfg.image_size, seed=seed,
                                test_fraction=data_cfg.digits_test_fraction)
  if source == "folder":
    # Train-split class names make label ids agree between train and eval splits;
    # without a train split (eval-only folders) the split's own subfolders are used.
    has_train = os.path.isdir(os.path.join(data_cfg.path, data_cfg.train_split))
    names = sources.folder_class_names(data_cfg.path, data_cfg.train_split) if has_train else None
    return sources.FolderSource(data_cfg.path, split, names)
  if source == "tfds":
    return sources.TfdsSource(data_cfg.tfds_name, split, data_cfg.path)
  if source == "coco":
    return sources.CocoCaptionsSource(data_cfg.path, split)
  return sources.CachedSource(data_cfg.path, split)


def num_examples(data_cfg, split: str) -> int:
  """Examples in `split` (folder: a directory listing; others: metadata/index only)."""
  if _check_source(data_cfg) == "digits":
    # Split sizes do not depend on the seed, only on the fraction.
    return len(sources.digits_split_indices(split, seed=0, test_fraction=data_cfg.digits_test_fraction))
  return len(make_source(data_cfg, split, seed=0))


# ---------------------------------------------------------------- pipeline
def _read_options(batch_size: int, num_workers: int) -> grain.ReadOptions:
  """Decode threads per reading process: share the cores among workers; two batches ahead."""
  cores = os.cpu_count() or 1
  threads = max(1, min(16, cores // max(1, num_workers)))
  return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(2 * batch_size, 16))


def _global_map_dataset(data_cfg, source, *, seed: int, train: bool) -> grain.MapDataset:
  """Global (all-process) stream: shuffled+repeated in training, decoded by global index."""
  ds = grain.MapDataset.source(source)
  ds = ds.map_with_index(functools.partial(_attach_index, size=len(source)))
  if train:
    # shuffle before repeat: the repeat passes the global index through, and the
    # shuffle seeds epoch e with seed+e, so every epoch gets a new permutation.
    ds = ds.shuffle(seed=seed % 2**32).repeat()
  flip_seed = seed if (train and data_cfg.random_flip) else None
  if data_cfg.source == "cached":
    views = int(data_cfg.get("views", 1))
    if views < 1:
      raise ValueError(f"data.views={views} must be ≥ 1 (views of each cached example per item)")
    decode = functools.partial(_select_view, flip_seed=flip_seed, views=views,
                               view_seed=seed if train else None)
  else:
    ids = (captions.caption_encoder(int(data_cfg.caption_max_ids), data_cfg.clip_tokenizer)
           if data_cfg.source == "coco" else None)
    decode = functools.partial(_decode_image, image_size=data_cfg.image_size, flip_seed=flip_seed,
                               caption_ids=ids)
  return ds.map_with_index(functools.partial(_decode_with_id, decode=decode))


PROBE_IMAGES = 16


def check_images_readable(data_cfg, source, split: str) -> None:
  """Fails fast when none of `PROBE_IMAGES` evenly spaced images of an image source decodes.

  A training stream skips unreadable files, so a directory of nothing but unreadable files
  would otherwise wait forever for its first batch.
  """
  if data_cfg.source in ("digits", "cached") or len(source) == 0:
    return
  indices = np.unique(np.linspace(0, len(source) - 1, min(PROBE_IMAGES, len(source))).astype(int))
  errors = []
  for i in indices:
    record = source[int(i)]
    try:
      sources.decode_image_record(record, data_cfg.image_size)
      return
    except transforms.IMAGE_DECODE_ERRORS as error:
      errors.append(f"{sources.record_name(record)}: {type(error).__name__}: {error}")
  where = f"data.path={data_cfg.path!r}" if data_cfg.path else f"data.tfds_name={data_cfg.tfds_name!r}"
  raise ValueError(f"none of {len(indices)} images sampled from split {split!r} of {where} can be "
                   f"decoded (first: {errors[0]}). Check that the files are images Pillow reads "
                   "(JPEG/PNG) and were copied completely.")


def _ensure_flags_parsed() -> None:
  """Marks absl flags parsed if nothing has parsed them yet.

  grain's worker processes read absl flags; outside `app.run` (notebooks, tests)
  they are unparsed and grain fails. A later `app.run` still parses argv.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def open_source(data_cfg, split: str, seed: int):
  """`make_source`, then the checks every reader of it needs: the class count against
  `data.num_classes` and a split that has readable images."""
  source = make_source(data_cfg, split, seed)
  check_num_classes(data_cfg, source, split)
  check_images_readable(data_cfg, source, split)
  return source


def make_dataset(data_cfg, *, split: str, seed: int, batch_size: int, train: bool,
                 process_index: int = 0, process_count: int = 1, source=None) -> grain.IterDataset:
  """Per-process batches of `split` as a grain IterDataset (iterators checkpointable).

  Yields {"image": f32 [B, S, S, 3] in [-1, 1], "label": int32 [B], "index": int32 [B]} for
  image sources, {"moments": f32 [B, h, w, 2C] | "codes": int32 [B, h, w], "label", "index"} for
  the cached source (codes: one of each record's views in training, the first otherwise; with
  `data_cfg.views` = k > 1, codes [B, k, h, w] of k distinct views);
  "index" is each example's position in its split, the same in every epoch.
  `batch_size` B is per process. train=True: seeded shuffle, infinite repeat,
  random flip (if data_cfg.random_flip), full batches only. train=False: dataset
  order, one pass, no flip, last batch may be short. Unreadable images are dropped
  and counted (`num_skipped_images()`). `source`: the split's `open_source(data_cfg, split, seed)`
  when the caller already opened it (a folder listing is not repeated).
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}.")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count}).")
  if source is None:
    source = open_source(data_cfg, split, seed)
  ds = _global_map_dataset(data_cfg, source, seed=seed, train=train)
  ds = ds[process_index::process_count]
  num_workers = int(data_cfg.num_workers)
  stream = ds.to_iter_dataset(_read_options(batch_size, num_workers))
  if num_workers > 0:
    _ensure_flags_parsed()
    # Each worker's queue holds its share of two batches, so workers never idle on a full queue.
    per_worker = 2 * math.ceil(batch_size / num_workers)
    stream = stream.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=per_worker))
  stream = stream.filter(_keep_readable)
  return stream.batch(batch_size, drop_remainder=train).map(_finalize_batch)
