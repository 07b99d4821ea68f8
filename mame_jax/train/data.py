"""Training batches: deterministic per step, augmented, read ahead by grain.

Batch ``k`` is a function of the seed and ``k`` alone, so a resumed run sees
exactly the batches an uninterrupted one would (the checkpoint's data
position is the step). The images come from the project's sources
(``mame_jax.eval.data.load_source``: a tfds name or a folder of class
folders), indexed by grain's ``MapDataset``:

* ``range(n).seed(seed).shuffle().repeat(epochs)``: a fresh permutation per
  epoch, and example ``j`` of the stream is known without reading the others;
* ``random_map(augment)``: random resized crop + horizontal flip, with grain's
  per-index generator -- example ``j``'s crop depends on ``(seed, j)`` only,
  not on the process or device count;
* each process takes its rows ``[p * b, (p + 1) * b)`` of every global batch
  of ``B = P * b`` examples;
* ``to_iter_dataset(ReadOptions(num_threads, prefetch))`` decodes and augments
  in threads ahead of the training step, in order.

grain rather than the evaluation ``Loader``: the ``Loader`` reads a source in
order once, while training needs random access, per-epoch reshuffling,
index-seeded augmentation and a restart at any step -- grain's ``MapDataset``
gives those as its own semantics, with threads for the decoding.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional

import grain
import numpy as np

from mame_jax.eval import data as data_lib


def random_resized_crop(rng: np.random.Generator, image: np.ndarray, size: int, *,
                        min_scale: float = 0.08, ratio=(3 / 4, 4 / 3),
                        tries: int = 10) -> np.ndarray:
  """Inception-style crop: a box of ``[min_scale, 1]`` of the area and aspect
  ratio log-uniform in ``ratio``, resized to ``(size, size)``; after ``tries``
  misses, the largest central box of an allowed ratio. ``image`` uint8
  ``(H, W, 3)`` -> float64 ``(size, size, 3)`` in [0, 255]."""
  h, w = image.shape[:2]
  area = h * w
  box = None
  for _ in range(tries):
    target = area * rng.uniform(min_scale, 1.0)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    bw, bh = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
    if 0 < bw <= w and 0 < bh <= h:
      top, left = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
      box = (top, left, bh, bw)
      break
  if box is None:  # torchvision's fallback: central crop at the nearest allowed ratio
    aspect = w / h
    bw, bh = ((w, min(h, int(round(w / ratio[0])))) if aspect < ratio[0] else
              (min(w, int(round(h * ratio[1]))), h) if aspect > ratio[1] else (w, h))
    box = ((h - bh) // 2, (w - bw) // 2, bh, bw)
  top, left, bh, bw = box
  crop = image[top:top + bh, left:left + bw]
  # Area averaging when shrinking (no aliasing), bilinear when enlarging.
  resize = data_lib.resize_area if bh * bw >= size * size else data_lib.resize_bilinear
  return resize(crop, (size, size))


def augment(rng: np.random.Generator, image, size: int, *, min_scale: float = 0.08,
            flip: bool = True) -> np.ndarray:
  """uint8 image -> float32 ``(size, size, 3)`` in [-1, 1]: random resized crop,
  then a horizontal flip with probability 1/2."""
  image = data_lib.to_rgb_uint8(image)
  x = random_resized_crop(rng, image, size, min_scale=min_scale)
  if flip and rng.random() < 0.5:
    x = x[:, ::-1]
  return (np.clip(x, 0, 255).astype(np.float32) / 127.5 - 1.0)


class Batches:
  """The training stream of one process: ``batches.from_step(k)`` iterates
  ``(images (b, S, S, 3) float32, labels (b,) int32)`` for steps ``k, k+1, ...
  total_steps - 1``; ``batches.batch(k)`` is batch ``k`` alone (tests).

  Args:
    source: a ``mame_jax.eval.data.Source`` (labelled).
    batch_size: the global batch ``B``; a multiple of ``process_count``.
    image_size, min_scale, flip: the augmentation (:func:`augment`).
    total_steps: steps to cover (epochs are repeated as needed).
    seed: the shuffle and augmentation seed.
    workers, prefetch: grain's reading threads and read-ahead (batches).
  """

  def __init__(self, source, *, batch_size: int, image_size: int, total_steps: int,
               seed: int = 0, min_scale: float = 0.08, flip: bool = True,
               process_index: int = 0, process_count: int = 1, workers: int = 8,
               prefetch: int = 4):
    if batch_size < 1 or batch_size % process_count:
      raise ValueError(f"input.batch_size {batch_size} must be a positive multiple of "
                       f"the process count {process_count}")
    self.records = list(source.records())
    if not self.records:
      raise ValueError(f"input.data {source.name}: no images to train on")
    self.source, self.size = source, int(image_size)
    self.global_batch, self.local_batch = int(batch_size), int(batch_size) // process_count
    self.total_steps, self.workers, self.prefetch = int(total_steps), workers, prefetch
    n = len(self.records)
    epochs = max(1, -(-self.total_steps * self.global_batch // n))
    fetch, records = source.fetch, self.records

    def load(index, rng):
      image, label = fetch(records[index])
      return augment(rng, image, self.size, min_scale=min_scale, flip=flip), np.int32(label)

    stream = (grain.MapDataset.range(n).seed(int(seed)).shuffle().repeat(epochs)
              .random_map(load))
    B, b, p = self.global_batch, self.local_batch, process_index
    self._rows = grain.MapDataset.range(self.total_steps * b).map(
        lambda j: stream[(j // b) * B + p * b + j % b])
    self.epoch_images = n

  def batch(self, step: int):
    """Batch ``step`` of this process, computed directly."""
    rows = [self._rows[step * self.local_batch + i] for i in range(self.local_batch)]
    return _stack(rows)

  def from_step(self, step: int) -> Iterator[tuple]:
    """Batches ``step ..`` in order, decoded ``workers`` images at a time."""
    rows = self._rows[step * self.local_batch:]
    it = rows.to_iter_dataset(grain.ReadOptions(
        num_threads=max(int(self.workers), 1),
        prefetch_buffer_size=max(int(self.prefetch), 1) * self.local_batch))
    it = it.batch(self.local_batch, batch_fn=_stack)
    return iter(it)


def _stack(rows):
  images, labels = zip(*rows)
  return np.stack(images), np.asarray(labels, np.int32)


def load_train_source(data: str, *, split: Optional[str] = None, data_dir=None,
                      label_map=None):
  """The training source: a folder of class folders, or a tfds name (``split``
  default ``"train"``). Errors name ``input.data``."""
  import os  # pylint: disable=import-outside-toplevel
  if not data:
    raise ValueError("input.data: no training data; give a tfds name (imagenet2012, "
                     "imagenette, tfds:NAME) or a folder of class folders")
  is_folder = os.path.isdir(os.fspath(data)) or str(data).startswith("folder:")
  named_split = str(data).startswith("tfds:") and str(data).count(":") >= 2  # tfds:NAME:SPLIT
  try:
    return data_lib.load_source(data, split=None if is_folder or named_split and not split
                                else (split or "train"),
                                data_dir=data_dir, label_map=label_map)
  except (ValueError, FileNotFoundError) as e:
    raise ValueError(f"input.data {data!r}: {e}") from None
