"""``mame-jax visualize``: MaMe's (and ToMe's) token clusters for images."""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Optional, Sequence

import numpy as np

from mame_jax.eval.data import PHOTOS, load_image
from mame_jax.models import load
from mame_jax.models.merging import DEFAULT_TAU, default_layers, parse_layers
from mame_jax.models.vit import image_size_of
from mame_jax.vis import pictures


def _layers(text: str) -> tuple:
  try:
    return parse_layers(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from e


def _tome_r(text: str):
  if text == "match":
    return text
  try:
    r = int(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(f"--tome-r takes an int >= 0 or 'match'; got {text!r}") from e
  if r < 0:
    raise argparse.ArgumentTypeError(f"--tome-r takes an int >= 0 or 'match'; got {r}")
  return r


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
  """The ``visualize`` options (for a subcommand parser)."""
  parser.add_argument("images", nargs="+", metavar="IMAGE",
                      help=f"image files or skimage.data names ({', '.join(PHOTOS)}, ...)")
  parser.add_argument("--checkpoint", help="a checkpoint file (big_vision/AugReg .npz, "
                      "timm .safetensors); without it a small randomly initialised ViT")
  parser.add_argument("--tau", type=float, default=DEFAULT_TAU,
                      help=f"MaMe threshold (default {DEFAULT_TAU})")
  parser.add_argument("--tome-r", type=_tome_r, default=None,
                      help="also draw ToMe with this r per merge layer ('match': as many "
                      "tokens removed as MaMe)")
  parser.add_argument("--layers", type=_layers, default=None,
                      help="merge layers, one panel each, e.g. 0-7 or 0,2,4 (default: the "
                      "first 8 blocks)")
  parser.add_argument("--out", default="token_clusters.png", help="PNG to write")
  parser.add_argument("--panel", type=int, default=160, help="panel side in pixels")
  return parser


def run(args: argparse.Namespace) -> int:
  """Runs ``visualize`` for arguments parsed with :func:`add_arguments`; 0 on
  success, 2 (with a message on stderr) for a bad image, checkpoint or layer."""
  try:
    model, params, note = load.checkpoint_or_random(args.checkpoint)
    print(note)
    layers = default_layers(model.depth) if args.layers is None else args.layers
    size = image_size_of(model, params)
    batch = np.stack([load_image(name, size) for name in args.images])
    names = [pathlib.Path(n).stem for n in args.images]
    _, counts = pictures.draw(model, params, batch, tau=args.tau, layers=layers,
                     tome_r=args.tome_r, out_path=args.out, panel=args.panel, names=names)
  except (ValueError, OSError) as e:
    print(f"mame-jax visualize: error: {e}", file=sys.stderr)
    return 2
  pictures.print_counts(counts, names, layers)
  print(f"wrote {args.out}")
  return 0


def cli_main(argv: Optional[Sequence[str]] = None) -> int:
  """``mame-jax visualize IMAGE... [--checkpoint PATH] [--tau T] [--tome-r R]
  [--layers 0-7] [--out fig.png]``; ``argv`` excludes the word ``visualize``."""
  parser = add_arguments(argparse.ArgumentParser(
      prog="mame-jax visualize", description="Draw MaMe's (and ToMe's) token clusters."))
  return run(parser.parse_args(argv))
