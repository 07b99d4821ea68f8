"""SigLIP B/16 image tower at 512 px: throughput with MaMe and ToMe (Table 3's setting).

    python -m benchmarks.siglip_throughput --quick      # batch 1 (CPU, minutes)
    python -m benchmarks.siglip_throughput              # batch 1 and 32 (CPU: very slow)
    python -m benchmarks.siglip_throughput --batches 256 --dtype bfloat16   # a GPU

The model is the released SigLIP B/16 image tower's architecture -- width 768, 12
blocks, 16-px patches, no class token, the MAP head pooling (so ``num_special = 0``
and the head ignores MaMe's padding) -- at 512 px, i.e. 1024 tokens, with random
weights (``mame_jax.models.load.random_params``; no 800 MB download). The inputs
are the project's photographs (``mame_jax.eval.data.PHOTOS``, tiled to the batch)
so that the merge sees real image structure; still, random weights merge
differently from the trained ones (the tokens of a random tower are mostly its
patch embedding), so the token counts, and with them the speedups, are not those
of the real checkpoint -- the cost of a given token count is.

Rows, per batch size: ``baseline``; ``mame`` in the first 8 blocks at each tau
(exact mode: ``mame_jax.Runner`` settles the capacity schedule, then that one
program is timed); ``tome`` in every block (ToMe's own "timm" recipe, which SigLIP
follows) with the ``r`` whose analytic cost comes closest to that MaMe row's; each distinct
``r`` is timed once, as one row whose ``matches_tau`` lists the taus it matches
(``tome_r_per_tau``).
Timing, GFLOPs and the ToMe ``r`` are ``benchmarks/vit_throughput.py``'s
(``measure_all``; ``mame_jax.eval.matching.tome_r_for_ratio``): compile first, then interleaved rounds,
the median, XLA's FLOP count. ``ideal`` speedup = baseline GFLOPs / the row's.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

if not __package__:  # run as a file, not with -m: see benchmarks/__init__.py
  sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import numpy as np

import mame_jax as mj
from benchmarks.vit_throughput import (add_speedups, batch_wide_note, command_line, measure_all,
                                       open_section, photo_batch, weights_line)
from mame_jax.eval import timing
from mame_jax.eval.data import PHOTOS
from mame_jax.eval.matching import tome_r_for_ratio
from mame_jax.eval.report import write_json
from mame_jax.models import load
from mame_jax.vis.pictures import tome_token_counts

RESULTS = pathlib.Path("results/siglip_throughput.json")
COLUMNS = ["batch", "method", "tau", "r", "matches_tau", "images_per_s", "iqr_ms",
           "gflops_per_image", "measured_speedup", "ideal_speedup", "measured_over_ideal",
           "compile_s"]


def siglip_b16(image_size: int = 512, dtype: str = "float32", seed: int = 0):
  """``(model, params)``: SigLIP B/16's image tower (MAP head, no class token, no
  classifier head) with random float32 parameters."""
  model = mj.Model(None, variant="B/16", pool_type="map", class_token=False,
                   **load.matmul_dtype(dtype))
  return model, load.random_params(model, image_size, seed)


def bench_batch(model, params, images, taus, runs, warmup):
  """One batch size: baseline, MaMe per tau, ToMe at each MaMe row's GFLOPs."""
  batch = images.shape[0]
  length = (images.shape[1] // 16) * (images.shape[2] // 16)  # no class token
  base_fn = _first(lambda p, x: model.apply({"params": p}, x))
  base_gflops = timing.gflops(base_fn, params, images) / batch
  methods = [("baseline", base_fn, dict(tokens_per_layer=[float(length)] * model.depth))]
  layers = tuple(range(min(8, model.depth)))
  ratios = {}
  for tau in taus:
    runner = mj.Runner(model.clone(merge=mj.MergeConfig(tau=tau, layers=layers)), params)
    _, aux = runner(images)
    fn = _first(runner.program(runner.schedule, images.shape))
    ratios[tau] = timing.gflops(fn, params, images) / batch / base_gflops
    methods.append((f"mame({tau:g})", fn, dict(
        tau=tau, capacities=list(runner.schedule or ()), reruns=runner.reruns,
        tokens_per_layer=np.asarray(aux["tokens_per_block"]).mean(0).round(1).tolist())))
  for r, matched in tome_r_per_tau(model, length, ratios):
    tome = model.clone(merge=mj.ToMeConfig.recipe("timm", r=r))
    tome_fn = _first(lambda p, x, m=tome: m.apply({"params": p}, x))
    # ToMe's counts follow from r alone (r per block, at most half the tokens).
    tokens = tome_token_counts(length, r, model.depth, num_special=0)
    methods.append((f"tome(r={r})", tome_fn, dict(
        r=r, matches_tau=matched, tokens_per_layer=[float(t) for t in tokens])))
  print(f"SigLIP B/16 image tower, {images.shape[1]} px ({length} tokens), batch {batch}",
        flush=True)
  rows = add_speedups(measure_all(methods, params, images, runs, warmup))
  for row in rows:
    row["model"] = "SigLIP B/16 img"
    row["batch"] = batch
  return rows


def tome_r_per_tau(model, length: int, ratios) -> list:
  """``{tau: MaMe's GFLOPs ratio to the baseline}`` -> ``[(r, [taus])]``: the ToMe
  ``r`` matching each ratio (``matching.tome_r_for_ratio`` on ``model``'s
  blocks at ``length`` tokens), each distinct ``r`` once with every tau it
  matches, in the order first matched. ToMe's ``r`` moves in steps, so two MaMe
  rows of about the same cost can match the same ``r``: it is timed once, as one
  row."""
  out = {}
  for tau, ratio in ratios.items():
    out.setdefault(tome_r_for_ratio(model, length, ratio), []).append(tau)
  return list(out.items())


def _first(fn):
  """The jitted embedding alone (``(B, E)``), without the model's aux outputs."""
  import jax  # pylint: disable=import-outside-toplevel
  return jax.jit(lambda p, x: fn(p, x)[0])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
  parser.add_argument("--taus", type=float, nargs="+", default=[0.8, 0.9, 0.95])
  parser.add_argument("--image-size", type=int, default=512)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--runs", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--quick", action="store_true", help="batch 1 only, 3 runs, no warm-up round")
  parser.add_argument("--json", default=str(RESULTS))
  args = parser.parse_args(argv)
  if args.quick:
    args.batches, args.runs, args.warmup = [1], 3, 0
  model, params = siglip_b16(args.image_size, args.dtype)
  rows = []
  for batch in args.batches:
    images = photo_batch(batch, args.image_size, count=len(PHOTOS))
    rows += bench_batch(model, params, images, args.taus, args.runs, args.warmup)
  print()
  print(timing.format_table(display(rows), COLUMNS))
  for row in rows:
    print(f"batch {row['batch']} {row['method']:<12} tokens per block: {row['tokens_per_layer']}")
  command = command_line("siglip_throughput", argv)
  write_json(args.json, dict(device=timing.device_description(), date=timing.today(),
                             dtype=args.dtype, image_size=args.image_size,
                             batches=args.batches, runs=args.runs, command=command,
                             weights="random", inputs="mame_jax.eval.data.PHOTOS",
                             rows=rows))
  print(f"\nsaved {args.json}")


def section(path=RESULTS) -> list:
  """The BENCHMARKS.md section from ``path`` (a run of this script): command, device
  and date beside the table, then what was not measured or fell short, said plainly."""
  out, run = open_section("SigLIP B/16 image tower at 512 px: baseline, MaMe, ToMe", path,
                          "siglip_throughput")
  if run is None:
    return out
  device = run["device"]
  out += ["", weights_line("random", "a randomly initialised SigLIP B/16 image tower on the "
                          "project's photographs: the cost of each token count is real, the "
                          "token counts are not the trained checkpoint's (it merges "
                          "differently)."),
          "", timing.format_table(display(run["rows"]), COLUMNS), "", "Tokens per block:", ""]
  out += [f"- batch {r['batch']} {r['method']}: {r['tokens_per_layer']}" for r in run["rows"]]
  out += ["", "Not measured or short of the goal:", ""]
  misses = [f"- batch {b}: not measured in this run" for b in (1, 32)
            if b not in run["batches"]]
  if (device.get("platform") == "cpu" if isinstance(device, dict)
      else str(device).startswith("cpu")):
    misses.append("- batch >= 256 in bf16 on a GPU: not measured (no GPU run yet)")
  rows = run["rows"]
  for m in (r for r in rows if r["method"].startswith("mame")):
    t = next((r for r in rows if m["tau"] in _as_list(r.get("matches_tau"))
              and r["batch"] == m["batch"]), None)
    if m["measured_speedup"] < 1:
      misses.append(f"- batch {m['batch']} {m['method']}: slower than the baseline "
                    f"({m['measured_speedup']:.2f}x)")
    left, length = m["tokens_per_layer"][-1], rows[0]["tokens_per_layer"][0]
    if left > 0.9 * length:
      misses.append(f"- batch {m['batch']} {m['method']}: merged almost nothing ({left:.0f} "
                    f"of {length:.0f} tokens left). {batch_wide_note(m['batch'])}")
    if t is not None and m["images_per_s"] < t["images_per_s"]:
      misses.append(f"- batch {m['batch']} {m['method']}: {m['images_per_s']:.2f} img/s, "
                    f"below its GFLOPs-matched {t['method']} ({t['images_per_s']:.2f} img/s; "
                    f"{t['gflops_per_image']:.1f} against {m['gflops_per_image']:.1f} "
                    "GFLOPs: ToMe's r moves in steps)")
  for r in rows:
    # A row doing the baseline's work (ideal 1.00x) shows the spread between rows.
    drift = r["measured_speedup"] / r["ideal_speedup"] - 1
    if r["method"] != "baseline" and abs(r["ideal_speedup"] - 1) < 0.02 and abs(drift) > 0.05:
      misses.append(f"- batch {r['batch']} {r['method']}: does about the baseline's work "
                    f"(ideal {r['ideal_speedup']:.2f}x) yet measured "
                    f"{r['measured_speedup']:.2f}x: at this batch the measured speedups carry "
                    f"about {abs(drift):.0%} of this machine's drift between rows "
                    f"({run['runs']} runs each), so measured/ideal above 1 there is noise, "
                    "not a gain")
  return out + (misses or ["- nothing: every row measured, MaMe ahead of the baseline "
                           "and of ToMe at matched GFLOPs"])


def display(rows) -> list:
  """``rows`` for the table: ``matches_tau`` as ``"0.8, 0.9"``."""
  return [{**r, "matches_tau": ", ".join(f"{t:g}" for t in _as_list(r.get("matches_tau")))
           or None} for r in rows]


def _as_list(v) -> list:
  return [] if v is None else list(v) if isinstance(v, (list, tuple)) else [v]


if __name__ == "__main__":
  main()
