"""``mame-jax eval``: Table 1 in one process (see ``mame_jax.eval.loop``)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import jax

from mame_jax.cli import flags as flags_lib
from mame_jax.configs import common
from mame_jax.eval import data as data_lib
from mame_jax.eval import loop, report


def parse(argv: Optional[Sequence[str]] = None):
  """``mame-jax eval`` arguments -> the resolved config (``common.eval_config``
  < ``--config`` < ``--config.a.b=v`` < short flags); exits 2 on a bad one."""
  parser = argparse.ArgumentParser(
      prog="mame-jax eval", description=loop.__doc__.split("\n\n")[0],
      argument_default=argparse.SUPPRESS)
  shorthands = flags_lib.add_common_flags(parser, ("auto",) + data_lib.PREPROCESS)
  config, _ = flags_lib.resolve("mame-jax eval", parser, argv, common.eval_config(),
                                shorthands)
  return config


def cli_main(argv: Optional[Sequence[str]] = None) -> int:
  """``mame-jax eval ...`` (``argv``: the arguments after ``eval``). Prints the
  table on stdout, progress on stderr; returns the exit status."""
  config = parse(argv)
  m, inp, ev = config.model, config.input, config.eval
  try:
    if ev.distributed:
      jax.distributed.initialize()
    if not inp.data:
      raise ValueError("no data: pass --data NAME (--config.input.data; e.g. imagenet2012, "
                       "imagenette, photos, a folder)")
    model, params = flags_lib.load_model_from(config)
    result = loop.evaluate(
        model, params, inp.data, taus=[float(t) for t in config.merge.tau],
        tome_r=[int(r) for r in config.merge.tome_r], merge_layers=config.merge.layers,
        tome_recipe=config.merge.tome_recipe,
        batch_size=inp.batch_size, limit=inp.limit, preprocess=m.preprocess,
        image_size=m.image_size, split=inp.split, data_dir=inp.data_dir,
        label_map=flags_lib.label_map_from(inp.label_map), num_devices=ev.devices,
        runs=ev.runs, warmup=ev.warmup, progress=ev.progress)
  except (ValueError, FileNotFoundError) as e:
    print(f"mame-jax eval: error: {e}", file=sys.stderr)
    return 2
  if jax.process_index() == 0:
    print(report.format_report(result))
  payload = report.to_json(result)
  payload["config"] = flags_lib.to_jsonable(config)
  report.write_json(ev.json, payload)
  return 0
