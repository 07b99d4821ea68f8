"""Evaluation data: image sources, one preprocessing per model family, batches.

Sources (``load_source(name)``), each a deterministic, indexable sequence of
``(image uint8 (H, W, 3), label)``:

* ``imagenet2012`` (split ``validation``), ``imagenet_v2`` (``test``; its labels
  are ImageNet-1k indices), ``imagenette`` (``validation``; labels mapped to
  ImageNet-1k indices, :data:`IMAGENETTE_TO_IMAGENET`) and any other
  ``tfds:NAME[/CONFIG][:SPLIT]``, read with tensorflow-datasets. Nothing is
  downloaded here: the dataset must have been prepared once (``tfds build
  imagenette``; ImageNet needs its tarballs in the manual dir), after which it
  reads offline. The TensorFlow-free path ``tfds.data_source`` (random access,
  array_record files, images decoded with PIL) is preferred; a dataset stored
  as tfrecords falls back to ``tfds.load`` and needs TensorFlow installed.
* a directory of class folders (``root/<class>/<image>``): classes sorted by
  name, files sorted within a class; ``label_map`` turns class names into labels
  (``"imagenet"``: the folder names are WordNet ids, labelled with their
  ImageNet-1k index; a dict ``{name: label}``; default: the sorted position).
* ``photos``: the photographs that ship with scikit-image (:data:`PHOTOS`),
  unlabelled (label ``-1``).

Preprocessing (``preprocess_fn(kind, image_size, crop_pct)``; uint8 ``(H, W, 3)``
-> float32 ``(S, S, 3)`` in [-1, 1]), one per model family. Each resizes the
image so that a central ``S x S`` crop keeps ``crop_pct`` of it, timm's
convention: the resized side is ``S / crop_pct``, and ``crop_pct = 1.0`` resizes
to ``S`` and crops nothing more (an ``S x S`` image comes out unchanged, only
scaled to [-1, 1]). ``crop_pct=None`` is the family's own (:data:`CROP_PCT`):

* ``"big_vision"`` (AugReg, big_vision ``vit_i1k``; 0.875):
  ``resize_small(round(S / crop_pct))`` with TensorFlow's *area* resize (no
  antialias), truncated back to uint8 as big_vision does, ``central_crop(S)``,
  ``value_range(-1, 1)``.
* ``"timm"`` (DeiT, MAE; 0.875, their evaluation scripts' ``224 / 256``): the
  short side to ``floor(S / crop_pct)`` with PIL's bicubic resize (what
  torchvision's ``Resize`` does on PIL images), central crop ``S``
  (torchvision's rounding), values to [-1, 1]; the model applies the ImageNet
  mean/std itself (``vit.Model(input_norm=...)``).
* ``"siglip"`` (1.0): square bilinear resize to ``round(S / crop_pct)``
  (half-pixel centres, no antialias, as ``tf.image.resize``), central crop ``S``,
  values to [-1, 1].
* ``"clip"`` (1.0, transformers' ``CLIPImageProcessor``): the short side to
  ``floor(S / crop_pct)`` (bicubic), a central ``S x S`` crop.
* ``"resize"`` (1.0): the whole image squashed to a ``floor(S / crop_pct)``
  square (PIL bicubic, aspect ratio not kept; timm's ``crop_mode="squash"``),
  central crop ``S``. For models trained on images resized to ``S``, or on
  images that already are ``S x S``.

Batches (:class:`Loader`): every batch has exactly ``batch_size`` rows, in the
source's order. Rows that are not real images -- the padding of the last batch
and images that fail to decode -- repeat a real image of the same batch and are
marked ``valid=False``: a duplicated row changes nothing for the other rows,
even under MaMe's batch-wide preservation mask (it ORs a mask already in the
batch), whereas a blank filler row could. A corrupt image is counted, named in
``loader.corrupt`` and warned about on stderr; it never stops the run and is
never silently dropped.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import importlib
import io
import math
import os
import sys
import threading
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

# Imagenette's ten classes in tfds label order (sorted WordNet ids) and their
# ImageNet-1k indices. (n03888257 is "parachute", index 701; n03888605, index
# 702, is "parallel bars".)
IMAGENETTE_WNIDS = ("n01440764", "n02102040", "n02979186", "n03000684", "n03028079",
                    "n03394916", "n03417042", "n03425413", "n03445777", "n03888257")
IMAGENETTE_TO_IMAGENET = (0, 217, 482, 491, 497, 566, 569, 571, 574, 701)

# Photographs bundled with scikit-image (no download), in this order.
# The colourful ones first: the demo and the pictures take the first few.
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
          "immunohistochemistry", "brick", "camera", "clock", "coins", "grass", "gravel",
          "moon", "retina")

PREPROCESS = ("big_vision", "timm", "siglip", "clip", "resize")
# Each family's crop_pct (the share of the resized image its central crop keeps),
# as its reference code has it: big_vision's resize_small(256)|central_crop(224),
# DeiT's and MAE's evaluation transforms (224 / 256); CLIP resizes the short side
# to S, SigLIP and "resize" the whole image.
CROP_PCT = {"big_vision": 0.875, "timm": 0.875, "siglip": 1.0, "clip": 1.0, "resize": 1.0}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                    ".ppm", ".pgm")
TFDS_DEFAULT_SPLITS = {"imagenet2012": "validation", "imagenette": "validation",
                       "imagenet_v2": "test"}
_SKIMAGE_LOCK = threading.Lock()


# ----------------------------------------------------------------------------
# Preprocessing


def to_rgb_uint8(image) -> np.ndarray:
  """Any decoded image -> uint8 ``(H, W, 3)``: grey repeated, alpha dropped."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"expected a uint8 image; got dtype {image.dtype}")
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or min(image.shape[:2]) < 1:
    raise ValueError(f"expected an image of shape (H, W, 1|3|4); got {image.shape}")
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  return image[..., :3]


def _area_axis(x, size: int, axis: int):
  """TensorFlow's area resize along one axis: output pixel ``i`` averages the
  input over ``[i * s, (i + 1) * s)``, ``s = n / size``, weighting each input
  pixel by its overlap (done with a running sum, so the cost is linear)."""
  n = x.shape[axis]
  x = np.moveaxis(x, axis, 0).astype(np.float64)
  cum = np.concatenate([np.zeros_like(x[:1]), np.cumsum(x, axis=0)], axis=0)
  edges = np.arange(size + 1) * (n / size)
  lo = np.minimum(np.floor(edges).astype(int), n - 1)
  frac = (edges - lo).reshape(-1, *[1] * (x.ndim - 1))
  at = cum[lo] + frac * x[lo]                      # running sum at each edge
  out = (at[1:] - at[:-1]) / (n / size)
  return np.moveaxis(out, 0, axis)


def _bilinear_axis(x, size: int, axis: int):
  """Bilinear resize along one axis, half-pixel centres, no antialias
  (``tf.image.resize(..., "bilinear")``, ``jax.image.resize(antialias=False)``)."""
  n = x.shape[axis]
  x = np.moveaxis(x, axis, 0).astype(np.float64)
  src = np.clip((np.arange(size) + 0.5) * (n / size) - 0.5, 0, n - 1)
  lo = np.floor(src).astype(int)
  hi = np.minimum(lo + 1, n - 1)
  w = (src - lo).reshape(-1, *[1] * (x.ndim - 1))
  return np.moveaxis(x[lo] * (1 - w) + x[hi] * w, 0, axis)


def resize_area(image, hw) -> np.ndarray:
  """``(H, W, C)`` -> float64 ``(h, w, C)``, TensorFlow's ``area`` method."""
  return _area_axis(_area_axis(image, hw[0], 0), hw[1], 1)


def resize_bilinear(image, hw) -> np.ndarray:
  """``(H, W, C)`` -> float64 ``(h, w, C)``, bilinear without antialias."""
  return _bilinear_axis(_bilinear_axis(image, hw[0], 0), hw[1], 1)


def _to_uint8(x) -> np.ndarray:
  """big_vision's ``tf.cast(tf.clip_by_value(x, 0, 255), uint8)``: truncation."""
  return np.clip(x, 0, 255).astype(np.uint8)


def _value_range(image) -> np.ndarray:
  """uint8 -> float32 in [-1, 1] (big_vision ``value_range(-1, 1)``)."""
  return (image.astype(np.float32) / 255.0) * 2.0 - 1.0


def _central_crop(image, size: int, rounding=lambda v: v // 2):
  h, w = image.shape[:2]
  if h < size or w < size:
    raise ValueError(f"cannot crop {size}x{size} from an image of {h}x{w}")
  top, left = int(rounding(h - size)), int(rounding(w - size))
  return image[top:top + size, left:left + size]


def _resize(image, hw, method: str) -> np.ndarray:
  """uint8 ``(H, W, 3)`` -> uint8 ``(h, w, 3)``: ``"area"`` or ``"bilinear"``
  (TensorFlow's, truncated to uint8 as big_vision does) or ``"bicubic"`` (PIL's).
  An image already of that size is returned as it is."""
  hw = (int(hw[0]), int(hw[1]))
  if image.shape[:2] == hw:
    return image
  if method == "bicubic":
    from PIL import Image  # pylint: disable=import-outside-toplevel
    return np.asarray(Image.fromarray(image).resize((hw[1], hw[0]), Image.BICUBIC))
  return _to_uint8({"area": resize_area, "bilinear": resize_bilinear}[method](image, hw))


def _torch_round(v):
  return round(v / 2.0)  # torchvision's CenterCrop offsets


def preprocess_big_vision(image, size: int = 224, crop_pct: float = CROP_PCT["big_vision"]
                          ) -> np.ndarray:
  """big_vision ``decode|resize_small(S/crop_pct)|central_crop(S)|value_range(-1,1)``."""
  image = to_rgb_uint8(image)
  h, w = image.shape[:2]
  factor = round(size / crop_pct) / min(h, w)
  hw = (max(int(round(h * factor)), size), max(int(round(w * factor)), size))
  return _value_range(_central_crop(_resize(image, hw, "area"), size))


def preprocess_timm(image, size: int = 224, crop_pct: float = CROP_PCT["timm"]) -> np.ndarray:
  """timm's eval transform (``crop_pct``, bicubic), values in [-1, 1]."""
  image = to_rgb_uint8(image)
  h, w = image.shape[:2]
  short = math.floor(size / crop_pct)
  # torchvision Resize(int): the short side to `short`, the long side truncated.
  hw = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
  return _value_range(_central_crop(_resize(image, hw, "bicubic"), size, _torch_round))


def preprocess_siglip(image, size: int = 224, crop_pct: float = CROP_PCT["siglip"]
                      ) -> np.ndarray:
  """big_vision ``resize(S/crop_pct)`` (bilinear, square) ``|central_crop(S)|
  value_range(-1, 1)``; at the default 1.0, SigLIP's ``resize(S)``."""
  side = round(size / crop_pct)
  image = _resize(to_rgb_uint8(image), (side, side), "bilinear")
  return _value_range(_central_crop(image, size))


def preprocess_clip(image, size: int = 224, crop_pct: float = CROP_PCT["clip"]) -> np.ndarray:
  """CLIP's (transformers' CLIPImageProcessor): the short side resized to
  ``S / crop_pct`` (bicubic; ``S`` by default), a central ``S x S`` crop, values in
  [-1, 1] (CLIP's mean / std are applied inside the model)."""
  image = to_rgb_uint8(image)
  h, w = image.shape[:2]
  short = math.floor(size / crop_pct)
  hw = ((short, max(short, round(short * w / h))) if h <= w
        else (max(short, round(short * h / w)), short))
  return _value_range(_central_crop(_resize(image, hw, "bicubic"), size, _torch_round))


def preprocess_resize(image, size: int = 224, crop_pct: float = CROP_PCT["resize"]
                      ) -> np.ndarray:
  """The whole image resized to a ``S / crop_pct`` square (PIL bicubic, aspect ratio
  not kept: timm's ``crop_mode="squash"``), a central ``S x S`` crop, values in
  [-1, 1]; at the default 1.0, a plain resize to ``S x S``."""
  side = math.floor(size / crop_pct)
  image = _resize(to_rgb_uint8(image), (side, side), "bicubic")
  return _value_range(_central_crop(image, size, _torch_round))


_PREPROCESS = {"big_vision": preprocess_big_vision, "timm": preprocess_timm,
               "siglip": preprocess_siglip, "clip": preprocess_clip,
               "resize": preprocess_resize}


def crop_pct_for(kind: str, crop_pct: Optional[float] = None) -> float:
  """``crop_pct`` checked (``0 < crop_pct <= 1``), or ``kind``'s own when ``None``."""
  if kind not in _PREPROCESS:
    raise ValueError(f"Unknown preprocessing {kind!r}; known: {PREPROCESS}")
  if crop_pct is None:
    return CROP_PCT[kind]
  if isinstance(crop_pct, bool) or not 0 < float(crop_pct) <= 1:
    raise ValueError(f"crop_pct must be in (0, 1] (the share of the resized image the "
                     f"central crop keeps; 1.0: resize to the model's size, no crop); got "
                     f"{crop_pct!r}")
  return float(crop_pct)


def preprocess_fn(kind: str, image_size: int = 224, crop_pct: Optional[float] = None
                  ) -> Callable[[np.ndarray], np.ndarray]:
  """The preprocessing of a model family: uint8 ``(H, W, 3)`` -> float32
  ``(S, S, 3)`` in [-1, 1]. ``kind``: one of :data:`PREPROCESS`; ``crop_pct``: the
  share of the resized image the central crop keeps (``None``: the family's own,
  :data:`CROP_PCT`; 1.0: resize to ``S``, no crop)."""
  crop_pct = crop_pct_for(kind, crop_pct)
  return functools.partial(_PREPROCESS[kind], size=int(image_size), crop_pct=crop_pct)


def preprocess_for(model) -> str:
  """The preprocessing a ``vit.Model`` expects: ``"timm"`` when it normalises
  its input with ImageNet mean/std (timm DeiT / MAE weights), else
  ``"big_vision"``. (SigLIP image towers want ``"siglip"``: pass it.)"""
  return "timm" if getattr(model, "input_norm", None) is not None else "big_vision"


# ----------------------------------------------------------------------------
# Sources


@dataclasses.dataclass(frozen=True)
class Source:
  """A deterministic sequence of labelled images.

  ``read(start, stop)`` yields one opaque *record* per image in order (cheap,
  sequential: file names, indices, encoded bytes); ``fetch(record) -> (image
  uint8 (H, W, 3), label int)`` does the decoding, may run in worker threads
  and raises on a corrupt image; ``describe(record)`` names it in reports.
  Labels are ImageNet-1k indices where the dataset has them, ``-1`` when
  unlabelled.
  """

  name: str
  size: int
  read: Callable[[int, int], Iterator[Any]]
  fetch: Callable[[Any], tuple]
  describe: Callable[[Any], str] = str
  label_names: Optional[tuple] = None
  start: int = 0
  stop: Optional[int] = None

  def __len__(self) -> int:
    stop = self.size if self.stop is None else min(self.stop, self.size)
    return max(stop - self.start, 0)

  def subset(self, start: int = 0, stop: Optional[int] = None) -> "Source":
    """Images ``[start, stop)`` of this source (relative positions)."""
    begin = self.start + max(int(start), 0)
    end = self.start + len(self) if stop is None else min(self.start + int(stop),
                                                          self.start + len(self))
    return dataclasses.replace(self, start=begin, stop=max(end, begin))

  def records(self) -> Iterator[Any]:
    return self.read(self.start, self.start + len(self))


def array_source(images: Sequence[np.ndarray], labels: Optional[Sequence[int]] = None,
                 name: str = "arrays") -> Source:
  """In-memory images (uint8 ``(H, W, 3)`` each) as a source."""
  labels = [-1] * len(images) if labels is None else [int(l) for l in labels]
  if len(labels) != len(images):
    raise ValueError(f"{len(images)} images but {len(labels)} labels")
  return Source(name=name, size=len(images), read=lambda a, b: iter(range(a, b)),
                fetch=lambda i: (images[i], labels[i]), describe=lambda i: f"{name}[{i}]")


def photos_source() -> Source:
  """scikit-image's photographs (:data:`PHOTOS`), unlabelled."""
  def fetch(name):
    import skimage.data  # pylint: disable=import-outside-toplevel
    with _SKIMAGE_LOCK:  # skimage's lazy module and readers: one thread at a time
      return getattr(skimage.data, name)(), -1
  return Source(name="photos", size=len(PHOTOS), read=lambda a, b: iter(PHOTOS[a:b]),
                fetch=fetch, describe=lambda n: f"skimage.data.{n}")


def load_image(name: str, size: int = 224) -> np.ndarray:
  """An image file, or the name of a ``skimage.data`` photograph (``astronaut``),
  centre-cropped to a square and resized to ``(size, size, 3)`` float32 in [-1, 1].

  A centre crop keeps the whole square the model sees in the picture (unlike the
  eval pipeline's resize-to-256-then-crop-224, which would cut its border off).
  """
  import skimage.data  # pylint: disable=import-outside-toplevel
  import skimage.io  # pylint: disable=import-outside-toplevel
  import skimage.transform  # pylint: disable=import-outside-toplevel
  import skimage.util  # pylint: disable=import-outside-toplevel
  if os.path.exists(name):
    img = skimage.io.imread(name)
  elif not name.startswith("_") and callable(getattr(skimage.data, name, None)):
    img = getattr(skimage.data, name)()
  else:
    raise ValueError(f"{name!r} is neither an image file nor a skimage.data photograph "
                     f"(e.g. {', '.join(PHOTOS)})")
  img = np.asarray(img)
  if img.ndim == 2:
    img = np.stack([img] * 3, -1)
  if img.ndim != 3 or img.shape[-1] < 3:
    raise ValueError(f"{name!r} is not an RGB or grey image (shape {img.shape})")
  img = skimage.util.img_as_float(img[..., :3])   # any integer or float dtype -> [0, 1]
  h, w = img.shape[:2]
  side = min(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  img = img[top:top + side, left:left + side]
  img = skimage.transform.resize(img, (size, size), anti_aliasing=side > size)
  return (np.clip(img, 0, 1) * 2 - 1).astype(np.float32)


def decode_image(data: bytes) -> np.ndarray:
  """Encoded bytes (JPEG, PNG, ...) -> uint8 ``(H, W, 3)`` with PIL. Raises on
  a corrupt or truncated file."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  with Image.open(io.BytesIO(data)) as im:
    return np.asarray(im.convert("RGB"))


def imagenet_wnids() -> tuple:
  """The 1000 ImageNet-1k WordNet ids in label order, from the metadata that
  ships with tensorflow-datasets (no download)."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  return tuple(tfds.builder("imagenet2012").info.features["label"].names)


def _label_mapper(label_map, names: Sequence[str]):
  """Class names -> labels: ``None`` (position), ``"imagenet"`` (WordNet ids
  -> ImageNet-1k index) or a mapping ``{name: label}``."""
  if label_map is None:
    return {n: i for i, n in enumerate(names)}
  if isinstance(label_map, str):
    if label_map != "imagenet":
      raise ValueError(f"label_map must be None, 'imagenet' or a dict; got {label_map!r}")
    index = {w: i for i, w in enumerate(imagenet_wnids())}
    missing = [n for n in names if n not in index]
    if missing:
      raise ValueError(f"label_map='imagenet': not ImageNet WordNet ids: {missing[:5]}")
    return {n: index[n] for n in names}
  missing = [n for n in names if n not in label_map]
  if missing:
    raise ValueError(f"label_map has no label for classes {missing[:5]}")
  return {n: int(label_map[n]) for n in names}


def class_folder_files(root, extensions: tuple, what: str, label_map=None):
  """``root/<class>/<file>`` -> ``(files [(path, label)], classes)``: classes
  sorted by name, files sorted in each class, files not ending in one of
  ``extensions`` ignored; a folder of such files without class folders is one
  unlabelled class (label -1). ``what`` names the files in errors ("images")."""
  root = os.fspath(root)
  if not os.path.isdir(root):
    raise FileNotFoundError(f"{root} is not a directory")
  wanted = lambda f: f.lower().endswith(extensions)
  classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  files = []
  if classes:
    labels = _label_mapper(label_map, classes)
    for c in classes:
      files += [(os.path.join(root, c, f), labels[c])
                for f in sorted(os.listdir(os.path.join(root, c))) if wanted(f)]
  else:
    files = [(os.path.join(root, f), -1) for f in sorted(os.listdir(root)) if wanted(f)]
  if not files:
    raise ValueError(f"{root}: no {what} found (class folders of {extensions} files)")
  return files, classes


def folder_source(root, label_map=None) -> Source:
  """``root/<class>/<image>`` (:func:`class_folder_files` with
  :data:`IMAGE_EXTENSIONS`)."""
  root = os.fspath(root)
  files, classes = class_folder_files(root, IMAGE_EXTENSIONS, "images", label_map)

  def fetch(record):
    path, label = record
    with open(path, "rb") as f:
      return decode_image(f.read()), label
  return Source(name=root, size=len(files), read=lambda a, b: iter(files[a:b]),
                fetch=fetch, describe=lambda r: r[0], label_names=tuple(classes) or None)


def _parse_tfds_name(name: str, split: Optional[str]):
  if name.startswith("tfds:"):
    name = name[len("tfds:"):]
    if ":" in name:
      name, split_in_name = name.split(":", 1)
      split = split or split_in_name
  base = name.split("/")[0]
  return name, split or TFDS_DEFAULT_SPLITS.get(base, "validation")


def _tfds_label_fn(base: str, names: Optional[Sequence[str]]):
  """tfds label -> ImageNet-1k index: imagenette's WordNet ids are mapped; other
  datasets keep theirs (imagenet_v2's are already ImageNet indices)."""
  if base == "imagenette":
    if names is not None and tuple(names) != IMAGENETTE_WNIDS:
      raise ValueError(f"imagenette label names {tuple(names)} differ from the known "
                       f"order {IMAGENETTE_WNIDS}")
    table = np.asarray(IMAGENETTE_TO_IMAGENET)
    return lambda label: int(table[int(label)])
  return int


def tfds_source(name: str, split: Optional[str] = None, data_dir=None) -> Source:
  """A prepared tensorflow-datasets dataset (see the module docstring).
  ``name`` may carry a config (``imagenette/320px-v2``); never downloads."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  name, split = _parse_tfds_name(name, split)
  base = name.split("/")[0]
  def unavailable(e):
    return ValueError(
        f"tfds dataset {name!r} (split {split!r}) is not available offline in "
        f"{data_dir or 'the default tfds data dir'}: prepare it once where there is "
        f"internet, e.g. `tfds build {name} --file_format=array_record` (ImageNet needs "
        f"its tarballs in the manual dir), or pass data_dir ({type(e).__name__}: {e})")
  try:
    ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except NotImplementedError as e:  # tfrecords (no random access), or not prepared
    try:
      prepared = tfds.builder(name, data_dir=data_dir).is_prepared()
    except Exception:  # pylint: disable=broad-except
      prepared = False
    if not prepared:
      raise unavailable(e) from e
    return _tfds_load_source(name, split, data_dir, base, e)
  except Exception as e:  # pylint: disable=broad-except
    raise unavailable(e) from e
  names = _label_names(ds)
  to_label = _tfds_label_fn(base, names)

  def fetch(i):
    ex = ds[i]
    label = ex.get("label", -1)
    return ex["image"], (to_label(label) if "label" in ex else -1)
  return Source(name=f"{name}:{split}", size=len(ds), read=lambda a, b: iter(range(a, b)),
                fetch=fetch, describe=lambda i: f"{name}:{split}[{i}]", label_names=names)


def _label_names(ds) -> Optional[tuple]:
  try:
    return tuple(ds.dataset_info.features["label"].names)
  except Exception:  # pylint: disable=broad-except  # no label feature
    return None


def _tfds_load_source(name, split, data_dir, base, cause) -> Source:
  """Fallback for tfrecord-stored datasets: ``tfds.load`` (needs TensorFlow),
  images kept encoded and decoded with PIL in the workers."""
  try:
    importlib.import_module("tensorflow")  # only to know that it is there
  except ImportError as e:
    raise ValueError(
        f"tfds dataset {name!r} is stored as tfrecords, which only TensorFlow reads: "
        f"install tensorflow, or re-prepare it with `tfds build {name} "
        f"--file_format=array_record` ({cause})") from e
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  builder = tfds.builder(name, data_dir=data_dir)
  size = builder.info.splits[split].num_examples
  names = tuple(builder.info.features["label"].names) if "label" in builder.info.features \
      else None
  to_label = _tfds_label_fn(base, names)
  state = {"it": None, "pos": 0}

  def read(start, stop):  # sequential: restarts only when asked to go back
    if state["it"] is None or state["pos"] > start:
      ds = tfds.load(name, split=split, data_dir=data_dir, download=False,
                     shuffle_files=False,
                     decoders={"image": tfds.decode.SkipDecoding()})
      state["it"], state["pos"] = iter(tfds.as_numpy(ds)), 0
    while state["pos"] < stop:
      ex = next(state["it"])
      state["pos"] += 1
      if state["pos"] > start:
        yield state["pos"] - 1, ex

  def fetch(record):
    _, ex = record
    label = to_label(ex["label"]) if "label" in ex else -1
    return decode_image(ex["image"]), label
  return Source(name=f"{name}:{split}", size=size, read=read, fetch=fetch,
                describe=lambda r: f"{name}:{split}[{r[0]}]", label_names=names)


def load_source(name, *, split: Optional[str] = None, data_dir=None,
                label_map=None) -> Source:
  """``"photos"``, an existing directory (or ``"folder:PATH"``), a known tfds
  name (``imagenet2012``, ``imagenette``, ``imagenet_v2``) or ``tfds:NAME``.
  A :class:`Source` is returned as it is."""
  if isinstance(name, Source):
    return name
  name = os.fspath(name)
  if name == "photos":
    return photos_source()
  if name.startswith("folder:"):
    return folder_source(name[len("folder:"):], label_map)
  if os.path.isdir(name):
    return folder_source(name, label_map)
  if name.startswith("tfds:") or name.split("/")[0] in TFDS_DEFAULT_SPLITS:
    return tfds_source(name, split, data_dir)
  raise ValueError(f"Unknown data {name!r}: 'photos', a directory of class folders, "
                   f"{sorted(TFDS_DEFAULT_SPLITS)} or 'tfds:NAME[:SPLIT]'")


# ----------------------------------------------------------------------------
# Batches


@dataclasses.dataclass
class Batch:
  """One batch (this process's rows of it on a multi-host run).

  Attributes:
    images: (B, S, S, 3) float32 in [-1, 1].
    labels: (B,) int32, -1 where unlabelled.
    valid: (B,) bool, False for padding and corrupt images (which repeat a real
      image of the batch): leave them out of every metric.
    keys: (B,) names of the rows (None for padding).
    start: position of the batch's first image in the source.
  """

  images: np.ndarray
  labels: np.ndarray
  valid: np.ndarray
  keys: tuple
  start: int


class Loader:
  """Preprocessed batches of a source, in order, decoded in worker threads.

  ``Loader(source, preprocess, batch_size, limit=...)``: iterate for
  :class:`Batch` es of exactly ``batch_size`` rows (see the module docstring
  for padding); afterwards ``num_images`` (images considered), ``corrupt``
  (``[(name, error)]`` of this process's rows) are filled in.

  ``warn``: True prints a warning per corrupt image on stderr, a stream prints
  it there, False stays silent (the images are counted either way).

  Multi-host: ``process_count`` processes each take rows ``[p * b, (p + 1) * b)``
  of every global batch, ``b = batch_size / process_count``; the rule that picks
  the repeated row (the first real image of the global batch) is the same on
  every process.
  """

  def __init__(self, source: Source, preprocess: Callable, batch_size: int, *,
               limit: Optional[int] = None, process_index: int = 0, process_count: int = 1,
               workers: Optional[int] = None, prefetch: int = 2, warn=True):
    if batch_size < 1 or batch_size % process_count:
      raise ValueError(f"batch_size {batch_size} must be a positive multiple of the "
                       f"process count {process_count}")
    self.source = source if limit is None else source.subset(0, int(limit))
    self.preprocess, self.batch_size = preprocess, int(batch_size)
    self.process_index, self.process_count = process_index, process_count
    self.workers = workers or min(16, os.cpu_count() or 1)
    self.prefetch, self.warn = max(prefetch, 1), warn
    self.num_images = len(self.source)
    self.corrupt: list = []

  @property
  def num_batches(self) -> int:
    return -(-self.num_images // self.batch_size)

  def _load(self, record):
    """``(image (S, S, 3) float32 | None, label, error | None)``."""
    try:
      image, label = self.source.fetch(record)
      return np.asarray(self.preprocess(image), np.float32), int(label), None
    except Exception as e:  # pylint: disable=broad-except  # a corrupt image
      return None, -1, f"{type(e).__name__}: {e}"

  def _submit(self, pool, records):
    local = self.batch_size // self.process_count
    lo = self.process_index * local
    mine = records[lo:lo + local]
    return records, lo, [pool.submit(self._load, r) for r in mine]

  def _assemble(self, records, lo, futures, start) -> Optional[Batch]:
    local = self.batch_size // self.process_count
    rows = [f.result() for f in futures]
    for r, (_, _, err) in zip(records[lo:], rows):
      if err is not None:
        name = self.source.describe(r)
        self.corrupt.append((name, err))
        if self.warn:
          print(f"warning: corrupt image {name} ({err}); counted, left out of the "
                "metrics", file=sys.stderr if self.warn is True else self.warn)
    filler = None
    if len(rows) < local or any(err is not None for _, _, err in rows):
      # The first real image of the *global* batch (the same on every process).
      for i, r in enumerate(records):
        row = rows[i - lo] if lo <= i < lo + len(rows) else self._load(r)
        if row[2] is None:
          filler = row
          break
      if filler is None:
        return None  # every image of this batch is corrupt: nothing to run
    shape = (filler or rows[0])[0].shape
    images = np.empty((local, *shape), np.float32)
    labels = np.full((local,), -1, np.int32)
    valid = np.zeros((local,), bool)
    keys = [None] * local
    for i in range(local):
      img, label, err = rows[i] if i < len(rows) else (None, -1, "padding")
      if err is None:
        images[i], labels[i], valid[i] = img, label, True
        keys[i] = self.source.describe(records[lo + i])
      else:
        images[i] = filler[0]
    return Batch(images=images, labels=labels, valid=valid, keys=tuple(keys), start=start)

  def __iter__(self) -> Iterator[Batch]:
    self.corrupt = []
    records = self.source.records()
    with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
      pending = collections.deque()

      def submit_next(start):
        chunk = [r for _, r in zip(range(self.batch_size), records)]
        if chunk:
          pending.append((start, self._submit(pool, chunk)))
        return start + len(chunk)

      pos = 0
      for _ in range(self.prefetch):
        pos = submit_next(pos)
      while pending:
        start, (chunk, lo, futures) = pending.popleft()
        pos = submit_next(pos)
        batch = self._assemble(chunk, lo, futures, self.source.start + start)
        if batch is not None:
          yield batch


# ----------------------------------------------------------------------------
# Reports


def describe_corrupt(corrupt: Sequence[tuple], shown: int = 5) -> str:
  """One line for a report: how many images were corrupt, and the first few."""
  if not corrupt:
    return "0 corrupt images"
  names = ", ".join(n for n, _ in corrupt[:shown])
  more = f" and {len(corrupt) - shown} more" if len(corrupt) > shown else ""
  return f"{len(corrupt)} corrupt image(s) counted and left out of the metrics: {names}{more}"


__all__ = ["Batch", "Loader", "Source", "CROP_PCT", "PREPROCESS", "PHOTOS", "IMAGENETTE_WNIDS",
           "IMAGENETTE_TO_IMAGENET", "array_source", "decode_image", "describe_corrupt",
           "folder_source", "imagenet_wnids",
           "load_image", "load_source", "photos_source", "crop_pct_for", "preprocess_fn",
           "preprocess_for", "resize_area", "resize_bilinear", "tfds_source", "to_rgb_uint8"]


def load_digits(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's handwritten digits (1797 images, 8 x 8, 17 grey levels; they
  ship with the package, no download), bilinearly upscaled (:func:`resize_bilinear`)
  to ``size``: ``(images (N, size, size, 1) float32 in [-1, 1], labels (N,) int32)``."""
  from sklearn.datasets import load_digits as sk_digits  # pylint: disable=import-outside-toplevel
  digits = sk_digits()
  grey = digits.images.transpose(1, 2, 0) / 16.0                 # (8, 8, N) in [0, 1]
  big = resize_bilinear(grey, (size, size)).transpose(2, 0, 1)   # all N at once
  return (big[..., None] * 2 - 1).astype(np.float32), digits.target.astype(np.int32)
