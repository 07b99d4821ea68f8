"""VideoMAE throughput with MaMe and ToMe at 16 x 224^2 (1568 tokens): Table 6's setting.

    python -m benchmarks.video_throughput --quick    # ViT-S-sized VideoMAE, batch 1 (CPU, minutes)
    python -m benchmarks.video_throughput            # ViT-S- and B-sized, batch 1 and 8
    python -m benchmarks.video_throughput --models B --batch 32 --dtype bfloat16   # a GPU

Inputs with real structure: every video is a 16-frame pan across one of the
scikit-image photographs (a 224 px window sliding right by ``--pan`` px per
frame), so neighbouring tubelets are alike as in real footage. Random weights (a
trained model merges differently; the cost of a given token count does not
change). For each size and batch, timed interleaved by ``vit_throughput``'s
machinery (``measure_all``: ``mame_jax.eval.timing.time_interleaved``, median of
``--runs``):

* ``baseline``: the plain encoder;
* ``mame`` at each Table 6 ``tau`` (first 8 blocks, exact mode: the runner
  settles the capacity schedule first, then that one program is timed);
* ``tome`` in every block with the ``r`` whose analytic cost comes closest to
  that MaMe row's measured GFLOPs ratio, each distinct ``r`` timed once
  (``siglip_throughput.tome_r_per_tau``).

``ideal`` speedup = baseline GFLOPs / method GFLOPs (XLA cost analysis, padding
included); ``measured/ideal`` is how much of the reduction turns into speed.
VideoMAE-B at 1568 tokens is ~360 XLA GFLOPs a video: too slow for a few
minutes on a shared CPU, so ``--quick`` runs a ViT-S-sized VideoMAE (width 384,
6 heads) and batch 1 only.
"""

from __future__ import annotations

import argparse
import pathlib
import shlex
import sys

if not __package__:  # run as a file, not with -m: see benchmarks/__init__.py
  sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import jax
import numpy as np

import mame_jax as mj
from benchmarks.siglip_throughput import tome_r_per_tau
from benchmarks.vit_throughput import (add_speedups, batch_wide_note, measure_all, open_section,
                                       weights_line)
from mame_jax.eval import timing
from mame_jax.eval.data import PHOTOS, load_image
from mame_jax.eval.report import write_json
from mame_jax.models import videomae

SIZES = {"S": dict(width=384, depth=12, num_heads=6, mlp_dim=1536),
         "B": dict(width=768, depth=12, num_heads=12, mlp_dim=3072)}
TABLE6_TAUS = (0.9, 0.85)  # VideoMAE-B's MaMe rows
JSON = "results/video_throughput.json"


def panning_videos(batch: int, frames: int = 16, size: int = 224, pan: int = 6) -> np.ndarray:
  """``(batch, frames, size, size, 3)`` float32 in [-1, 1]: video ``b`` pans a
  ``size`` window across photograph ``PHOTOS[b % 6]`` by ``pan`` px a frame."""
  wide = size + pan * (frames - 1)
  out = []
  for b in range(batch):
    photo = load_image(PHOTOS[b % 6], wide)  # square, wide x wide
    top = (wide - size) // 2
    out.append(np.stack([photo[top:top + size, f * pan:f * pan + size] for f in range(frames)]))
  return np.stack(out).astype(np.float32)


def random_params(model, videos, seed: int = 0):
  shapes = jax.eval_shape(model.init, jax.random.key(seed), videos[:1])["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: (rng.normal(0, 0.02, a.shape) if a.ndim > 1 else
                                 np.zeros(a.shape)).astype(np.float32), shapes)


def bench(size_name, videos, args):
  model = videomae.Model(400, dtype_mm=args.dtype, **SIZES[size_name])
  params = random_params(model, videos)
  # LayerNorm scales at one (zeros would flatten every token).
  params = jax.tree_util.tree_map_with_path(
      lambda p, a: np.ones_like(a) if "scale" in jax.tree_util.keystr(p) else a, params)
  params = jax.device_put(params)
  x = jax.device_put(videos)
  name = f"VideoMAE-{size_name}-sized"
  print(f"{name}, batch {x.shape[0]}, {x.shape[1]} x {x.shape[2]}^2, {args.dtype}", flush=True)
  length = model.sequence_lengths(x.shape[1:4])[0]
  base_fn = jax.jit(lambda p, v: model.apply({"params": p}, v)[0])
  base_gflops = timing.gflops(base_fn, params, x) / x.shape[0]
  methods = [("baseline", base_fn, dict(tokens_per_layer=[float(length)] * model.depth))]
  layers = tuple(range(min(8, model.depth)))
  ratios = {}
  for tau in args.taus:
    runner = mj.Runner(model.clone(merge=mj.MergeConfig(tau=tau, layers=layers)), params)
    _, aux = runner(x)
    program = runner.program(runner.schedule, x.shape)
    fn = jax.jit(lambda p, v, program=program: program(p, v)[0])
    ratios[tau] = timing.gflops(fn, params, x) / x.shape[0] / base_gflops
    methods.append((f"mame {tau:g}", fn, dict(
        tau=tau, capacities=list(runner.schedule), reruns=runner.reruns,
        tokens_per_layer=np.asarray(aux["tokens_per_block"]).mean(0).round(1).tolist())))
  for r, matched in tome_r_per_tau(model, length, ratios):  # each distinct r timed once
    tome = model.clone(merge=mj.ToMeConfig.recipe("mae", r=r))
    tome_fn = jax.jit(lambda p, v, tome=tome: tome.apply({"params": p}, v))
    _, taux = tome_fn(params, x)
    methods.append((f"tome {r}", jax.jit(lambda p, v, f=tome_fn: f(p, v)[0]), dict(
        r=r, matches_tau=matched,
        tokens_per_layer=np.asarray(taux["tokens_per_block"]).mean(0).round(1).tolist())))
  rows = measure_all(methods, params, x, args.runs)
  for row in add_speedups(rows):  # one video is one input: rates per video
    row.update(model=name, batch=int(x.shape[0]), tokens=int(length))
    row["videos_per_s"] = row.pop("images_per_s")
    row["gflops_per_video"] = row.pop("gflops_per_image")
  return rows


COLUMNS = ["model", "batch", "method", "videos_per_s", "gflops_per_video", "measured_speedup",
           "ideal_speedup", "measured_over_ideal"]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", nargs="+", default=["S", "B"], choices=sorted(SIZES))
  parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
  parser.add_argument("--frames", type=int, default=16)
  parser.add_argument("--taus", type=float, nargs="+", default=list(TABLE6_TAUS))
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--runs", type=int, default=5)
  parser.add_argument("--pan", type=int, default=6, help="pixels the window moves a frame")
  parser.add_argument("--quick", action="store_true", help="S-sized, batch 1, 3 runs")
  parser.add_argument("--json", default=JSON)
  args = parser.parse_args(argv)
  if args.quick:
    args.models, args.batch, args.runs = ["S"], [1], 3
  rows = []
  for size_name in args.models:
    for batch in args.batch:
      rows += bench(size_name, panning_videos(batch, args.frames, pan=args.pan), args)
  print()
  print(timing.format_table(rows, COLUMNS))
  for row in rows:
    print(f"{row['model']} b{row['batch']} {row['method']:<9} tokens per block: "
          f"{row['tokens_per_layer']}")
  command = "python -m benchmarks.video_throughput " + shlex.join(
      sys.argv[1:] if argv is None else argv)
  write_json(args.json, dict(device=timing.device_description(), date=timing.today(),
                             dtype=args.dtype, frames=args.frames, quick=args.quick,
                             command=command, rows=rows))
  print(f"\nsaved {args.json}")


def section(path: str = JSON) -> list[str]:
  """The BENCHMARKS.md section, rendered from the committed JSON."""
  lines, res = open_section("VideoMAE throughput (Table 6 setting: 16 x 224^2, 1568 tokens)",
                            path, "video_throughput")
  if res is None:
    return lines + [""]
  lines += ["", weights_line("random", "randomly initialised VideoMAEs on panning clips over "
                            "skimage photographs: the cost of each token count is real, "
                            "the counts are not a trained checkpoint's."), ""]
  models = sorted({r["model"] for r in res["rows"]})
  if all("B-sized" not in m for m in models):
    lines += ["Only a ViT-S-sized VideoMAE (width 384) was run: VideoMAE-B at 1568 tokens "
              "is too slow for this CPU.", ""]
  head = "| model | batch | method | videos/s | GFLOPs/video | speedup | ideal | measured/ideal |"
  lines += [head, "|" + "---|" * 8]
  for r in res["rows"]:
    lines.append(f"| {r['model']} | {r['batch']} | {r['method']} | {r['videos_per_s']:.3f} | "
                 f"{r['gflops_per_video']:.1f} | {r['measured_speedup']:.2f}x | "
                 f"{r['ideal_speedup']:.2f}x | {r['measured_over_ideal']:.2f} |")
  lines.append("")
  for r in res["rows"]:
    if r["method"].startswith("mame") and r["tokens_per_layer"][-1] > 0.9 * r["tokens"]:
      lines.append(f"- {r['model']} batch {r['batch']} {r['method']}: merged almost nothing "
                   f"({r['tokens_per_layer'][-1]:.0f} of {r['tokens']} tokens left). "
                   f"{batch_wide_note(r['batch'], 'clips')}. Its speedup there, like ToMe's "
                   "at r=0, is not from merging (both do about the baseline's work): it is "
                   "this CPU's variation between rows.")
  if any(r["batch"] > 1 and r["method"].startswith("mame") for r in res["rows"]):
    lines.append("")
  if "gpu" not in res["device"].lower() and "cuda" not in res["device"].lower():
    lines += ["No GPU figures yet (bf16 at batch >= 32 needs a GPU run): the paper's "
              "VideoMAE-L 1.48x (RTX 3090, FP16, batch 1) is not checked here.", ""]
  return lines


if __name__ == "__main__":
  main()
