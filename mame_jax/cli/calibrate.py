"""``mame-jax calibrate``: the largest tau that meets a FLOP budget, then held-out eval."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from mame_jax.cli import eval as eval_cli
from mame_jax.cli import flags as flags_lib
from mame_jax.configs import common
from mame_jax.eval import calibrate as calibrate_lib
from mame_jax.eval import data as data_lib
from mame_jax.eval import report
from mame_jax.models.merging import MergeConfig, parse_layers
from mame_jax.models.vit import image_size_of


def parse(argv: Optional[Sequence[str]] = None):
  """``mame-jax calibrate`` arguments -> the resolved config
  (``common.calibrate_config`` < ``--config`` < ``--config.a.b=v`` < short
  flags); exits 2 on a bad one."""
  parser = argparse.ArgumentParser(prog="mame-jax calibrate",
                                   description=calibrate_lib.__doc__.split("\n\n")[0],
                                   argument_default=argparse.SUPPRESS)
  shorthands = flags_lib.add_common_flags(parser, ("auto",) + data_lib.PREPROCESS)
  parser.add_argument("--target-speedup", type=float,
                      help="calibrate.target_speedup: ideal speedup to reach")
  parser.add_argument("--target-gflops", type=float,
                      help="calibrate.target_gflops: GFLOPs per image (XLA units)")
  parser.add_argument("--per-layer", action="store_true",
                      help="calibrate.per_layer: one tau per merge layer")
  parser.add_argument("--calib-images", type=int,
                      help="calibrate.calib_images: calibration images (default 256)")
  parser.add_argument("--calib-data",
                      help="calibrate.calib_data: calibration data (default: --data)")
  parser.add_argument("--tol", type=float, help="calibrate.tol: bisection tolerance on tau")
  for name in ("target_speedup", "target_gflops", "per_layer", "calib_images", "calib_data",
               "tol"):
    shorthands[name] = "calibrate." + name
  config, _ = flags_lib.resolve("mame-jax calibrate", parser, argv,
                                common.calibrate_config(), shorthands)
  return config


def cli_main(argv: Optional[Sequence[str]] = None) -> int:
  """``mame-jax calibrate ...`` (``argv``: the arguments after ``calibrate``).

  Calibrates on the first ``--calib-images`` images of ``--calib-data``
  (default: ``--data``) and evaluates the baseline and the calibrated MaMe
  (plus ``--tau`` / ``--tome-r`` rows, if given) on held-out data: the images
  of ``--data`` after the calibration ones (all of them when the calibration
  data are another dataset), at most ``--limit``. Every flag is a shorthand
  of a config field (``mame_jax.configs.common.calibrate_config``).

  A zero-shot config (``--config.zeroshot.tokenizer`` set, e.g.
  ``configs/siglip_b16_512.py``) loads both towers through ``mame-jax eval``'s
  zero-shot path: tau is calibrated on the image tower's token counts (the class
  product is a negligible, constant cost) and the held-out rows are zero-shot top-1.
  """
  config = parse(argv)
  m, inp, ev, cal_c = config.model, config.input, config.eval, config.calibrate
  try:
    if not inp.data:
      raise ValueError("no data: pass --data NAME (--config.input.data)")
    data, head, kind = inp.data, {}, m.preprocess
    if config.zeroshot.tokenizer:
      # Zero-shot (SigLIP): tau is calibrated on the image tower's tokens, as for any
      # ViT; the held-out rows score the zero-shot classifier (class embeddings
      # computed once, by mame-jax eval's own zero-shot path).
      model, params, data, head = eval_cli.zero_shot(config)
      kind = "siglip" if kind in (None, "auto") else kind
    else:
      model, params = flags_lib.load_model_from(config)
    size = int(m.image_size or image_size_of(model, params))
    kind = data_lib.preprocess_for(model) if kind in (None, "auto") else kind
    label_map = flags_lib.label_map_from(inp.label_map)
    source = data_lib.load_source(data, split=inp.split, data_dir=inp.data_dir,
                                  label_map=label_map)
    calib_source = source if not cal_c.calib_data else data_lib.load_source(
        cal_c.calib_data, data_dir=inp.data_dir, label_map=label_map)
    n_calib = min(int(cal_c.calib_images), len(calib_source))
    loader = data_lib.Loader(calib_source, data_lib.preprocess_fn(kind, size, m.crop_pct),
                             min(inp.batch_size, max(n_calib, 1)), limit=n_calib)
    batches = list(loader)
    heldout = source.subset(n_calib) if calib_source is source else source
    if len(heldout) == 0:
      raise ValueError(f"no held-out images: {source.name} has {len(source)} images and "
                       f"the first {n_calib} calibrate")
    cal = calibrate_lib.calibrate(
        model, params, batches, target_gflops=cal_c.target_gflops,
        target_speedup=cal_c.target_speedup, per_layer=cal_c.per_layer,
        merge_layers=parse_layers(config.merge.layers), tol=cal_c.tol,
        merge=MergeConfig(**common.mame_fields(config.merge)),
        mame_fields=common.mame_fields(config.merge),
        heldout=heldout, taus=[float(t) for t in config.merge.tau],
        tome_r=[int(r) for r in config.merge.tome_r], tome_recipe=config.merge.tome_recipe,
        batch_size=inp.batch_size,
        limit=inp.limit, preprocess=kind, crop_pct=m.crop_pct, image_size=size,
        num_devices=ev.devices,
        runs=ev.runs, warmup=ev.warmup, progress=ev.progress, **head)
  except (ValueError, FileNotFoundError) as e:
    print(f"mame-jax calibrate: error: {e}", file=sys.stderr)
    return 2
  print(calibrate_lib.format_report(cal))
  if loader.corrupt:
    print("calibration data: " + data_lib.describe_corrupt(loader.corrupt))
  payload = cal.to_json()
  payload["calibration_corrupt"] = [list(c) for c in loader.corrupt]
  payload["config"] = flags_lib.to_jsonable(config)
  report.write_json(ev.json, payload)
  return 0
