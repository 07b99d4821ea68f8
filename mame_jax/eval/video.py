"""Video evaluation data: a folder of class folders of video files (PyAV) or a tfds
video dataset, sampled and cropped the way VideoMAE evaluates on Kinetics-400.

Sources (:func:`load_source`) are ``mame_jax.eval.data.Source`` s, so the one
``Loader`` (worker threads, padding rows, corrupt-file accounting) and the one
evaluation loop (``mame_jax.eval.loop.evaluate``) serve videos as they serve
images. A record's ``fetch`` decodes the video and returns its frames already
thinned to every ``stride``-th one, uint8 ``(N, H, W, 3)``; the preprocessing
(:meth:`Sampling.preprocess`) cuts the clips and crops out of them.

* ``root/<class>/<video>`` (:func:`folder_source`): classes sorted by name,
  files sorted within a class, files with a :data:`VIDEO_EXTENSIONS` suffix only;
  decoded with PyAV (``pip install av``, the ``video`` extra).
* ``tfds:NAME[:SPLIT]`` or ``ucf101`` (:func:`tfds_source`): a *prepared* tfds
  dataset with a ``video`` feature, read through ``tfds.data_source`` (never
  downloaded; tfds' video builders themselves need TensorFlow to prepare).

Sampling (:class:`Sampling`), VideoMAE's test mode for Kinetics (its
``VideoClsDataset``, ``mode="test"``), rather than the random segment sampling of
its training / validation modes:

1. *dense* frames: indices ``0, stride, 2 stride, ...`` over the whole video
   (:func:`frame_indices`), and when those are fewer than ``num_frames`` the
   last one repeated until there are ``num_frames``;
2. the short side resized to ``size`` (bilinear, no antialias -- OpenCV's
   ``INTER_LINEAR`` on the decoded uint8 frames -- rounded back to uint8);
3. ``clips`` temporal windows of ``num_frames`` consecutive sampled frames, the
   ``k``-th starting at ``int(k * (n - num_frames) / (clips - 1))``, and ``crops``
   square crops of side ``size`` along the long side, the ``j``-th starting at
   ``int(j * (long - size) / (crops - 1))`` (:func:`view_starts`; one clip or
   crop is the centred one, where the reference would divide by zero).
   VideoMAE's Kinetics numbers use 5 clips x 3 crops (15 views) and average the
   softmax of the views; ``clips = crops = 1`` (one centred view) is the default
   here, the cheap setting of Table 6's throughput.

A video that fails to decode is *corrupt*; one with fewer than ``min_frames``
decoded frames (default ``num_frames``) is *too short* (:class:`TooShortVideo`).
Both are counted, named in the report and left out of the metrics
(``Loader.corrupt``); neither stops the run. Shorter videos that pass
``min_frames`` are padded as in step 1 (``min_frames=1`` keeps every readable
video, the reference's behaviour).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import numpy as np

from mame_jax.eval import data as data_lib

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg",
                    ".ogv", ".gif")
TFDS_VIDEO_DATASETS = {"ucf101": "test"}  # known names and their evaluation split


class TooShortVideo(ValueError):
  """A video with fewer decoded frames than ``Sampling.min_frames``."""


# ----------------------------------------------------------------------------
# The sampling rule


def frame_indices(num_video_frames: int, num_frames: int = 16, stride: int = 4) -> np.ndarray:
  """VideoMAE's test-mode frame indices into a video of ``num_video_frames``:
  every ``stride``-th frame from 0, padded with the last index up to
  ``num_frames`` (int64 ``(max(ceil(n / stride), num_frames),)``)."""
  if num_video_frames < 1:
    raise TooShortVideo("the video has no frames")
  index = list(range(0, int(num_video_frames), int(stride)))
  index += [index[-1]] * (int(num_frames) - len(index))
  return np.asarray(index, np.int64)


def view_starts(length: int, window: int, count: int) -> list[int]:
  """Starts of ``count`` windows of ``window`` in ``length``: the reference's
  ``int(k * step)``, ``step = max((length - window) / (count - 1), 0)``; for one
  window the centred start ``(length - window) // 2`` (clamped at 0)."""
  if count < 1:
    raise ValueError(f"count must be >= 1; got {count}")
  if count == 1:
    return [max((int(length) - int(window)) // 2, 0)]
  step = max((length - window) / (count - 1), 0.0)
  return [int(k * step) for k in range(count)]


def resized_shape(h: int, w: int, size: int) -> tuple[int, int]:
  """Short side to ``size``, the long side truncated (the reference's rule)."""
  if w < h:
    return int(size * h / w), int(size)
  return int(size), int(size * w / h)


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How a video becomes model inputs (see the module docstring).

  ``preprocess(frames uint8 (N, H, W, 3))`` -> float32 ``(num_frames, size, size,
  3)`` in [-1, 1] for one view, ``(views, num_frames, size, size, 3)`` for
  several (``views = clips * crops``, clip-major). ``frames`` are the
  ``stride``-thinned frames the sources return.
  """

  num_frames: int = 16
  stride: int = 4
  size: int = 224
  clips: int = 1
  crops: int = 1
  min_frames: Optional[int] = None  # None: num_frames

  def __post_init__(self):
    for key in ("num_frames", "stride", "size", "clips", "crops"):
      if int(getattr(self, key)) < 1:
        raise ValueError(f"Sampling.{key} must be >= 1; got {getattr(self, key)}")

  @property
  def views(self) -> int:
    return int(self.clips) * int(self.crops)

  @property
  def minimum(self) -> int:
    return int(self.num_frames if self.min_frames is None else self.min_frames)

  def preprocess(self, frames) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
      raise ValueError(f"expected uint8 frames (N, H, W, 3); got {frames.dtype} "
                       f"{frames.shape}")
    if len(frames) < self.num_frames:  # a source that did not thin: pad as step 1
      frames = frames[frame_indices(len(frames), self.num_frames, 1)]
    n, h, w, _ = frames.shape
    rh, rw = resized_shape(h, w, self.size)
    starts = view_starts(n, self.num_frames, self.clips)
    long_side = max(rh, rw)
    offsets = view_starts(long_side, self.size, self.crops)
    # Resize only the frames some clip uses (step 2 before step 3 gives the same).
    used = sorted({t for s in starts for t in range(s, s + self.num_frames)})
    resized = {t: _resize_uint8(frames[t], (rh, rw)) for t in used}
    views = []
    for s in starts:
      clip = np.stack([resized[t] for t in range(s, s + self.num_frames)])
      for o in offsets:
        # The reference crops along the long side only: the short side is `size`.
        crop = (clip[:, o:o + self.size] if rh >= rw else clip[:, :, o:o + self.size])
        views.append(crop)
    out = np.stack(views).astype(np.float32) / 127.5 - 1.0
    return out[0] if self.views == 1 else out


def _resize_uint8(frame, hw) -> np.ndarray:
  """Bilinear without antialias (``data.resize_bilinear``), rounded to uint8 as
  OpenCV's fixed-point resize of uint8 frames does."""
  if tuple(frame.shape[:2]) == tuple(hw):
    return frame
  return np.clip(np.rint(data_lib.resize_bilinear(frame, hw)), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------
# Decoding


def decode(path, stride: int = 1) -> tuple[np.ndarray, int]:
  """``(every stride-th frame uint8 (N', H, W, 3), frames decoded N)`` of a video
  file, with PyAV. Raises on a file PyAV cannot decode (``av.error.FFmpegError``,
  or ``ValueError`` when it holds no video stream)."""
  import av  # pylint: disable=import-outside-toplevel
  kept, count = [], 0
  with av.open(os.fspath(path)) as container:
    if not container.streams.video:
      raise ValueError("no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    for frame in container.decode(stream):
      if count % stride == 0:  # frame_indices' 0, stride, 2 stride, ... without knowing N
        kept.append(frame.to_ndarray(format="rgb24"))
      count += 1
  if not kept:
    return np.zeros((0, 0, 0, 3), np.uint8), 0
  return np.stack(kept), count


def encode(path, frames, fps: int = 25, codec: str = "mpeg4") -> None:
  """Writes uint8 frames ``(N, H, W, 3)`` (even H and W) as a video with PyAV; for
  tests and examples."""
  import av  # pylint: disable=import-outside-toplevel
  frames = np.asarray(frames, np.uint8)
  with av.open(os.fspath(path), mode="w") as container:
    stream = container.add_stream(codec, rate=fps)
    stream.width, stream.height = frames.shape[2], frames.shape[1]
    stream.pix_fmt = "yuv420p"
    for f in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


# ----------------------------------------------------------------------------
# Sources


def folder_source(root, sampling: Sampling = Sampling(), label_map=None) -> data_lib.Source:
  """``root/<class>/<video>`` (see the module docstring). A folder of videos
  without class folders is one unlabelled class."""
  root = os.fspath(root)
  files, classes = data_lib.class_folder_files(root, VIDEO_EXTENSIONS, "videos", label_map)

  def fetch(record):
    path, label = record
    return read_clip(path, sampling), label
  return data_lib.Source(name=root, size=len(files), read=lambda a, b: iter(files[a:b]),
                         fetch=fetch, describe=lambda r: r[0],
                         label_names=tuple(classes) or None)


def read_clip(path, sampling: Sampling = Sampling()) -> np.ndarray:
  """The frames of the video file ``path`` that :func:`frame_indices` selects,
  uint8 ``(num_frames, H, W, 3)`` as decoded (not yet ``sampling.preprocess``-ed);
  :class:`TooShortVideo` below ``sampling.min_frames``."""
  frames, count = decode(path, sampling.stride)
  # decode() already kept indices 0, stride, ...: pad / check on the true count.
  return _thinned(frames, count, sampling)


def _thinned(kept, count, sampling: Sampling) -> np.ndarray:
  """Frames already thinned by ``stride`` -> :func:`frame_indices`' selection."""
  if count < sampling.minimum:
    raise TooShortVideo(f"{count} frames, fewer than min_frames={sampling.minimum}")
  index = frame_indices(count, sampling.num_frames, sampling.stride) // sampling.stride
  return kept[index]


def tfds_source(name: str, sampling: Sampling = Sampling(), split: Optional[str] = None,
                data_dir=None) -> data_lib.Source:
  """A prepared tfds dataset with a ``video`` feature (``ucf101``,
  ``tfds:NAME[/CONFIG][:SPLIT]``), random access through ``tfds.data_source``;
  never downloads."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  if name.startswith("tfds:"):
    name = name[len("tfds:"):]
    if ":" in name:
      name, in_name = name.split(":", 1)
      split = split or in_name
  split = split or TFDS_VIDEO_DATASETS.get(name.split("/")[0], "test")
  try:
    ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        f"tfds video dataset {name!r} (split {split!r}) is not available offline in "
        f"{data_dir or 'the default tfds data dir'}: prepare it once where there is "
        f"internet and TensorFlow (tfds' video builders need it), e.g. `tfds build "
        f"{name} --file_format=array_record`, or pass data_dir ({type(e).__name__}: "
        f"{e})") from e
  names = data_lib._label_names(ds)  # pylint: disable=protected-access

  def fetch(i):
    ex = ds[i]
    if "video" not in ex:
      raise ValueError(f"{name}: examples have no 'video' feature (keys {sorted(ex)})")
    video = np.asarray(ex["video"])
    label = int(ex["label"]) if "label" in ex else -1
    return _thinned(video[::sampling.stride], len(video), sampling), label
  return data_lib.Source(name=f"{name}:{split}", size=len(ds),
                         read=lambda a, b: iter(range(a, b)), fetch=fetch,
                         describe=lambda i: f"{name}:{split}[{i}]", label_names=names)


def load_source(name, sampling: Sampling = Sampling(), *, split: Optional[str] = None,
                data_dir=None, label_map=None) -> data_lib.Source:
  """A folder (or ``folder:PATH``) of video class folders, ``ucf101`` or
  ``tfds:NAME[:SPLIT]``; a ``Source`` is returned as it is."""
  if isinstance(name, data_lib.Source):
    return name
  name = os.fspath(name)
  if name.startswith("folder:"):
    return folder_source(name[len("folder:"):], sampling, label_map)
  if os.path.isdir(name):
    return folder_source(name, sampling, label_map)
  if name.startswith("tfds:") or name.split("/")[0] in TFDS_VIDEO_DATASETS:
    return tfds_source(name, sampling, split, data_dir)
  raise ValueError(f"Unknown video data {name!r}: a directory of class folders of "
                   f"videos, {sorted(TFDS_VIDEO_DATASETS)} or 'tfds:NAME[:SPLIT]'")


# ----------------------------------------------------------------------------
# Models and reports


def is_video_model(model) -> bool:
  """Whether ``model`` takes videos ``(B, T, H, W, 3)`` (``mame_jax.models.videomae``)."""
  return hasattr(model, "tubelet_size") and hasattr(model, "num_frames")


def average_views(logits, views: int) -> np.ndarray:
  """``(B * views, C)`` logits -> ``(B, C)``: the mean of the views' softmax, as
  VideoMAE's multi-view test merges them (logits unchanged for one view)."""
  logits = np.asarray(logits, np.float64)
  if views == 1:
    return logits
  z = logits - logits.max(-1, keepdims=True)
  p = np.exp(z)
  p /= p.sum(-1, keepdims=True)
  return p.reshape(-1, views, p.shape[-1]).mean(1)


def count_problems(corrupt: Sequence[tuple]) -> dict:
  """``{"corrupt_files": n, "too_short": m}`` of ``Loader.corrupt``'s ``(name,
  error)`` pairs: files that failed to decode and videos that were too short."""
  short = sum(1 for _, err in corrupt if str(err).startswith(TooShortVideo.__name__))
  return {"corrupt_files": len(corrupt) - short, "too_short": short}


__all__ = ["Sampling", "TooShortVideo", "VIDEO_EXTENSIONS", "average_views",
           "count_problems", "decode", "encode", "folder_source", "frame_indices",
           "is_video_model", "load_source", "resized_shape", "tfds_source", "view_starts"]
