"""Table 1's baselines side by side at matched GFLOPs: MaMe, ToMe, EViT, DiffRate.

    python -m benchmarks.baselines --quick      # DeiT-S, batch 8 (CPU, minutes)
    python -m benchmarks.baselines              # DeiT-S and DeiT-B, batch 32
    python -m benchmarks.baselines --batch 256 --dtype bfloat16   # a GPU

For each model (DeiT-S / DeiT-B architecture, random weights unless
``--checkpoint``) and one batch of real photographs, it times the jitted forward
of (``vit_throughput.measure_all``: compile first, interleaved rounds, medians):

* ``baseline``;
* ``mame`` -- MaMe in the first 8 blocks at ``tau`` (exact mode, schedule settled
  first by ``mame_jax.Runner``);
* ``tome`` -- ToMe in every block with the ``r`` whose analytic GFLOPs are nearest
  MaMe's (at the tokens it kept; ``mame_jax.eval.matching``, the matchers of
  ``mame-jax eval --match-gflops-of-tau``);
* ``evit`` -- EViT in blocks 3, 6, 9 with the keep rate matched the same way
  (bisection);
* ``diffrate`` -- DiffRate's published schedule for the model at the paper's
  Table 1 GFLOPs (half the baseline's), which is fixed: it is not re-matched to
  MaMe.

Random weights merge differently from trained ones (MaMe's token counts depend on
the data and the weights; EViT, DiffRate and ToMe remove fixed counts), so this
compares cost at matched GFLOPs, not accuracy. ``ideal`` speedup = baseline
GFLOPs / method GFLOPs (XLA's count); ``measured/ideal`` is how much of the
reduction turns into speed.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import sys

if not __package__:  # run as a file, not with -m: see benchmarks/__init__.py
  sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import jax
import numpy as np

import mame_jax as mj
from benchmarks.vit_throughput import add_speedups, measure_all, photo_batch, weights_line
from mame_jax.eval import matching, timing
from mame_jax.eval.report import write_json

# Model -> DiffRate's published schedule at the paper's Table 1 GFLOPs.
MODELS = {"S/16": ("DeiT-S", "deit_small@2.3"), "B/16": ("DeiT-B", "deit_base@8.7")}
COLUMNS = ["model", "method", "setting", "images_per_s", "gflops_per_image",
           "measured_speedup", "ideal_speedup", "measured_over_ideal", "final_tokens"]
DEFAULT_JSON = "results/baselines.json"


def _forward(model, merge):
  m = model.clone(merge=merge)
  fn = jax.jit(lambda p, x: m.apply({"params": p}, x))
  return fn, jax.jit(lambda p, x: fn(p, x)[0])


def bench_model(variant, args, images):
  name, schedule = MODELS[variant]
  model = mj.Model(1000, variant=variant, pool_type="tok", dtype_mm=args.dtype)
  if args.checkpoint:
    model, params = mj.load_model(args.checkpoint, dtype_mm=args.dtype)
  else:
    params = jax.jit(model.init)(jax.random.key(0), images[:1])["params"]
  print(f"{name} ({variant}), batch {images.shape[0]}, {args.dtype}", flush=True)
  length = (images.shape[1] // 16) * (images.shape[2] // 16) + 1
  base_fn = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])
  methods = [("baseline", base_fn, dict(setting="", final_tokens=float(length)))]

  mame_cfg = mj.MergeConfig(tau=args.tau, layers=tuple(range(8)))
  runner = mj.Runner(model.clone(merge=mame_cfg), params)
  _, aux = runner(images)
  program = runner.program(runner.schedule, images.shape)
  mame_fn = jax.jit(lambda p, x: program(p, x)[0])
  methods.append(("mame", mame_fn, dict(
      setting=f"tau={args.tau:g}",
      final_tokens=float(np.asarray(aux["tokens_per_block"])[:, -1].mean()))))

  # The same matchers as `mame-jax eval --match-gflops-of-tau` (mame_jax.eval.matching):
  # MaMe's analytic GFLOPs at the tokens it kept, ToMe's r and EViT's keep rate solved for it.
  hw = tuple(images.shape[1:3])
  target = matching.tokens_gflops(model, mame_cfg, np.asarray(aux["tokens_per_block"]), hw)
  tome = matching.tome_r_matching(model, hw, target)
  evit = matching.evit_keep_matching(model, hw, target)
  for method, merge, setting in (
      ("tome", tome, f"r={tome.r}"), ("evit", evit, f"keep={evit.keep_rate:g}"),
      ("diffrate", mj.DiffRateConfig.from_spec(schedule), schedule)):
    full, out = _forward(model, merge)
    _, maux = full(params, images)
    methods.append((method, out, dict(
        setting=setting, final_tokens=float(np.asarray(maux["tokens_per_block"])[:, -1].mean()))))

  rows = add_speedups(measure_all(methods, params, images, args.runs))
  for row in rows:
    row["model"] = name
  return rows


def section(path: str = DEFAULT_JSON) -> list[str]:
  """The BENCHMARKS.md section, rendered from the committed JSON."""
  p = pathlib.Path(path)
  if not p.exists():
    return []
  res = json.loads(p.read_text())
  return [
      "", "## Table 1's baselines at matched GFLOPs: MaMe, ToMe, EViT, DiffRate", "",
      f"`{res['command']}` -- {res['device']}, batch {res['batch']}, {res['dtype']}, "
      f"{res['date']}", "",
      weights_line("random", "randomly initialised DeiT-S / DeiT-B (no checkpoint here): "
                   "the table compares what each method costs and how much of its FLOP "
                   "cut becomes speed, not accuracy."), "",
      timing.format_table(res["rows"], COLUMNS), "",
      "ToMe's `r` and EViT's",
      "keep rate are matched to the analytic GFLOPs of the tokens MaMe kept, its merges",
      "included (`mame_jax.eval.matching`, as `mame-jax eval --match-gflops-of-tau`",
      "does): the paper's convention of counting real tokens. The `gflops_per_image`",
      "column is XLA's count of each compiled program, so MaMe's is higher than its",
      "match by the padding of its capacity buckets, a real cost of its static shapes.",
      "DiffRate runs its published schedule at the paper's Table 1 GFLOPs, which is not",
      "re-matched. CPU figures: on a GPU the ranking of the cheap methods may differ.",
  ] + _verdicts(res["rows"])


def _verdicts(rows) -> list[str]:
  """MaMe against each other method of its model, said plainly."""
  out = [""]
  for mame in (r for r in rows if r["method"] == "mame"):
    for r in rows:
      if r["model"] != mame["model"] or r["method"] in ("mame", "baseline"):
        continue
      faster = mame["images_per_s"] >= r["images_per_s"]
      out.append(
          f"- {mame['model']}: MaMe {mame['images_per_s']:.1f} img/s at "
          f"{mame['gflops_per_image']:.2f} GFLOPs vs {r['method']} ({r['setting']}) "
          f"{r['images_per_s']:.1f} img/s at {r['gflops_per_image']:.2f}: "
          + ("MaMe faster." if faster else "MaMe SLOWER (missed)."))
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variants", nargs="+", default=["S/16", "B/16"], choices=sorted(MODELS))
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--tau", type=float, default=0.9,
                      help="0.9: random weights then keep about half the FLOPs")
  parser.add_argument("--runs", type=int, default=5)
  parser.add_argument("--checkpoint", default=None)
  parser.add_argument("--quick", action="store_true", help="DeiT-S at batch 8")
  parser.add_argument("--json", default=DEFAULT_JSON)
  args = parser.parse_args(argv)
  if args.quick:
    args.variants, args.batch, args.runs = ["S/16"], 8, 3
  images = photo_batch(args.batch)
  rows = []
  for variant in args.variants:
    rows += bench_model(variant, args, images)
  print()
  print(timing.format_table(rows, COLUMNS))
  out = dict(device=timing.device_description(), date=timing.today(), batch=args.batch,
             dtype=args.dtype, rows=rows,
             command=("python -m benchmarks.baselines " + shlex.join(
                 sys.argv[1:] if argv is None else argv)).strip())
  write_json(args.json, out)
  print(f"\nsaved {args.json}")


if __name__ == "__main__":
  main()
