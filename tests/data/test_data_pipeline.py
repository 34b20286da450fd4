"""Tests for ardiff_jax.data.pipeline.make_dataset (grain), on digits, folders, tfds, caches."""
import collections
import functools
import hashlib
import itertools
import logging
import os
import sys
import tarfile

import ml_collections
import numpy as np
import pytest
from PIL import Image

from ardiff_jax.data import pipeline
from ardiff_jax.data import sources

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _cfg(**overrides):
  fields = dict(source="digits", path="", tfds_name="", train_split="train", eval_split="test",
                image_size=16, random_flip=True, num_classes=10, digits_test_fraction=0.2,
                num_workers=0)
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def _take(ds, n):
  return list(itertools.islice(iter(ds), n))


def _keys(batch):
  """Multiset of (label, image hash) for one batch."""
  return collections.Counter(
      (int(label), hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest())
      for label, image in zip(batch["label"], batch["image"]))


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])


@pytest.fixture(autouse=True)
def _fresh_skip_counter():
  pipeline.reset_skipped_images()
  yield
  pipeline.reset_skipped_images()


def _write_folder(root, per_class=6, classes=("cat", "dog"), size=(20, 14)):
  """Writes small random images (PNG and JPEG alternating) as <root>/train/<class>/."""
  rng = np.random.default_rng(0)
  for c, name in enumerate(classes):
    class_dir = os.path.join(root, "train", name)
    os.makedirs(class_dir, exist_ok=True)
    for i in range(per_class):
      arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
      ext = "png" if i % 2 == 0 else "jpg"
      Image.fromarray(arr).save(os.path.join(class_dir, f"{c}_{i:02d}.{ext}"))
  return str(root)


# ------------------------------------------------------------ determinism
def test_digits_batches_contract_and_determinism():
  cfg = _cfg()
  first = _take(pipeline.make_dataset(cfg, split="train", seed=0, batch_size=8, train=True), 3)
  again = _take(pipeline.make_dataset(cfg, split="train", seed=0, batch_size=8, train=True), 3)
  other = _take(pipeline.make_dataset(cfg, split="train", seed=1, batch_size=8, train=True), 3)
  batch = first[0]
  assert set(batch) == {"image", "label", "index"}
  assert batch["image"].shape == (8, 16, 16, 3) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
  assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
  for a, b in zip(first, again):
    _assert_batches_equal(a, b)
  assert any(not np.array_equal(a["image"], b["image"]) for a, b in zip(first, other))


def test_index_names_the_source_example_in_every_epoch(tmp_path):
  """"index" is the example's position in its split, whatever the shuffle, epoch or flip: a
  method can tell an image drawn again from a new one (condition refinement's queue)."""
  cfg = _cfg(source="folder", path=_write_folder(tmp_path), image_size=16)
  source = pipeline.make_source(cfg, "train", seed=0)
  batches = _take(pipeline.make_dataset(cfg, split="train", seed=3, batch_size=4, train=True), 9)
  ids = np.concatenate([b["index"] for b in batches])        # 36 draws of 12 images: 3 epochs
  assert ids.dtype == np.int32
  for epoch in np.split(ids, 3):
    assert sorted(epoch.tolist()) == list(range(12))
  assert not np.array_equal(ids[:12], ids[12:24])             # reshuffled, ids follow the images
  for batch in batches:
    for image, index in zip(batch["image"], batch["index"]):
      expected = pipeline.transforms.to_unit_range(
          sources.decode_image_record(source[int(index)], 16))
      assert (np.array_equal(image, expected)
              or np.array_equal(image, pipeline.transforms.hflip(expected)))


def test_process_split_union_equals_single_process():
  cfg = _cfg()
  single = _take(pipeline.make_dataset(cfg, split="train", seed=5, batch_size=8, train=True), 3)
  locals_ = [_take(pipeline.make_dataset(cfg, split="train", seed=5, batch_size=4, train=True,
                                         process_index=p, process_count=2), 3) for p in range(2)]
  for k in range(3):
    part0, part1 = _keys(locals_[0][k]), _keys(locals_[1][k])
    assert not part0 & part1
    assert part0 + part1 == _keys(single[k])


def test_bad_process_index_message():
  with pytest.raises(ValueError, match=r"process_index=2 must be in \[0, process_count=2\)"):
    pipeline.make_dataset(_cfg(), split="train", seed=0, batch_size=4, train=True,
                          process_index=2, process_count=2)


def test_iterator_state_restore():
  cfg = _cfg()
  it = iter(pipeline.make_dataset(cfg, split="train", seed=2, batch_size=8, train=True))
  next(it), next(it)
  state = it.get_state()
  expected = next(it)
  fresh = iter(pipeline.make_dataset(cfg, split="train", seed=2, batch_size=8, train=True))
  fresh.set_state(state)
  _assert_batches_equal(next(fresh), expected)


def test_eval_is_one_ordered_pass_with_short_last_batch():
  cfg = _cfg()
  batches = list(pipeline.make_dataset(cfg, split="test", seed=0, batch_size=100, train=False))
  assert [b["image"].shape[0] for b in batches] == [100, 100, 100, 60]
  assert pipeline.num_examples(cfg, "test") == 360 and pipeline.num_examples(cfg, "train") == 1437
  src = sources.DigitsSource("test", image_size=16, seed=0, test_fraction=0.2)
  labels = np.concatenate([b["label"] for b in batches])
  np.testing.assert_array_equal(labels, [src[i]["label"] for i in range(len(src))])
  assert pipeline.class_names(cfg) == [str(d) for d in range(10)]


# ----------------------------------------------------------------- repeat
def test_repeat_reshuffles_each_epoch(tmp_path):
  cfg = _cfg(source="folder", path=_write_folder(tmp_path), random_flip=False)
  batches = _take(pipeline.make_dataset(cfg, split="train", seed=0, batch_size=4, train=True), 9)
  epochs = [sum((_keys(b) for b in batches[e * 3:(e + 1) * 3]), collections.Counter()) for e in range(3)]
  assert epochs[0] == epochs[1] == epochs[2] and sum(epochs[0].values()) == 12
  order = lambda bs: [h for b in bs for h in _keys(b)]  # noqa: E731
  assert order(batches[0:3]) != order(batches[3:6])


def test_random_flip_depends_on_position(tmp_path):
  # One image, repeated: the flip coin differs between stream positions.
  root = tmp_path / "one"
  os.makedirs(root / "train" / "a")
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8)).save(
      root / "train" / "a" / "x.png")
  cfg = _cfg(source="folder", path=str(root))
  batch = _take(pipeline.make_dataset(cfg, split="train", seed=0, batch_size=16, train=True), 1)[0]
  first = batch["image"][0]
  flipped = [not np.array_equal(x, first) for x in batch["image"]]
  assert any(flipped) and not all(flipped[1:])
  for x, f in zip(batch["image"], flipped):
    np.testing.assert_array_equal(x, first[:, ::-1] if f else first)


# --------------------------------------------------------- corrupt images
def test_corrupt_image_is_skipped_counted_and_warned_once(tmp_path, caplog):
  root = _write_folder(tmp_path)
  bad = os.path.join(root, "train", "dog", "1_99_bad.jpg")
  with open(bad, "wb") as f:
    f.write(b"\xff\xd8\xff\xe0 truncated garbage")
  cfg = _cfg(source="folder", path=root, random_flip=False, num_classes=2)
  assert pipeline.num_examples(cfg, "train") == 13
  with caplog.at_level(logging.WARNING, logger=pipeline.__name__):
    batches = list(pipeline.make_dataset(cfg, split="train", seed=0, batch_size=5, train=False))
    assert [b["label"].shape[0] for b in batches] == [5, 5, 2]
    assert pipeline.num_skipped_images() == 1
    # Two more epochs in training mode: counted again, but never warned again.
    _take(pipeline.make_dataset(cfg, split="train", seed=0, batch_size=4, train=True), 6)
  assert pipeline.num_skipped_images() == 3
  warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == pipeline.__name__]
  assert len(warnings) == 1 and bad in warnings[0].getMessage()
  pipeline.reset_skipped_images()
  assert pipeline.num_skipped_images() == 0


def test_missing_and_empty_folder_messages(tmp_path):
  cfg = _cfg(source="folder", path=str(tmp_path / "missing"))
  with pytest.raises(FileNotFoundError, match="Image folder split directory not found"):
    pipeline.make_dataset(cfg, split="train", seed=0, batch_size=4, train=True)
  (tmp_path / "empty" / "train").mkdir(parents=True)
  cfg = _cfg(source="folder", path=str(tmp_path / "empty"))
  with pytest.raises(ValueError, match="has no class subfolders"):
    pipeline.make_dataset(cfg, split="train", seed=0, batch_size=4, train=True)


def test_folder_of_only_unreadable_images_fails_fast(tmp_path):
  """A training stream skips unreadable files; with nothing readable it would wait forever."""
  for cls in ("a", "b"):
    (tmp_path / "train" / cls).mkdir(parents=True)
    for i in range(3):
      (tmp_path / "train" / cls / f"{i}.jpg").write_bytes(b"not a jpeg" * i)
  cfg = _cfg(source="folder", path=str(tmp_path))
  with pytest.raises(ValueError, match=r"none of 6 images sampled from split 'train' .* can be decoded"):
    pipeline.make_dataset(cfg, split="train", seed=0, batch_size=4, train=True)


def test_unknown_source_message():
  with pytest.raises(ValueError, match="data.source must be one of"):
    pipeline.make_dataset(_cfg(source="lmdb"), split="train", seed=0, batch_size=4, train=True)


# ----------------------------------------------------------------- CIFAR-10
def _cifar_tar():
  default = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "cifar10-jpg.tar.gz")
  return os.environ.get("ARDIFF_CIFAR10_TAR", os.path.normpath(default))


def _extract_cifar_subset(tar_path, dest, per_class):
  """Streams the archive, keeping the first `per_class` images of every (split, class)."""
  counts = collections.Counter()
  with tarfile.open(tar_path, mode="r|gz") as archive:
    for member in archive:
      parts = member.name.split("/")  # cifar10/<split>/<class>/<file>
      if not member.isfile() or len(parts) != 4 or counts[tuple(parts[1:3])] >= per_class:
        continue
      counts[tuple(parts[1:3])] += 1
      target = os.path.join(dest, *parts)
      os.makedirs(os.path.dirname(target), exist_ok=True)
      with open(target, "wb") as f:
        f.write(archive.extractfile(member).read())
      if len(counts) == 20 and min(counts.values()) >= per_class:
        break  # every split/class filled
  return os.path.join(dest, "cifar10")


def test_folder_on_cifar10_subset(tmp_path):
  tar_path = _cifar_tar()
  if not os.path.exists(tar_path):
    pytest.skip(f"CIFAR-10 archive not found at {tar_path} (set ARDIFF_CIFAR10_TAR to its location)")
  root = _extract_cifar_subset(tar_path, str(tmp_path), per_class=2)
  cfg = _cfg(source="folder", path=root, image_size=32)
  assert pipeline.class_names(cfg) == CIFAR_CLASSES
  assert pipeline.num_examples(cfg, "test") == 20
  batches = list(pipeline.make_dataset(cfg, split="test", seed=0, batch_size=8, train=False))
  assert [b["image"].shape for b in batches] == [(8, 32, 32, 3), (8, 32, 32, 3), (4, 32, 32, 3)]
  labels = np.concatenate([b["label"] for b in batches])
  np.testing.assert_array_equal(labels, np.repeat(np.arange(10), 2))
  train = _take(pipeline.make_dataset(cfg, split="train", seed=0, batch_size=8, train=True), 3)
  for batch in train:
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
    assert -1.0 <= batch["image"].min() < -0.5 and 0.5 < batch["image"].max() <= 1.0
    assert batch["label"].min() >= 0 and batch["label"].max() <= 9
  assert pipeline.num_skipped_images() == 0


# --------------------------------------------------------------------- tfds
_TFDS_NAME = "ardiff_tiny_gray"   # registered by the class below (tfds names it from the class name)


@functools.lru_cache(maxsize=1)   # tfds registers a builder class once per process
def _tfds_class():
  """A tiny grayscale tfds dataset (train 12, test 5 images of 8×8, 3 classes), prepared in the
  array_record format that `tfds.data_source` reads, written without TensorFlow (PNG bytes)."""
  import io  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class ArdiffTinyGray(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(8, 8, 1)),
          "label": tfds.features.ClassLabel(names=["a", "b", "c"])}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples(12, 0), "test": self._generate_examples(5, 1)}

    def _generate_examples(self, n, seed):
      rng = np.random.default_rng(seed)
      for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), mode="L").save(buf, "PNG")
        yield i, {"image": buf.getvalue(), "label": i % 3}

  return ArdiffTinyGray


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  _tfds_class()(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return data_dir


def test_tfds_source_reads_a_prepared_dataset_without_tensorflow(tfds_dir):
  """The real `tfds.data_source` path on a dataset prepared in a temporary data_dir."""
  cfg = _cfg(source="tfds", tfds_name=_TFDS_NAME, path=tfds_dir, image_size=16, num_classes=3)
  assert pipeline.num_examples(cfg, "train") == 12
  assert pipeline.class_names(cfg) == ["a", "b", "c"]
  train = _take(pipeline.make_dataset(cfg, split="train", seed=0, batch_size=4, train=True), 4)
  evals = list(pipeline.make_dataset(cfg, split="test", seed=0, batch_size=2, train=False))
  assert all(b["image"].shape == (4, 16, 16, 3) and b["label"].dtype == np.int32 for b in train)
  assert [b["image"].shape[0] for b in evals] == [2, 2, 1]
  assert all(set(b) == {"image", "label", "index"} for b in train + evals)   # string fields dropped
  np.testing.assert_array_equal(train[0]["image"][..., 0], train[0]["image"][..., 2])  # gray -> RGB
  assert sorted(np.concatenate([b["label"] for b in evals]).tolist()) == [0, 0, 1, 1, 2]
  assert "tensorflow" not in sys.modules


@pytest.mark.parametrize("name", [_TFDS_NAME, "mnist"])
def test_tfds_unprepared_dataset_is_one_clear_error_and_downloads_nothing(tmp_path, name):
  _tfds_class()
  cfg = _cfg(source="tfds", tfds_name=name, path=str(tmp_path))
  with pytest.raises(ValueError, match=rf"tfds dataset '{name}' is not prepared in "
                     rf"data_dir='{tmp_path}'.*`tfds build {name} --data_dir={tmp_path}") as e:
    pipeline.make_dataset(cfg, split="train", seed=0, batch_size=4, train=True)
  assert "\n" not in str(e.value)
  assert not any(files for _, _, files in os.walk(tmp_path))   # nothing downloaded or written


def test_tfds_unknown_name_and_class_count_are_refused(tfds_dir):
  with pytest.raises(ValueError, match="data.tfds_name='no_such_dataset_xyz' is not a tfds dataset"):
    pipeline.make_dataset(_cfg(source="tfds", tfds_name="no_such_dataset_xyz", path=tfds_dir),
                          split="train", seed=0, batch_size=4, train=True)
  cfg = _cfg(source="tfds", tfds_name=_TFDS_NAME, path=tfds_dir, num_classes=2)
  with pytest.raises(pipeline.DataError, match=r"has 3 classes, but data.num_classes=2: set "
                     r"--config.data.num_classes=3"):
    pipeline.make_dataset(cfg, split="train", seed=0, batch_size=4, train=True)


# ------------------------------------------------------------------- cached
def _write_cache(root, split, sizes):
  offset = 0
  for shard, n in enumerate(sizes):
    records = [{"moments": np.full((2, 2, 4), offset + i, np.float32),
                "moments_flip": np.full((2, 2, 4), -(offset + i) - 0.5, np.float32),
                "label": (offset + i) % 10} for i in range(n)]
    path = os.path.join(root, split, f"shard-{shard:05d}.array_record")
    assert sources.write_cached_shard(path, records) == n
    offset += n
  return offset


def test_cached_roundtrip_and_flip_selection(tmp_path):
  total = _write_cache(str(tmp_path), "train", [5, 7])
  cfg = _cfg(source="cached", path=str(tmp_path))
  assert pipeline.num_examples(cfg, "train") == total
  evals = list(pipeline.make_dataset(cfg, split="train", seed=0, batch_size=5, train=False))
  moments = np.concatenate([b["moments"] for b in evals])
  assert set(evals[0]) == {"moments", "label", "index"} and moments.dtype == np.float32
  np.testing.assert_array_equal(moments[:, 0, 0, 0], np.arange(total))  # shard order kept
  np.testing.assert_array_equal(np.concatenate([b["index"] for b in evals]), np.arange(total))
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in evals]), np.arange(total) % 10)
  train = _take(pipeline.make_dataset(cfg, split="train", seed=0, batch_size=4, train=True), 6)
  values = np.concatenate([b["moments"][:, 0, 0, 0] for b in train])
  labels = np.concatenate([b["label"] for b in train])
  flipped = values < 0
  assert flipped.any() and (~flipped).any()
  ids = np.where(flipped, -values - 0.5, values).astype(int)
  np.testing.assert_array_equal(ids % 10, labels)  # each example is its record's own variant
  no_flip = _take(pipeline.make_dataset(_cfg(source="cached", path=str(tmp_path), random_flip=False),
                                        split="train", seed=0, batch_size=4, train=True), 6)
  assert all((b["moments"] >= 0).all() for b in no_flip)


# ------------------------------------------------------- worker processes
def test_workers_match_in_process_and_count_skips(tmp_path):
  root = _write_folder(tmp_path)
  with open(os.path.join(root, "train", "cat", "0_50_bad.png"), "wb") as f:
    f.write(b"garbage")
  base = list(pipeline.make_dataset(_cfg(source="folder", path=root), split="train", seed=0,
                                    batch_size=4, train=False))
  assert pipeline.num_skipped_images() == 1
  ds = pipeline.make_dataset(_cfg(source="folder", path=root, num_workers=2), split="train",
                             seed=0, batch_size=4, train=False)
  with_workers = list(ds)
  assert pipeline.num_skipped_images() == 2  # counted in this (the main) process
  assert len(base) == len(with_workers) == 3
  for a, b in zip(base, with_workers):
    _assert_batches_equal(a, b)


def test_eval_only_folder_uses_its_own_classes(tmp_path):
  _write_folder(tmp_path, per_class=2, classes=("b", "a"))
  os.rename(tmp_path / "train", tmp_path / "test")  # no train split at all
  cfg = _cfg(source="folder", path=str(tmp_path))
  assert pipeline.class_names(cfg) == ["a", "b"]
  batches = list(pipeline.make_dataset(cfg, split="test", seed=0, batch_size=8, train=False))
  np.testing.assert_array_equal(batches[0]["label"], [0, 0, 1, 1])


def test_coco_batches_carry_byt5_and_clip_ids(tmp_path):
  from ardiff_jax import configlib  # pylint: disable=g-import-not-at-top
  from tests.data.test_data_sources import write_coco  # pylint: disable=g-import-not-at-top
  from tests.models.test_clip import _tiny_tokenizer  # pylint: disable=g-import-not-at-top
  (tmp_path / "clip").mkdir()
  tok, vocab = _tiny_tokenizer(tmp_path / "clip", context_length=77)
  data = configlib.base_config().data
  data.source, data.path, data.image_size, data.num_classes = "coco", write_coco(tmp_path / "coco"), 16, 1
  data.caption_max_ids, data.clip_tokenizer = 10, str(tmp_path / "clip")
  batch = next(iter(pipeline.make_dataset(data, split="train", seed=0, batch_size=3, train=False)))
  assert batch["image"].shape == (3, 16, 16, 3) and batch["caption_ids"].dtype == np.int32
  np.testing.assert_array_equal(batch["caption_ids"][0], [b + 3 for b in b"a blue sq"] + [1])
  np.testing.assert_array_equal(batch["caption_ids"][2, :10], [b + 3 for b in b"red thing"] + [1])
  assert batch["clip_ids"].shape == (3, 77)
  np.testing.assert_array_equal(batch["clip_ids"][1], tok(["a red square"])[0])
  assert batch["clip_ids"][1, 0] == vocab["<|startoftext|>"]
