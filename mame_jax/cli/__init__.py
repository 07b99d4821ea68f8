"""The ``mame-jax`` command: ``mame-jax SUBCOMMAND [args]``."""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, function, one-line help); modules load only when used.
COMMANDS = {
    "demo": ("mame_jax.cli.demo", "main", "MaMe on the skimage.data photographs: tokens per layer"),
    "eval": ("mame_jax.cli.eval", "cli_main",
             "top-1, images/s, GFLOPs and tokens per layer: baseline, MaMe, ToMe"),
    "visualize": ("mame_jax.cli.visualize", "cli_main",
                  "draw token clusters (MaMe and ToMe) for images"),
    "calibrate": ("mame_jax.cli.calibrate", "cli_main", "choose tau for a GFLOPs or speedup target"),
    "convert": ("mame_jax.cli.convert", "main", "convert a timm checkpoint to big_vision .npz"),
}


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
    lines = [f"  {name:<10} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    print("usage: mame-jax SUBCOMMAND [args]\n\nsubcommands:\n" + "\n".join(lines))
    if argv and argv[0] not in ("-h", "--help"):
      print(f"\nmame-jax: unknown subcommand {argv[0]!r}", file=sys.stderr)
      return 2
    return 0
  module, function, _ = COMMANDS[argv[0]]
  return int(getattr(importlib.import_module(module), function)(argv[1:]) or 0)


if __name__ == "__main__":
  sys.exit(main())
