"""``mame-jax convert SRC DST``: timm DeiT / MAE weights to a big_vision ``.npz``."""

from __future__ import annotations

import argparse

from mame_jax.models import checkpoints


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="mame-jax convert",
                                   description="timm DeiT/MAE weights -> big_vision .npz")
  parser.add_argument("src", help=".safetensors (or .pth with torch installed)")
  parser.add_argument("dst", help="output .npz")
  parser.add_argument("--num-heads", type=int, default=None,
                      help="heads (timm files don't store it; default from the width)")
  args = parser.parse_args(argv)
  out = checkpoints.convert(args.src, args.dst, num_heads=args.num_heads)
  print(f"wrote {out}")
  return 0
