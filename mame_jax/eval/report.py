"""The evaluation report: the text table and the JSON."""

from __future__ import annotations

import json
import os

import jax

from mame_jax.eval import data as data_lib
from mame_jax.eval import timing

# tokens/layer: the real tokens per block (mean over images and blocks); paid/layer:
# those the program pays for -- padding and bucket slack included, or the packed
# buffer's share per image (MergeConfig.execution="packed").
TABLE_COLUMNS = ("method", "top1", "images/s", "GFLOPs/img", "tokens/layer", "paid/layer",
                 "speedup", "ideal speedup")


def format_report(result: dict) -> str:
  """The text report: a header, the Table-1-like table and the corrupt count."""
  shown = []
  video = result.get("unit") == "videos"  # mame_jax.eval.video: per video, all views
  columns = TABLE_COLUMNS if not video else tuple(
      {"images/s": "videos/s", "GFLOPs/img": "GFLOPs/video"}.get(c, c) for c in TABLE_COLUMNS)
  for r in result["rows"]:
    shown.append(dict(zip(columns, (
        r["name"], r["top1"], r["images_per_s"], r["gflops_per_image"],
        r["mean_tokens_per_layer"], r.get("mean_paid_per_layer"), r["measured_speedup"],
        r["ideal_speedup"]))))
  unit = "videos" if video else "images"
  crop = result.get("crop_pct")  # None: video sampling or a callable of the caller's
  head = (f"{result['data']}: {result['num_images']} {unit} "
          f"({result['num_labelled']} labelled), batch {result['batch_size']} on "
          f"{result['num_devices']} device(s), {result['image_size']}px "
          f"{result['preprocess']} preprocessing"
          f"{'' if crop is None else f' (crop_pct {crop})'}\n{result['device']}, "
          f"{result['date']}; GFLOPs from XLA (2 per multiply-add)")
  if video:
    s = result["sampling"]
    head += (f"\n{s['num_frames']} frames at stride {s['stride']}, {s['clips']} clip(s) x "
             f"{s['crops']} crop(s) per video; {result['num_too_short']} too short "
             f"(< {s['min_frames'] or s['num_frames']} frames), {result['num_corrupt_files']} "
             "corrupt")
  return "\n".join([head, timing.format_table(shown, columns),
                    data_lib.describe_corrupt([tuple(c) for c in result["corrupt"]])
                    if result["corrupt"] or not result["num_corrupt"]
                    else f"{result['num_corrupt']} corrupt image(s) (on other hosts)"])


def to_json(result: dict) -> dict:
  """The JSON-able part of a result (no predictions)."""
  return {k: v for k, v in result.items() if k not in ("predictions", "keys")}


def write_json(path, payload):
  """Writes ``payload`` as JSON to ``path`` (folders made as needed), on process 0
  only; NumPy scalars are written as numbers. The one JSON writer of the
  commands and the benchmarks."""
  if path and jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
      json.dump(payload, f, indent=1, default=float)
      f.write("\n")

