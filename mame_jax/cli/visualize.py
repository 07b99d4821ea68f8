"""``mame-jax visualize``: MaMe's (and ToMe's) token clusters for images."""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Optional, Sequence

import numpy as np

from mame_jax.cli import flags as flags_lib
from mame_jax.configs import common
from mame_jax.eval.data import PHOTOS, load_image
from mame_jax.models import load
from mame_jax.models.merging import default_layers, parse_layers
from mame_jax.models.vit import image_size_of
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
  parser.add_argument("--layers", type=flags_lib.checked_text(parse_layers), default=s,
                      help="merge.layers: one panel each, e.g. 0-7 or 0,2,4 (default: the "
                           "first 8 blocks)")
  parser.add_argument("--out", default=s, help="visualize.out: PNG to write")
  parser.add_argument("--panel", type=int, default=s,
                      help="visualize.panel: panel side in pixels")
  return {"images": "visualize.images", "checkpoint": "model.checkpoint", "tau": "merge.tau",
          "tome_r": "merge.tome_r", "layers": "merge.layers", "out": "visualize.out",
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
  if not config.visualize.images:
    parser.error("no images: pass IMAGE... (or --config.visualize.images)")
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


def run(config) -> int:
  """Runs ``visualize`` for a resolved config; 0 on success, 2 (with a message
  on stderr) for a bad image, checkpoint or layer."""
  images, out = list(config.visualize.images), config.visualize.out
  try:
    tome_r = _tome_r(config.merge.tome_r)
    model, params, note = _load(config)
    print(note)
    layers = (default_layers(model.depth) if config.merge.layers is None
              else parse_layers(config.merge.layers))
    size = image_size_of(model, params)
    batch = np.stack([load_image(name, size) for name in images])
    names = [pathlib.Path(n).stem for n in images]
    _, counts = pictures.draw(model, params, batch, tau=config.merge.tau, layers=layers,
                              tome_r=tome_r, out_path=out, panel=config.visualize.panel,
                              names=names)
  except (ValueError, OSError) as e:
    print(f"mame-jax visualize: error: {e}", file=sys.stderr)
    return 2
  pictures.print_counts(counts, names, layers)
  print(f"wrote {out}")
  return 0


def cli_main(argv: Optional[Sequence[str]] = None) -> int:
  """``mame-jax visualize IMAGE... [--checkpoint PATH] [--tau T] [--tome-r R]
  [--layers 0-7] [--out fig.png] [--config FILE.py] [--config.a.b=v]``;
  ``argv`` excludes the word ``visualize``."""
  return run(parse(argv))
