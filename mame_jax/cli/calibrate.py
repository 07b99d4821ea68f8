"""``mame-jax calibrate``: the largest tau that meets a FLOP budget, then held-out eval."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from mame_jax.cli import flags as flags_lib
from mame_jax.eval import calibrate as calibrate_lib
from mame_jax.eval import data as data_lib
from mame_jax.eval import report
from mame_jax.models.merging import parse_layers
from mame_jax.models.vit import image_size_of

DEFAULTS = {**flags_lib.DEFAULTS, "tau": [], "target_speedup": None, "target_gflops": None,
            "per_layer": False, "calib_images": 256, "calib_data": None, "tol": 1e-3}


def cli_main(argv: Optional[Sequence[str]] = None) -> int:
  """``mame-jax calibrate ...`` (``argv``: the arguments after ``calibrate``).

  Calibrates on the first ``--calib-images`` images of ``--calib-data``
  (default: ``--data``) and evaluates the baseline and the calibrated MaMe
  (plus ``--tau`` / ``--tome-r`` rows, if given) on held-out data: the images
  of ``--data`` after the calibration ones (all of them when the calibration
  data are another dataset), at most ``--limit``.
  """
  parser = argparse.ArgumentParser(prog="mame-jax calibrate",
                                   description=calibrate_lib.__doc__.split("\n\n")[0],
                                   argument_default=argparse.SUPPRESS)
  flags_lib.add_common_flags(parser)
  parser.add_argument("--target-speedup", type=float, help="ideal speedup to reach")
  parser.add_argument("--target-gflops", type=float, help="GFLOPs per image (XLA units)")
  parser.add_argument("--per-layer", action="store_true", help="one tau per merge layer")
  parser.add_argument("--calib-images", type=int, help="calibration images (default 256)")
  parser.add_argument("--calib-data", help="calibration data (default: --data)")
  parser.add_argument("--tol", type=float, help="bisection tolerance on tau")
  parser.add_argument("--tau", type=float, nargs="*", help="fixed taus to compare")
  parser.add_argument("--tome-r", type=int, nargs="*", help="ToMe rows to compare")
  try:
    flags = flags_lib.resolve_flags(parser, argv, DEFAULTS)
    if not flags["data"]:
      raise ValueError("no data: pass --data NAME")
    model, params = flags_lib.load_from_flags(flags)
    size = int(flags["image_size"] or image_size_of(model, params))
    kind = (data_lib.preprocess_for(model) if flags["preprocess"] in (None, "auto")
            else flags["preprocess"])
    label_map = flags_lib.label_map_from_flag(flags["label_map"])
    source = data_lib.load_source(flags["data"], split=flags["split"],
                                  data_dir=flags["data_dir"], label_map=label_map)
    calib_source = source if not flags["calib_data"] else data_lib.load_source(
        flags["calib_data"], data_dir=flags["data_dir"], label_map=label_map)
    n_calib = min(int(flags["calib_images"]), len(calib_source))
    loader = data_lib.Loader(calib_source, data_lib.preprocess_fn(kind, size),
                             min(flags["batch_size"], max(n_calib, 1)), limit=n_calib)
    batches = list(loader)
    heldout = source.subset(n_calib) if calib_source is source else source
    if len(heldout) == 0:
      raise ValueError(f"no held-out images: {source.name} has {len(source)} images and "
                       f"the first {n_calib} calibrate")
    cal = calibrate_lib.calibrate(
        model, params, batches, target_gflops=flags["target_gflops"],
        target_speedup=flags["target_speedup"], per_layer=flags["per_layer"],
        merge_layers=parse_layers(flags["merge_layers"]), tol=flags["tol"],
        heldout=heldout, taus=flags["tau"], tome_r=flags["tome_r"],
        batch_size=flags["batch_size"], limit=flags["limit"], preprocess=kind,
        image_size=size, num_devices=flags["devices"], runs=flags["runs"],
        warmup=flags["warmup"], progress=flags["progress"])
  except (ValueError, FileNotFoundError) as e:
    print(f"mame-jax calibrate: error: {e}", file=sys.stderr)
    return 2
  print(calibrate_lib.format_report(cal))
  if loader.corrupt:
    print("calibration data: " + data_lib.describe_corrupt(loader.corrupt))
  payload = cal.to_json()
  payload["calibration_corrupt"] = [list(c) for c in loader.corrupt]
  payload["flags"] = {k: v for k, v in flags.items() if k != "json"}
  report.write_json(flags["json"], payload)
  return 0
