"""Evaluation data: sources, preprocessing, batches (mame_jax.eval.data). No network."""

import io
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from mame_jax.eval import data


def _jpeg(array) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, "JPEG", quality=95)
  return buf.getvalue()


def _pattern(h, w, seed):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (h, w, 3)).astype(np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """Three class folders (names out of order on purpose), one broken JPEG."""
  root = tmp_path_factory.mktemp("folder")
  for c, cls in enumerate(["zebra", "ant", "moth"]):
    os.makedirs(root / cls)
    for i in range(3):
      (root / cls / f"{i:02d}.jpg").write_bytes(_jpeg(_pattern(40 + 7 * i, 50, 10 * c + i)))
  (root / "moth" / "01.jpg").write_bytes(_jpeg(_pattern(40, 50, 99))[:300])  # truncated
  (root / "ant" / "notes.txt").write_text("not an image")
  return root


# ----------------------------------------------------------------------------
# Sources


def test_imagenette_labels_are_imagenet_indices_in_tfds_label_order():
  names = tfds.builder("imagenette").info.features["label"].names
  assert tuple(names) == data.IMAGENETTE_WNIDS
  wnids = data.imagenet_wnids()
  assert tuple(wnids.index(w) for w in names) == data.IMAGENETTE_TO_IMAGENET
  assert data.IMAGENETTE_TO_IMAGENET == (0, 217, 482, 491, 497, 566, 569, 571, 574, 701)


def test_imagenette_source_maps_every_tfds_label_through_the_table():
  with tfds.testing.mock_data(num_examples=12):
    raw = tfds.data_source("imagenette", split="validation")
    source = data.load_source("imagenette")
    assert len(source) == 12
    for i in range(12):
      image, label = source.fetch(i)
      assert label == data.IMAGENETTE_TO_IMAGENET[int(raw[i]["label"])]
      np.testing.assert_array_equal(image, raw[i]["image"])


def test_imagenet2012_and_imagenet_v2_keep_their_imagenet_labels():
  with tfds.testing.mock_data(num_examples=5):
    for name, split in (("imagenet2012", "validation"), ("imagenet_v2", "test")):
      raw = tfds.data_source(name, split=split)
      source = data.load_source(name)
      assert source.name == f"{name}:{split}"
      assert [source.fetch(i)[1] for i in range(5)] == [int(raw[i]["label"]) for i in range(5)]


class TinyImages(tfds.core.GeneratorBasedBuilder):
  """A real (not mocked) tfds dataset, written as array_record without TensorFlow."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(names=["a", "b", "c"])}))

  def _split_generators(self, dl_manager):
    return {"validation": self._generate_examples()}

  def _generate_examples(self):
    for i in range(6):
      encoded = _jpeg(np.full((20 + i, 30, 3), 40 * i, np.uint8))
      yield i, {"image": encoded[:60] if i == 3 else encoded, "label": i % 3}


# tfds looks for the source file of builders defined in packages (``tests.test_data``)
# with the `importlib_resources` backport; a top-level module name skips that.
TinyImages.__module__ = "tiny_images_builder"


def test_prepared_tfds_dataset_reads_offline_without_tensorflow_and_counts_corrupt_records(
    tmp_path):
  TinyImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  source = data.load_source("tfds:tiny_images:validation", data_dir=str(tmp_path))
  assert len(source) == 6
  loader = data.Loader(source, data.preprocess_fn("siglip", 16), 4, warn=None)
  batches = list(loader)
  assert sum(int(b.valid.sum()) for b in batches) == 5
  assert len(loader.corrupt) == 1 and loader.corrupt[0][0].startswith("tiny_images:validation[")
  assert sorted(l for b in batches for l in b.labels[b.valid]) == [0, 1, 1, 2, 2]


def test_missing_tfds_dataset_is_a_clear_error_and_never_a_download(tmp_path):
  with pytest.raises(ValueError, match="not available offline"):
    data.load_source("tfds:tiny_images", data_dir=str(tmp_path / "empty"))


def test_folder_classes_are_sorted_files_sorted_and_other_files_ignored(folder):
  source = data.load_source(str(folder))
  assert source.label_names == ("ant", "moth", "zebra")
  recs = list(source.records())
  assert [os.path.relpath(p, folder) for p, _ in recs] == [
      "ant/00.jpg", "ant/01.jpg", "ant/02.jpg", "moth/00.jpg", "moth/01.jpg", "moth/02.jpg",
      "zebra/00.jpg", "zebra/01.jpg", "zebra/02.jpg"]
  assert [l for _, l in recs] == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_folder_label_map_gives_each_class_its_label(folder, tmp_path):
  source = data.folder_source(folder, label_map={"ant": 7, "moth": 3, "zebra": 340})
  assert [l for _, l in source.records()] == [7] * 3 + [3] * 3 + [340] * 3
  for wnid in ("n01440764", "n03888257"):
    os.makedirs(tmp_path / "wn" / wnid)
    (tmp_path / "wn" / wnid / "x.jpg").write_bytes(_jpeg(_pattern(8, 8, 0)))
  imagenet = data.folder_source(tmp_path / "wn", label_map="imagenet")
  assert [l for _, l in imagenet.records()] == [0, 701]


def test_photos_are_the_skimage_photographs_unlabelled():
  source = data.load_source("photos")
  assert len(source) == len(data.PHOTOS)
  image, label = source.fetch("camera")  # a grey photograph
  assert label == -1 and image.ndim == 2
  assert data.to_rgb_uint8(image).shape == (512, 512, 3)


# ----------------------------------------------------------------------------
# Batches


def test_corrupt_image_is_counted_named_and_its_row_repeats_a_real_image(folder, capsys):
  loader = data.Loader(data.load_source(str(folder)), data.preprocess_fn("big_vision", 32), 3)
  batches = list(loader)
  assert [os.path.relpath(n, folder) for n, _ in loader.corrupt] == ["moth/01.jpg"]
  assert "corrupt image" in capsys.readouterr().err
  moth = batches[1]
  np.testing.assert_array_equal(moth.valid, [True, False, True])
  np.testing.assert_array_equal(moth.images[1], moth.images[0])
  assert moth.keys[1] is None and sum(int(b.valid.sum()) for b in batches) == 8
  assert "1 corrupt image(s)" in data.describe_corrupt(loader.corrupt)


def test_last_batch_is_padded_to_the_batch_size_with_a_real_image_marked_invalid(folder):
  source = data.load_source(str(folder))
  batches = list(data.Loader(source, data.preprocess_fn("big_vision", 32), 4, warn=None))
  assert [b.images.shape[0] for b in batches] == [4, 4, 4]
  last = batches[-1]
  np.testing.assert_array_equal(last.valid, [True, False, False, False])
  for i in (1, 2, 3):
    np.testing.assert_array_equal(last.images[i], last.images[0])
  assert last.labels[1:].tolist() == [-1, -1, -1]


def test_limit_takes_a_prefix_and_the_order_is_deterministic(folder):
  source = data.load_source(str(folder))
  prep = data.preprocess_fn("timm", 32)
  run = lambda **kw: np.concatenate([b.images[b.valid] for b in data.Loader(
      source, prep, 2, warn=None, **kw)])
  full, again = run(), run(workers=1)
  np.testing.assert_array_equal(full, again)
  np.testing.assert_array_equal(run(limit=5), full[:4])  # image 5 (moth/01) is corrupt
  keys = [k for b in data.Loader(source, prep, 2, limit=3, warn=None) for k in b.keys if k]
  assert [os.path.relpath(k, folder) for k in keys] == ["ant/00.jpg", "ant/01.jpg",
                                                        "ant/02.jpg"]


def test_each_process_gets_its_rows_of_every_global_batch(folder):
  source = data.load_source(str(folder))
  prep = data.preprocess_fn("big_vision", 32)
  whole = list(data.Loader(source, prep, 4, warn=None))
  parts = [list(data.Loader(source, prep, 4, process_index=p, process_count=2, warn=None))
           for p in range(2)]
  for b, p0, p1 in zip(whole, *parts):
    np.testing.assert_array_equal(np.concatenate([p0.images, p1.images]), b.images)
    np.testing.assert_array_equal(np.concatenate([p0.valid, p1.valid]), b.valid)


# ----------------------------------------------------------------------------
# Preprocessing


def test_area_resize_averages_boxes_and_keeps_the_mean():
  x = _pattern(36, 52, 1).astype(np.float64)
  blocks = x.reshape(18, 2, 26, 2, 3).mean(axis=(1, 3))
  np.testing.assert_allclose(data.resize_area(x, (18, 26)), blocks, atol=1e-9)
  odd = data.resize_area(x, (25, 17))  # a fractional factor
  np.testing.assert_allclose(odd.mean(), x.mean(), rtol=1e-9)
  np.testing.assert_allclose(data.resize_area(x, (36, 52)), x, atol=1e-9)


def test_bilinear_resize_matches_jax_image_resize_without_antialias():
  x = _pattern(37, 29, 2).astype(np.float32)
  for hw in ((20, 31), (64, 64), (37, 29)):
    want = jax.image.resize(jnp.asarray(x), (*hw, 3), "bilinear", antialias=False)
    np.testing.assert_allclose(data.resize_bilinear(x, hw), np.asarray(want), atol=2e-3)


def test_big_vision_preprocessing_is_area_resize_small_then_central_crop():
  x = _pattern(60, 90, 3)
  out = data.preprocess_fn("big_vision", 32)(x)
  small = np.clip(data.resize_area(x, (37, 56)), 0, 255).astype(np.uint8)  # round(32/.875)=37
  want = small[2:34, 12:44].astype(np.float32) / 255 * 2 - 1  # (37-32)//2, (56-32)//2
  np.testing.assert_allclose(out, want, atol=1e-6)
  assert out.shape == (32, 32, 3) and out.dtype == np.float32


def test_timm_preprocessing_is_pil_bicubic_short_side_then_rounded_center_crop():
  x = _pattern(90, 61, 4)
  out = data.preprocess_fn("timm", 32)(x)
  resized = np.asarray(Image.fromarray(x).resize((36, 53), Image.BICUBIC))  # floor(32/.875)=36
  want = resized[10:42, 2:34].astype(np.float32) / 127.5 - 1  # round(21/2)=10, round(4/2)=2
  np.testing.assert_allclose(out, want, atol=1e-6)


def test_siglip_preprocessing_is_a_square_bilinear_resize():
  x = _pattern(50, 80, 5)
  out = data.preprocess_fn("siglip", 24)(x)
  want = np.clip(data.resize_bilinear(x, (24, 24)), 0, 255).astype(np.uint8) / 127.5 - 1
  np.testing.assert_allclose(out, want, atol=1e-6)
  np.testing.assert_allclose(data.preprocess_fn("siglip", 50)(x[:, :50]),
                             x[:, :50] / 127.5 - 1, atol=1e-6)


@pytest.mark.parametrize("kind", data.PREPROCESS)
def test_crop_pct_one_keeps_an_image_of_the_models_size_unchanged(kind):
  x = _pattern(28, 28, 6)
  np.testing.assert_array_equal(data.preprocess_fn(kind, 28, crop_pct=1.0)(x),
                                x.astype(np.float32) / 255 * 2 - 1)
  changed = not np.array_equal(data.preprocess_fn(kind, 28)(x), data.preprocess_fn(
      kind, 28, crop_pct=1.0)(x))
  assert changed == (data.CROP_PCT[kind] < 1)  # timm's and big_vision's 0.875 crop


def test_crop_pct_sets_the_side_the_crop_is_cut_from():
  x = _pattern(90, 61, 7)
  out = data.preprocess_fn("timm", 32, crop_pct=0.9)(x)
  resized = np.asarray(Image.fromarray(x).resize((35, 51), Image.BICUBIC))  # floor(32/.9)=35
  np.testing.assert_allclose(out, resized[10:42, 2:34] / 127.5 - 1, atol=1e-6)
  squashed = np.asarray(Image.fromarray(x).resize((32, 32), Image.BICUBIC))
  np.testing.assert_allclose(data.preprocess_fn("resize", 32)(x), squashed / 127.5 - 1,
                             atol=1e-6)
  out = data.preprocess_fn("resize", 32, crop_pct=0.5)(x)  # squash to 64, keep the centre
  center = np.asarray(Image.fromarray(x).resize((64, 64), Image.BICUBIC))[16:48, 16:48]
  np.testing.assert_allclose(out, center / 127.5 - 1, atol=1e-6)
  for bad in (0, 1.5, -0.2, True):
    with pytest.raises(ValueError, match=r"crop_pct must be in \(0, 1\]"):
      data.preprocess_fn("timm", 32, crop_pct=bad)


def test_preprocessing_follows_the_model_family():
  assert data.preprocess_for(type("M", (), {"input_norm": ((0.5,) * 3, (0.5,) * 3)})()) == "timm"
  assert data.preprocess_for(type("M", (), {"input_norm": None})()) == "big_vision"
  with pytest.raises(ValueError, match="Unknown preprocessing"):
    data.preprocess_fn("inception")
