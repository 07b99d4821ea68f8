"""``mame-jax visualize``: MaMe's (and ToMe's) token clusters for images, or for
one video of a VideoMAE checkpoint (``--video FILE``: a strip of frames per
block, MaMe's above ToMe's)."""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Optional, Sequence

import numpy as np

from mame_jax.cli import flags as flags_lib
from mame_jax.configs import common
from mame_jax.eval import video as video_lib
from mame_jax.eval import methods
from mame_jax.eval.data import PHOTOS, load_image
from mame_jax.models import load
from mame_jax.models.merging import DiffRateConfig, default_layers, parse_layers
from mame_jax.models.vit import image_size_of, pair
from mame_jax.vis import pictures


def _tome_r(text) -> Optional[object]:
  """``merge.tome_r`` (text: an int >= 0 or ``match``; ``None``: no ToMe) -> the
  ``tome_r`` of ``pictures.draw``. The field is text because it may be a word."""
  if text is None or text == "match":
    return text
  try:
    r = int(text)
  except ValueError:
    r = -1
  if r < 0:
    raise ValueError(f"--tome-r (merge.tome_r) takes an int >= 0 or 'match'; got {text!r}")
  return r


def _baselines(merge) -> list:
  """``merge.evit`` / ``merge.diffrate`` -> the EViT and DiffRate rows of
  ``pictures.draw``, built as ``mame-jax eval`` builds them
  (``mame_jax.eval.methods.baseline_rows``)."""
  rows = {"evit_layers": merge.get("evit_layers"),
          "evit": () if merge.get("evit") is None else (merge.evit,),
          "diffrate": (merge.diffrate,) if merge.get("diffrate") else ()}
  return methods.baseline_rows(rows)


def add_arguments(parser: argparse.ArgumentParser) -> dict:
  """The ``visualize`` short flags (for a subcommand parser); returns their
  shorthands (``dest`` -> config field of ``common.visualize_config``)."""
  s = argparse.SUPPRESS
  parser.add_argument("images", nargs="*", metavar="IMAGE", default=s,
                      help=f"visualize.images: image files or skimage.data names "
                           f"({', '.join(PHOTOS)}, ...)")
  flags_lib.add_config_flag(parser)
  parser.add_argument("--checkpoint", default=s,
                      help="model.checkpoint: a checkpoint file, URL or known name "
                           "(big_vision/AugReg .npz, timm .safetensors); without it a small "
                           "randomly initialised ViT")
  parser.add_argument("--tau", type=float, default=s, help="merge.tau: MaMe threshold")
  parser.add_argument("--tome-r", type=flags_lib.checked_text(_tome_r), default=s,
                      help="merge.tome_r: also draw ToMe with this r per merge layer "
                           "('match': as many tokens removed as MaMe)")
  parser.add_argument("--evit", type=float, default=s, metavar="KEEP",
                      help="merge.evit: also draw EViT at this keep rate (kept tokens, the "
                           "fused one as one group), in merge.evit_layers")
  parser.add_argument("--evit-layers", type=flags_lib.checked_text(parse_layers), default=s,
                      help="merge.evit_layers: EViT's blocks (default EViT's own 3,6,9)")
  parser.add_argument("--diffrate", type=flags_lib.checked_text(DiffRateConfig.from_spec),
                      default=s, metavar="MODEL@GFLOPS",
                      help="merge.diffrate: also draw DiffRate's published schedule, e.g. "
                           "deit_small@2.3 (pruned patches black)")
  parser.add_argument("--layers", type=flags_lib.checked_text(parse_layers), default=s,
                      help="merge.layers: one panel each, e.g. 0-7 or 0,2,4 (default: the "
                           "first 8 blocks)")
  parser.add_argument("--video", default=s,
                      help="visualize.video: a video file (PyAV), for a video checkpoint "
                           "(a VideoMAE transformers folder) instead of IMAGE...")
  parser.add_argument("--out", default=s, help="visualize.out: PNG to write")
  parser.add_argument("--panel", type=int, default=s,
                      help="visualize.panel: panel side in pixels")
  return {"images": "visualize.images", "checkpoint": "model.checkpoint", "tau": "merge.tau",
          "tome_r": "merge.tome_r", "layers": "merge.layers", "video": "visualize.video",
          "out": "visualize.out",
          "evit": "merge.evit", "evit_layers": "merge.evit_layers",
          "diffrate": "merge.diffrate",
          "panel": "visualize.panel"}


def parse(argv: Optional[Sequence[str]] = None):
  """``mame-jax visualize`` arguments -> the resolved config
  (``common.visualize_config`` < ``--config`` < ``--config.a.b=v`` < short
  flags); exits 2 on a bad one."""
  parser = argparse.ArgumentParser(prog="mame-jax visualize",
                                   description="Draw MaMe's (and ToMe's) token clusters.")
  shorthands = add_arguments(parser)
  config, _ = flags_lib.resolve("mame-jax visualize", parser, argv,
                                common.visualize_config(), shorthands)
  if config.visualize.images and config.visualize.video:
    parser.error("pass IMAGE... (an image model) or --video FILE (a video model), not both")
  if not config.visualize.images and not config.visualize.video:
    parser.error("no images: pass IMAGE... (or --config.visualize.images), or --video FILE "
                 "with a video checkpoint")
  return config


def _load(config):
  """``(model, params, note)``: the checkpoint, a random ``model.variant``, or
  with neither the small random ViT of ``load.checkpoint_or_random``."""
  m = config.model
  if not m.checkpoint and not m.variant:
    return load.checkpoint_or_random(None)
  model, params = flags_lib.load_model_from(config, require=False)
  what = (f"checkpoint {m.checkpoint}" if m.checkpoint else
          f"a randomly initialised ViT-{m.variant}")
  return model, params, f"{what} ({load.describe(model)})"


def _check_kind(model, config, *, video: bool) -> None:
  """A video model needs ``--video``, an image model images: else a ValueError
  saying which the checkpoint is and what to pass."""
  if video_lib.is_video_model(model) == video:
    return
  what = config.model.checkpoint or "the random ViT (no --checkpoint)"
  if video:
    raise ValueError(f"--video needs a video model (a VideoMAE transformers folder as "
                     f"--checkpoint); {what} is an image model: pass images instead")
  raise ValueError(f"{what} is a video model (VideoMAE): pass --video FILE, not images")


def read_video(path, model) -> np.ndarray:
  """One clip of the video file ``path`` as ``model`` (VideoMAE) sees it,
  float32 ``(num_frames, S, S, 3)`` in [-1, 1]: decoded with PyAV and sampled
  by the evaluation's rule (``mame_jax.eval.video``: every ``stride``-th
  frame, the short side resized, the centred crop); a video shorter than the
  clip is padded with its last sampled frame (``min_frames=1``)."""
  sampling = video_lib.Sampling(num_frames=int(model.num_frames),
                                size=int(pair(model.image_size)[0]), min_frames=1)
  try:
    import av  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ValueError("--video needs PyAV: pip install av (or mame-jax[video])") from None
  try:
    frames = video_lib.read_clip(path, sampling)  # the folder source's own selection
  except av.error.FFmpegError as e:
    raise ValueError(f"--video {path}: PyAV cannot decode it ({type(e).__name__}: "
                     f"{e})") from None
  return sampling.preprocess(frames)


def _draw_video(config, model, params, layers, tome_r):
  """``--video FILE``: MaMe's strip of each block above ToMe's
  (``pictures.draw_video``); ``(counts, names)``."""
  path = config.visualize.video
  clip = read_video(path, model)
  _, counts = pictures.draw_video(model, params, clip, tau=config.merge.tau, layers=layers,
                                  tome_r=tome_r, out_path=config.visualize.out,
                                  panel=config.visualize.panel)
  return counts, [pathlib.Path(path).stem]


def _draw_images(config, model, params, layers, tome_r):
  """Images: one row per method (``pictures.draw``, EViT / DiffRate rows from
  ``merge.evit`` / ``merge.diffrate``); ``(counts, names)``."""
  images = list(config.visualize.images)
  size = image_size_of(model, params)
  batch = np.stack([load_image(name, size) for name in images])
  names = [pathlib.Path(n).stem for n in images]
  _, counts = pictures.draw(model, params, batch, tau=config.merge.tau, layers=layers,
                            tome_r=tome_r, out_path=config.visualize.out,
                            panel=config.visualize.panel, names=names,
                            extra=_baselines(config.merge), preserve=config.merge.preserve)
  return counts, names


def run(config) -> int:
  """Runs ``visualize`` for a resolved config; 0 on success, 2 (with a message
  on stderr) for a bad image, video, checkpoint or layer."""
  video = bool(config.visualize.video)
  try:
    tome_r = _tome_r(config.merge.tome_r)
    model, params, note = _load(config)
    _check_kind(model, config, video=video)
    print(note)
    layers = (default_layers(model.depth) if config.merge.layers is None
              else parse_layers(config.merge.layers))
    counts, names = (_draw_video if video else _draw_images)(config, model, params, layers,
                                                             tome_r)
  except (ValueError, OSError) as e:
    print(f"mame-jax visualize: error: {e}", file=sys.stderr)
    return 2
  pictures.print_counts(counts, names, layers)
  print(f"wrote {config.visualize.out}")
  return 0


def cli_main(argv: Optional[Sequence[str]] = None) -> int:
  """``mame-jax visualize IMAGE... [--checkpoint PATH] [--tau T] [--tome-r R]
  [--evit KEEP [--evit-layers 3,6,9]] [--diffrate MODEL@GFLOPS] [--layers 0-7] [--out fig.png] [--config FILE.py] [--config.a.b=v]``, or
  ``mame-jax visualize --checkpoint VIDEOMAE_FOLDER --video FILE.mp4 ...``;
  ``argv`` excludes the word ``visualize``."""
  return run(parse(argv))
