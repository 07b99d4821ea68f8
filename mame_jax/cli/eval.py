"""``mame-jax eval``: Table 1 in one process (see ``mame_jax.eval.loop``)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import jax

from mame_jax.cli import flags as flags_lib
from mame_jax.eval import loop, report


def cli_main(argv: Optional[Sequence[str]] = None) -> int:
  """``mame-jax eval ...`` (``argv``: the arguments after ``eval``). Prints the
  table on stdout, progress on stderr; returns the exit status."""
  parser = argparse.ArgumentParser(
      prog="mame-jax eval", description=loop.__doc__.split("\n\n")[0],
      argument_default=argparse.SUPPRESS)
  flags_lib.add_common_flags(parser)
  parser.add_argument("--tau", type=float, nargs="*", default=argparse.SUPPRESS,
                      help="MaMe thresholds, one row each (default 0.8)")
  parser.add_argument("--tome-r", type=int, nargs="*", default=argparse.SUPPRESS,
                      help="ToMe r values, one row each")
  try:
    flags = flags_lib.resolve_flags(parser, argv, flags_lib.DEFAULTS)
    if flags["distributed"]:
      jax.distributed.initialize()
    if not flags["data"]:
      raise ValueError("no data: pass --data NAME (e.g. imagenet2012, imagenette, photos, "
                       "a folder)")
    model, params = flags_lib.load_from_flags(flags)
    result = loop.evaluate(
        model, params, flags["data"], taus=flags["tau"], tome_r=flags["tome_r"],
        merge_layers=flags["merge_layers"], batch_size=flags["batch_size"],
        limit=flags["limit"], preprocess=flags["preprocess"],
        image_size=flags["image_size"], split=flags["split"], data_dir=flags["data_dir"],
        label_map=flags_lib.label_map_from_flag(flags["label_map"]), num_devices=flags["devices"],
        runs=flags["runs"], warmup=flags["warmup"], progress=flags["progress"])
  except (ValueError, FileNotFoundError) as e:
    print(f"mame-jax eval: error: {e}", file=sys.stderr)
    return 2
  if jax.process_index() == 0:
    print(report.format_report(result))
  payload = report.to_json(result)
  payload["flags"] = {k: v for k, v in flags.items() if k != "json"}
  report.write_json(flags["json"], payload)
  return 0
