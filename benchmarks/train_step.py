"""Training step time and memory: ViT-S/16, baseline vs MaMe vs last-block MaMe vs ToMe.

    python -m benchmarks.train_step --quick --json results/train_step_cpu.json  # CPU, batch 8
    python -m benchmarks.train_step --batch 256 --dtype bfloat16 --json results/train_step_gpu.json

Each row is one jitted training step of ``mame_jax.train.loop.make_step``
(forward, backward through the merge, AdamW update) on random weights and a
fixed batch, built from ``configs/train.py:merge=METHOD`` as ``train.py``
builds it. Timings follow ``mame_jax.eval.timing.time_fn`` (compile apart,
median of the timed calls). ``temp_mb``: XLA's scratch memory of the compiled
step (``memory_analysis``), ``peak_mb``: the device's peak so far where the
backend records one (GPUs; the CPU keeps none).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import sys
import time

if not __package__:  # run as a file, not with -m: see benchmarks/__init__.py
  sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.gpu import device_info, peak_memory_bytes, versions
from benchmarks.vit_throughput import weights_line
from mame_jax.eval import timing
from mame_jax.eval.methods import describe_merge
from mame_jax.eval.report import write_json
from mame_jax.models.merging import MergeConfig
from mame_jax.train import loop, optim

METHODS = ("none", "mame", "mame_last", "tome")
COLUMNS = ["method", "merge", "step_ms", "iqr_ms", "images_per_s", "speedup", "temp_mb",
           "peak_mb", "compile_s", "mean_tokens"]


def merge_name(merge) -> str:
  """``MaMe(tau=0.5)@2,5,8`` / ``ToMe(r=19)`` / ``baseline``."""
  name = describe_merge(merge).name
  return f"{name}@{','.join(map(str, merge.layers))}" if isinstance(merge, MergeConfig) else name


def bench(method, args):
  import train  # pylint: disable=import-outside-toplevel
  config, _ = train.parse(["--config", f"configs/train.py:variant={args.variant},"
                           f"merge={method},image_size={args.image_size}", "--workdir", "-",
                           f"--config.model.dtype={args.dtype}"])
  model, params = loop.build_model(config)
  tx, schedule = optim.optimizer(lr=1.0, total_steps=1000, warmup_steps=10, wd=0.05)
  state = jax.jit(lambda p: loop.init_state(p, tx, 0, 1e-3))(params)
  step = jax.jit(loop.make_step(model, tx, schedule, num_classes=1000, label_smoothing=0.1))
  rs = np.random.RandomState(0)
  images = jnp.asarray(rs.uniform(-1, 1, (args.batch, args.image_size, args.image_size, 3)),
                       jnp.float32)
  labels = jnp.asarray(rs.randint(0, 1000, args.batch), jnp.int32)
  start = time.perf_counter()
  compiled = step.lower(state, images, labels).compile()
  compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()
  t = timing.time_fn(compiled, state, images, labels, warmup=args.warmup, runs=args.runs)
  _, metrics = step(state, images, labels)
  peak = peak_memory_bytes()
  return dict(method=method, merge=merge_name(model.merge),
              step_ms=t.median_ms, iqr_ms=1e3 * t.iqr_s,
              images_per_s=t.throughput(args.batch),
              temp_mb=getattr(mem, "temp_size_in_bytes", 0) / 2**20 if mem else None,
              peak_mb=peak / 2**20 if peak else None, compile_s=compile_s,
              tokens=[float(v) for v in metrics["tokens"]],
              mean_tokens=float(np.mean(metrics["tokens"])))


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="CPU settings: batch 8, 3 runs")
  parser.add_argument("--variant", default="S/16")
  parser.add_argument("--batch", type=int, default=None)
  parser.add_argument("--image-size", type=int, default=224)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--runs", type=int, default=None)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  args.batch = args.batch or (8 if args.quick else 256)
  args.runs = args.runs or (3 if args.quick else 10)
  start = time.perf_counter()
  rows = []
  for method in args.methods:
    rows.append(bench(method, args))
    print(f"{method}: {rows[-1]['step_ms']:.0f} ms/step", flush=True)
  base = next((r for r in rows if r["method"] == "none"), rows[0])
  for r in rows:
    r["speedup"] = base["step_ms"] / r["step_ms"]
  print(timing.format_table(rows, COLUMNS))
  out = dict(command="python -m benchmarks.train_step " + shlex.join(argv),
             device=device_info(), versions=versions(), date=timing.today(),
             variant=args.variant, batch=args.batch, image_size=args.image_size,
             dtype=args.dtype, runs=args.runs, total_s=time.perf_counter() - start,
             rows=rows)
  if args.json:
    write_json(args.json, out)
    print(f"wrote {args.json}")
  return out


def section() -> list[str]:
  """The BENCHMARKS.md section: every ``results/train_step*.json``, each with
  its command, device and date."""
  files = sorted(pathlib.Path("results").glob("train_step*.json"))
  out = ["", "## Training step: `python -m benchmarks.train_step`", "",
         "One jitted training step (forward, backward through the merge, AdamW) of a",
         "randomly initialised ViT per `configs/train.py` setting: `none`, `mame` (blocks",
         "3/6/9 counted from 1, tau 0.5, 2:1), `mame_last` (last block), `tome` (r matched",
         "to MaMe's token count). `speedup` = baseline step time / the row's.", "",
         weights_line("random", "a randomly initialised ViT: a training step costs the "
                      "same whatever the weights, and the merge's token counts are "
                      "fixed by the settings (2:1)."), ""]
  if not files:
    return out + ["- Not run yet."]
  on_gpu = False
  for path in files:
    run = json.loads(path.read_text())
    on_gpu |= run["device"]["platform"] == "gpu"
    note = (" A CPU shared with other processes: read the ratios, not the milliseconds; "
            "the CPU keeps no peak-memory statistics (`temp_mb` is XLA's scratch)."
            if run["device"]["platform"] == "cpu" else "")
    out += [f"`{run['command']}` -- {run['device']['description']}, ViT-{run['variant']}, "
            f"batch {run['batch']}, {run['dtype']}, {run['date']} (`{path}`).{note}", "",
            timing.format_table(run["rows"], COLUMNS), ""]
  if not on_gpu:
    out.append("- No GPU figure yet (batch >= 256, bf16): "
               "`python -m benchmarks.train_step --batch 256 --dtype bfloat16 --json "
               "results/train_step_gpu.json` on a GPU.")
  return out


if __name__ == "__main__":
  main()
