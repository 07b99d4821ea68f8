"""ViT throughput with MaMe and ToMe: images/s, GFLOPs, tokens per layer.

    python -m benchmarks.vit_throughput --quick                  # ViT-S/16, batch 8 (CPU, minutes)
    python -m benchmarks.vit_throughput                          # ViT-S/16 and ViT-B/16, batch 32
    python -m benchmarks.vit_throughput --batch 256 --dtype bfloat16   # on a GPU

For each model (random weights unless ``--checkpoint``; the token counts of a
trained model differ, the cost of a given token count does not) and one batch of
real photographs (skimage.data, resized, tiled to the batch size), it times the
whole jitted forward (``mame_jax.eval.timing.time_interleaved``: compile each first,
then rounds calling every method in turn, each call ending in ``block_until_ready``;
the median per method, with its interquartile range) for:

* ``baseline`` -- the plain ViT;
* ``mame`` -- MaMe in the first 8 blocks at ``tau`` (exact mode: the capacity
  schedule is settled first by ``mame_jax.Runner``, then that one program is timed);
* ``tome`` -- ToMe in every block with the ``r`` whose XLA GFLOPs come closest
  to MaMe's (chosen by an analytic per-block cost model, then measured);
* ``slice`` -- the MaMe schedule with the merge replaced by a free truncation to
  the same lengths: ``mame - slice`` is what MaMe's own operations cost.

``ideal`` speedup = baseline GFLOPs / method GFLOPs (XLA cost analysis of the
compiled program, padding included); ``measured/ideal`` shows how much of the
token reduction turns into speed. Results are printed and saved as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import shlex
import sys

if not __package__:  # run as a file, not with -m: see benchmarks/__init__.py
  sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import jax
import jax.numpy as jnp
import numpy as np

import mame_jax as mj
from mame_jax.eval import timing
from mame_jax.eval.data import PHOTOS, load_image
from mame_jax.eval.matching import tome_r_for_ratio
from mame_jax.merge import merged_length
from mame_jax.eval.report import write_json


@dataclasses.dataclass(frozen=True)
class SliceTo:
  """A stand-in merge with no arithmetic: keeps the first ``length`` tokens at each
  merge layer (the same static shapes as a MaMe schedule)."""
  lengths: tuple  # (layer, output length) pairs

  def __call__(self, x, token_mask, size, keys, *, layer, num_special=0):
    for l, n in self.lengths:
      if l == layer:
        return x[:, :n], token_mask[:, :n], None, {}
    return x, token_mask, size, {}


def photo_batch(batch: int, size: int = 224, count: int = 6) -> jax.Array:
  """``(batch, size, size, 3)`` in [-1, 1]: the first ``count`` of the project's
  photographs (``PHOTOS``), tiled to the batch, so that merges see real images."""
  photos = np.stack([load_image(n, size) for n in PHOTOS[:count]])
  return jnp.asarray(np.resize(photos, (batch,) + photos.shape[1:]))


# Where a section's weights come from: a trained checkpoint, a random
# initialisation, or a training run of the benchmark itself.
WEIGHTS = {"real": "real", "random": "random", "trained": "trained here"}


def weights_line(kind: str, detail: str) -> str:
  """The sentence every BENCHMARKS.md section gives on its weights: ``kind`` in
  :data:`WEIGHTS`, then what that means for its figures."""
  return f"Weights: {WEIGHTS[kind]} -- {detail}"


def open_section(title: str, path, script: str):
  """``(lines, run)``: the opening of a benchmark's BENCHMARKS.md section -- its
  title, then the command, device, dtype and date of the run saved at ``path``
  (``run``, the JSON) -- or, with no file there, a line saying how to make it
  (``python -m benchmarks.<script> --quick``) and ``run = None``."""
  path = pathlib.Path(path)
  out = ["", f"## {title}", ""]
  if not path.exists():
    return out + [f"- Not measured yet: no `{path}` (run `python -m benchmarks.{script} "
                  "--quick`)."], None
  run = json.loads(path.read_text())
  device = run["device"]
  desc = device["description"] if isinstance(device, dict) else str(device)
  return out + [f"`{run['command']}` -- {desc}, {run['dtype']}, {run['date']} (`{path}`)."], run


def batch_wide_note(batch: int, inputs: str = "images", weights: str = "random") -> str:
  """Why a MaMe row merged (almost) nothing: at ``batch`` > 1 the batch-wide
  preservation mask, at batch 1 the image alone (its mask is its own); said for
  the ``weights`` ("random" or "real") the row ran. The sentence each benchmark
  section gives after the counts."""
  encoder = "this random encoder's" if weights == "random" else "the"
  if batch == 1:
    return (f"At batch 1 no other of the {inputs} can keep a token: at this tau "
            f"{encoder} tokens are too unlike each other to merge")
  why = ("and with random weights some of them keep nearly every token (a trained "
         "encoder's tokens are far more alike: not a checkpoint's figure)"
         if weights == "random" else
         "and with different pictures in the batch nearly every source is preserved in "
         "one of them (`preserve=\"sample\"` gives every image its own)")
  return ("MaMe's preservation mask is batch-wide (docs/design.md, §1): a token stays "
          f"when any of the batch's {batch} {inputs} keeps it, {why}")


def measure_all(methods, params, images, runs, warmup=2):
  """``methods = [(name, fn, extra)]`` -> one row each, timed interleaved."""
  timings = timing.time_interleaved({name: (fn, (params, images)) for name, fn, _ in methods},
                                    rounds=runs, warmup=warmup)
  rows = []
  for name, fn, extra in methods:
    t = timings[name]
    g = timing.gflops(fn, params, images) / images.shape[0]
    row = dict(method=name, images_per_s=images.shape[0] / t.median_s,
               ms_per_batch=t.median_s * 1e3, iqr_ms=t.iqr_s * 1e3, gflops_per_image=g,
               compile_s=t.compile_s, **extra)
    print(f"  {name:<9} {row['images_per_s']:8.1f} img/s  {g:7.3f} GFLOPs/img  "
          f"(median of {runs}, IQR {row['iqr_ms']:.1f} ms, compile {t.compile_s:.1f}s)",
          flush=True)
    rows.append(row)
  return rows


def command_line(script: str, argv=None) -> str:
  """The command a run of ``benchmarks/<script>.py`` records beside its figures:
  ``python -m benchmarks.<script>`` and its arguments (``argv``, default the
  process's)."""
  args = shlex.join(sys.argv[1:] if argv is None else argv)
  return f"python -m benchmarks.{script} {args}".strip()


def add_speedups(rows) -> list:
  """Each row's ``measured_speedup`` (images/s) and ``ideal_speedup`` (GFLOPs per
  image of the program that runs) against ``rows[0]``, the baseline, and their
  ratio ``measured_over_ideal``; returns ``rows``."""
  base = rows[0]
  for row in rows:
    row["measured_speedup"] = row["images_per_s"] / base["images_per_s"]
    row["ideal_speedup"] = base["gflops_per_image"] / row["gflops_per_image"]
    row["measured_over_ideal"] = row["measured_speedup"] / row["ideal_speedup"]
  return rows


def bench_model(variant, args, images):
  dtype = args.dtype
  model = mj.Model(1000, variant=variant, pool_type="tok", dtype_mm=dtype)
  if args.checkpoint:
    model, params = mj.load_model(args.checkpoint, dtype_mm=dtype)
  else:
    params = jax.jit(model.init)(jax.random.key(0), images[:1])["params"]
  print(f"ViT-{variant}, batch {images.shape[0]}, {dtype}", flush=True)
  methods = []
  base_fn = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])
  base_gflops = timing.gflops(base_fn, params, images) / images.shape[0]
  methods.append(("baseline", base_fn,
                  dict(tokens_per_layer=[float(images.shape[1] // 16) ** 2 + 1] * model.depth)))

  layers = tuple(range(min(8, model.depth)))
  runner = mj.Runner(model.clone(merge=mj.MergeConfig(tau=args.tau, layers=layers)), params)
  _, aux = runner(images)
  tokens = np.asarray(aux["tokens_per_block"]).mean(0).round(1).tolist()
  mame_fn = runner.program(runner.schedule, images.shape)
  mame_out = jax.jit(lambda p, x: mame_fn(p, x)[0])
  mame_gflops = timing.gflops(mame_out, params, images) / images.shape[0]
  methods.append(("mame", mame_out,
                  dict(tau=args.tau, capacities=list(runner.schedule), tokens_per_layer=tokens,
                       reruns=runner.reruns)))

  lengths, n = [], images.shape[1] // 16 * (images.shape[2] // 16) + 1
  cfg = runner.cfg.replace(capacities=runner.schedule)
  for l in layers:
    n = merged_length(n, 1, cfg.capacity(l, n, 1))
    lengths.append((l, n))
  slice_model = model.clone(merge=SliceTo(tuple(lengths)))
  slice_fn = jax.jit(lambda p, x: slice_model.apply({"params": p}, x)[0])
  methods.append(("slice", slice_fn, dict(lengths=lengths)))

  length = images.shape[1] // 16 * (images.shape[2] // 16) + 1
  r = tome_r_for_ratio(model, length, base_gflops and mame_gflops / base_gflops)
  tome_model = model.clone(merge=mj.ToMeConfig(r=r))
  tome_fn = jax.jit(lambda p, x: tome_model.apply({"params": p}, x))
  _, taux = tome_fn(params, images)
  methods.append(("tome", jax.jit(lambda p, x: tome_fn(p, x)[0]),
                  dict(r=r, tokens_per_layer=np.asarray(taux["tokens_per_block"]).mean(0)
                       .round(1).tolist())))

  rows = add_speedups(measure_all(methods, params, images, args.runs))
  mame_row = rows[1]
  for row in rows:
    row["model"] = f"ViT-{variant}"
  slice_ms, mame_ms = rows[2]["ms_per_batch"], mame_row["ms_per_batch"]
  # Negative when MaMe ran faster than the free stand-in: below run-to-run noise.
  mame_row["merge_share_of_forward"] = (mame_ms - slice_ms) / mame_ms
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variants", nargs="+", default=["S/16", "B/16"])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--tau", type=float, default=0.9,
                      help="0.9: random weights then keep ~half the FLOPs, like a trained model at 0.8")
  parser.add_argument("--runs", type=int, default=5)
  parser.add_argument("--checkpoint", default=None)
  parser.add_argument("--quick", action="store_true", help="ViT-S/16 at batch 8")
  parser.add_argument("--json", default="results/vit_throughput.json")
  args = parser.parse_args(argv)
  if args.quick:
    args.variants, args.batch, args.runs = ["S/16"], 8, 3

  images = photo_batch(args.batch)
  rows = []
  for variant in args.variants:
    rows += bench_model(variant, args, images)
  columns = ["model", "method", "tau", "r", "images_per_s", "gflops_per_image", "measured_speedup",
             "ideal_speedup", "measured_over_ideal", "merge_share_of_forward"]
  print()
  print(timing.format_table(rows, columns))
  for row in rows:
    if "tokens_per_layer" in row:
      print(f"{row['model']} {row['method']:<9} tokens per block: {row['tokens_per_layer']}")
  out = dict(device=timing.device_description(), date=timing.today(), batch=args.batch,
             dtype=args.dtype, command=("python -m benchmarks.vit_throughput " + shlex.join(
                 sys.argv[1:] if argv is None else argv)).strip(), rows=rows)
  write_json(args.json, out)
  print(f"\nsaved {args.json}")


if __name__ == "__main__":
  main()
