"""Tests for ardiff_jax.data.sources: digits, folder listing, record decoding, cache I/O."""
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from ardiff_jax.data import sources


# ------------------------------------------------------------------- digits
def test_digits_shapes_and_classes():
  src = sources.DigitsSource("train", image_size=16, seed=0, test_fraction=0.2)
  record = src[0]
  assert record["image"].shape == (16, 16, 3) and record["image"].dtype == np.uint8
  np.testing.assert_array_equal(record["image"][..., 0], record["image"][..., 2])
  labels = np.array([src[i]["label"] for i in range(len(src))])
  assert set(labels.tolist()) == set(range(10))
  assert record["image"].max() > 200 and record["image"].min() == 0  # full 0..255 range used


def test_digits_split_sizes_disjoint_stratified():
  train = sources.digits_split_indices("train", seed=0, test_fraction=0.2)
  test = sources.digits_split_indices("test", seed=0, test_fraction=0.2)
  assert len(train) + len(test) == 1797 and len(test) == 360
  assert not set(train.tolist()) & set(test.tolist())
  labels = sources._load_digits_uint8()[1]
  counts = np.bincount(labels[test], minlength=10)
  assert counts.min() >= 35 and counts.max() <= 37  # stratified: ~18/class per 10%


def test_digits_split_fixed_by_seed():
  a = sources.digits_split_indices("test", seed=3, test_fraction=0.2)
  b = sources.digits_split_indices("test", seed=3, test_fraction=0.2)
  c = sources.digits_split_indices("test", seed=4, test_fraction=0.2)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_digits_bad_split_message():
  with pytest.raises(ValueError, match="digits has splits 'train' and 'test'"):
    sources.digits_split_indices("validation", seed=0, test_fraction=0.2)


# ------------------------------------------------------------------- folder
def _touch_image(path, fmt="PNG"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new("RGB", (4, 4), (10, 20, 30)).save(path, format=fmt)


def test_folder_listing_extensions_and_labels(tmp_path):
  root = tmp_path / "ds"
  _touch_image(root / "train" / "zebra" / "a.JPG", "JPEG")
  _touch_image(root / "train" / "zebra" / "b.Png")
  _touch_image(root / "train" / "apple" / "c.webp", "WEBP")
  _touch_image(root / "train" / "apple" / "nested" / "d.bmp", "BMP")
  (root / "train" / "apple" / "notes.txt").write_text("not an image")
  (root / "train" / "apple" / "._e.jpg").write_bytes(b"macOS resource fork")
  src = sources.FolderSource(str(root), "train")
  assert src.class_names == ["apple", "zebra"]
  records = [src[i] for i in range(len(src))]
  assert [os.path.basename(r["path"]) for r in records] == ["c.webp", "d.bmp", "a.JPG", "b.Png"]  # sorted paths
  assert [r["label"] for r in records] == [0, 0, 1, 1]


def test_folder_eval_split_uses_train_class_ids(tmp_path):
  root = tmp_path / "ds"
  for name in ("a", "b", "c"):
    _touch_image(root / "train" / name / "x.png")
  _touch_image(root / "test" / "c" / "y.png")  # eval split lacks classes a and b
  src = sources.FolderSource(str(root), "test", class_names=["a", "b", "c"])
  assert src[0]["label"] == 2


def test_folder_unknown_eval_class_message(tmp_path):
  _touch_image(tmp_path / "test" / "d" / "y.png")
  with pytest.raises(ValueError, match=r"class subfolders \['d'\] that are not among"):
    sources.FolderSource(str(tmp_path), "test", class_names=["a", "b"])


def test_folder_missing_directory_message(tmp_path):
  with pytest.raises(FileNotFoundError) as info:
    sources.FolderSource(str(tmp_path / "nowhere"), "train")
  message = str(info.value)
  assert "Image folder split directory not found" in message
  assert os.path.join(str(tmp_path / "nowhere"), "train") in message
  assert "one subfolder per class" in message and ".jpg" in message


def test_folder_without_classes_message(tmp_path):
  (tmp_path / "train").mkdir()
  with pytest.raises(ValueError, match="has no class subfolders"):
    sources.FolderSource(str(tmp_path), "train")


def test_folder_without_images_message(tmp_path):
  (tmp_path / "train" / "cat").mkdir(parents=True)
  (tmp_path / "train" / "cat" / "readme.txt").write_text("x")
  with pytest.raises(ValueError, match=r"has class subfolders \['cat'\] but no image files"):
    sources.FolderSource(str(tmp_path), "train")


# ------------------------------------------------------------ image records
def _png_bytes(arr):
  buffer = io.BytesIO()
  Image.fromarray(arr).save(buffer, format="PNG")
  return buffer.getvalue()


def test_decode_image_record_bytes_and_arrays():
  rgb = np.random.default_rng(0).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
  np.testing.assert_array_equal(sources.decode_image_record({"image": _png_bytes(rgb)}, 8), rgb)
  assert sources.decode_image_record({"image": rgb}, 8) is rgb  # pass-through
  gray = rgb[..., :1]
  out = sources.decode_image_record({"image": gray}, 8)
  assert out.shape == (8, 8, 3)
  np.testing.assert_array_equal(out[..., 1], gray[..., 0])
  rgba = np.concatenate([rgb, np.full((8, 8, 1), 255, np.uint8)], axis=-1)
  np.testing.assert_array_equal(sources.decode_image_record({"image": rgba}, 8), rgb)
  assert sources.decode_image_record({"image": rgb}, 4).shape == (4, 4, 3)


def test_record_name():
  assert sources.record_name({"path": "/a/b.jpg"}) == "/a/b.jpg"
  assert sources.record_name({"key": "mnist/train#3"}) == "mnist/train#3"


# ------------------------------------------------------------------- cached
def _cached_records(n, offset=0):
  for i in range(n):
    moments = np.full((2, 3, 4), offset + i, dtype=np.float32)
    yield {"moments": moments, "moments_flip": -moments - 0.5, "label": (offset + i) % 10}


def test_cached_shard_roundtrip(tmp_path):
  path = str(tmp_path / "train" / "shard-00000.array_record")
  assert sources.write_cached_shard(path, _cached_records(5)) == 5
  src = sources.CachedSource(str(tmp_path), "train")
  assert len(src) == 5
  for i, expected in enumerate(_cached_records(5)):
    record = src[i]
    assert record["moments"].dtype == np.float32 and record["moments"].shape == (2, 3, 4)
    np.testing.assert_array_equal(record["moments"], expected["moments"])
    np.testing.assert_array_equal(record["moments_flip"], expected["moments_flip"])
    assert record["label"] == expected["label"]


def test_cached_shape_mismatch_message():
  with pytest.raises(ValueError, match=r"must both be \[h, w, 2C\]"):
    sources.encode_cached_record(np.zeros((2, 2, 4)), np.zeros((2, 2, 2)), 0)


def test_cached_missing_and_empty_messages(tmp_path):
  with pytest.raises(FileNotFoundError, match="Cached latent directory not found"):
    sources.CachedSource(str(tmp_path), "train")
  (tmp_path / "train").mkdir()
  with pytest.raises(ValueError, match=r"holds no '\*\.array_record' shards"):
    sources.CachedSource(str(tmp_path), "train")


def test_cached_record_errors_name_the_fix():
  with pytest.raises(ValueError, match="rewrite the cache with --mode cache"):
    sources.decode_cached_record(b"PK\x03\x04 an npz from an older cache")
  good = sources.encode_cached_record(np.ones((2, 2, 4)), np.ones((2, 2, 4)), 3)
  with pytest.raises(ValueError, match="truncated cache record"):
    sources.decode_cached_record(good[:-4])


def test_cached_records_decode_concurrently():
  # grain decodes records from several threads; the format must not depend on thread-unsafe parsing.
  import concurrent.futures  # pylint: disable=g-import-not-at-top
  data = [sources.encode_cached_record(np.full((4, 4, 8), i, np.float32), np.zeros((4, 4, 8)), i)
          for i in range(64)]
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    out = list(pool.map(sources.decode_cached_record, data * 50))
  assert all(o["label"] == i % 64 and o["moments"][0, 0, 0] == i % 64 for i, o in enumerate(out))


# ------------------------------------------------------------------------- coco
def write_coco(root, split="train", captions=(("a red square", "red thing"), ("a blue square",)),
               size=20):
  """A COCO-2017-shaped folder: annotations/captions_<split>2017.json and <split>2017/*.jpg, one
  solid-colour image per entry of `captions` (image ids in reverse file order)."""
  (root / "annotations").mkdir(parents=True, exist_ok=True)
  (root / f"{split}2017").mkdir(parents=True, exist_ok=True)
  images, annotations = [], []
  for i, texts in enumerate(captions):
    name = f"{i:012d}.jpg"
    Image.new("RGB", (size, size), (255 * (i % 2), 0, 255 * (1 - i % 2))).save(
        root / f"{split}2017" / name)
    images.append({"id": 100 - i, "file_name": name})
    annotations += [{"id": 10 * i + j, "image_id": 100 - i, "caption": t} for j, t in enumerate(texts)]
  (root / "annotations" / f"captions_{split}2017.json").write_text(
      json.dumps({"images": images, "annotations": annotations}))
  return str(root)


def test_coco_source_has_one_record_per_caption_ordered_by_image(tmp_path):
  root = write_coco(tmp_path)
  source = sources.CocoCaptionsSource(root, "train")
  assert len(source) == 3
  first = source[0]      # image id 99 (the second file) sorts first
  assert first["caption"] == "a blue square" and first["label"] == 0
  assert first["path"].endswith("train2017/000000000001.jpg")
  assert [source[i]["caption"] for i in (1, 2)] == ["a red square", "red thing"]
  with pytest.raises(ValueError, match="captions_val2017.json.*does not exist.*data.path"):
    sources.CocoCaptionsSource(root, "val")
