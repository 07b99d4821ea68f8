"""The GPU benchmark in one command: bf16 ViTs with MaMe and ToMe at the paper's FLOPs.

    python -m benchmarks.gpu                       # H100/H200: S/16, B/16, L/16 (+ SigLIP B/16 @ 512)
    python -m benchmarks.gpu --quick               # a first look (small batch, S/16)
    python -m benchmarks.gpu --quick --models S/16 --batches 4 --json results/gpu_quick_cpu.json

For each model and batch size (random weights: the cost of a given token count does
not depend on them), on one batch of real photographs (skimage), in bf16 end to end
(``dtype = dtype_mm = bfloat16``, parameters cast with ``vit.cast_params``), it
times, interleaved (``mame_jax.eval.timing.time_interleaved``: each compiled first,
then rounds calling every method in turn):

* ``baseline`` -- the plain ViT (attention: ``jax.nn.dot_product_attention``,
  cuDNN's fused kernel where it applies); on a GPU also ``baseline_xla_attn``, the
  same with XLA's attention, to show what the fused kernel brings;
* ``mame`` -- MaMe in the first 8 blocks at the paper's FLOPs. The paper gives
  ViT-B/16 8.7 GFLOPs (fvcore: a multiply-add is 1 FLOP; XLA counts 2, so ~17.4
  here) against 17.6 for the baseline, a ratio of 0.494. Random weights do not
  merge like trained ones, so the ratio is reached with *fixed* capacities: one
  capacity ``c`` for every merge layer, the one whose analytic cost ratio is
  closest to 0.494 (``mame_capacities`` / ``mame_mode`` in the JSON; overflowing
  preserved tokens are dropped, as in the paper's fixed setting). Every model gets
  the same target ratio;
* ``tome`` -- ToMe in every block with the ``r`` whose analytic cost is closest to
  MaMe's;
* ``slice`` -- MaMe's static lengths with the merge replaced by a free truncation:
  ``merge_share_of_forward = (mame - slice) / mame`` is MaMe's own share;
* ``timm`` -- when torch (with CUDA) and timm are importable: timm's
  ``vit_base_patch16_224`` in bf16 with PyTorch's fused attention (SDPA), at the
  same batch, for ViT-B/16, interleaved with ours.

Reported per row: images/s (median), IQR, XLA GFLOPs per image, measured and ideal
speedup, compile time of the program (its first call) and the number of programs
compiled, the process's peak device memory so far (``memory_stats()`` where the
backend has it). Then a compaction test for MaMe's last step: gathers
(``take_along_axis``, what ``mame`` does) against a one-hot matmul, timed on this
device. The JSON has the device, software versions and the command.

Budget: the whole run must fit in about 6 minutes on an H100/H200 including the
compiles. Configurations run most important first (B/16, S/16, L/16, SigLIP), and
once ``--budget-s`` is spent the rest are listed under ``skipped`` rather than run.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import platform
import shlex
import sys
import time

if not __package__:  # run as a file, not with -m: see benchmarks/__init__.py
  sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import jax
import jax.numpy as jnp
import numpy as np

import mame_jax as mj
from benchmarks.vit_throughput import SliceTo
from mame_jax.eval.matching import block_flops, tome_r_for_ratio
from mame_jax.eval import timing
from mame_jax.eval.data import PHOTOS, load_image
from mame_jax.merge import merged_length
from mame_jax.models import vit
from mame_jax.eval.report import write_json

# The paper's ViT-B/16 (Table 1, fvcore FLOPs): MaMe 8.7 against 17.6 for the baseline.
PAPER_GFLOPS = {"baseline": 17.6, "mame": 8.7}
TARGET_RATIO = PAPER_GFLOPS["mame"] / PAPER_GFLOPS["baseline"]
MERGE_LAYERS = tuple(range(8))

# (name, variant, image size, model kwargs); SigLIP's image tower: MAP pooling, no
# class token, no classifier.
MODELS = {
    "B/16": ("ViT-B/16", "B/16", 224, dict(num_classes=1000, pool_type="tok")),
    "S/16": ("ViT-S/16", "S/16", 224, dict(num_classes=1000, pool_type="tok")),
    "L/16": ("ViT-L/16", "L/16", 224, dict(num_classes=1000, pool_type="tok")),
    "SigLIP-B/16-512": ("SigLIP B/16 @ 512", "B/16", 512,
                        dict(num_classes=None, pool_type="map", class_token=False)),
}


@dataclasses.dataclass
class Counted:
  """A jitted function that counts its traces (one per compiled program)."""
  fn: object
  traces: int = 0

  def __post_init__(self):
    inner = self.fn

    def traced(*args):
      self.traces += 1
      return inner(*args)
    self.jitted = jax.jit(traced)

  def __call__(self, *args):
    return self.jitted(*args)


def versions() -> dict:
  out = dict(python=platform.python_version(), jax=jax.__version__)
  for name in ("jaxlib", "flax", "numpy", "torch", "timm"):
    try:
      out[name] = __import__(name).__version__
    except Exception:  # pylint: disable=broad-except  # absent: not part of this run
      out[name] = None
  try:
    backend = jax.extend.backend.get_backend() if hasattr(jax, "extend") else None
    out["platform_version"] = getattr(backend, "platform_version", None)
  except Exception:  # pylint: disable=broad-except
    out["platform_version"] = None
  return out


def device_info() -> dict:
  d = jax.devices()[0]
  return dict(description=timing.device_description(), platform=d.platform,
              kind=d.device_kind, count=len(jax.devices()))


def peak_memory_bytes():
  """The process's peak device memory so far, or None where the backend keeps no
  statistics (the CPU)."""
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  return None if not stats else stats.get("peak_bytes_in_use")


def mame_capacity(model, length, num_special, target=TARGET_RATIO):
  """The one capacity for every merge layer whose analytic cost ratio (against the
  plain model) is closest to ``target``; returns ``(capacity, ratio, lengths)``."""
  mlp = model.mlp_dim or 4 * model.width
  base = model.depth * block_flops(length, model.width, mlp)
  best = None
  for c in range((length - num_special + 1) // 2 + 1):
    n, cost, lengths = length, 0, []
    for layer in range(model.depth):
      cost += block_flops(n, model.width, mlp)
      if layer in MERGE_LAYERS:
        n = merged_length(n, num_special, min(c, (n - num_special + 1) // 2))
        lengths.append((layer, n))
    gap = abs(cost / base - target)
    if best is None or gap < best[0]:
      best = (gap, c, cost / base, tuple(lengths))
  return best[1], best[2], best[3]


def photos(batch, size):
  base = np.stack([load_image(n, size) for n in PHOTOS[:8]])
  return jnp.asarray(np.resize(base, (batch,) + base.shape[1:]))


def timm_fn(batch):
  """``(fn, args)`` timing timm's ViT-B/16 in bf16 with SDPA attention on CUDA, or
  None (and why) when torch with CUDA or timm is missing."""
  try:
    import timm  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    return None, f"not importable: {e}"
  if not torch.cuda.is_available():
    return None, "torch has no CUDA device"
  model = timm.create_model("vit_base_patch16_224", pretrained=False).cuda().eval()
  model = model.to(torch.bfloat16)
  x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.bfloat16)

  def run(x):
    with torch.inference_mode(), torch.nn.attention.sdpa_kernel(
        [torch.nn.attention.SDPBackend.FLASH_ATTENTION,
         torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION]):
      model(x)
    torch.cuda.synchronize()  # the JAX timer cannot wait on a torch tensor
  return (run, (x,)), None


def bench(key, batch, args) -> list[dict]:
  name, variant, size, kw = MODELS[key]
  dtype = "bfloat16" if not args.float32 else "float32"
  model = vit.Model(variant=variant, dtype=dtype, dtype_mm=dtype, **kw)
  images = photos(batch, size).astype(dtype)
  params = mj.models.load.random_params(model, size, seed=0)
  params = vit.cast_params(params, dtype)
  ns = model.num_special
  length = (size // 16) ** 2 + ns
  print(f"{name}, batch {batch}, {dtype}", flush=True)

  cap, ratio, lengths = mame_capacity(model, length, ns)
  mame_cfg = mj.MergeConfig(layers=MERGE_LAYERS, mode="fixed", capacities=(cap,) * 8)
  runner = mj.Runner(model.clone(merge=mame_cfg), params)
  mame_program = runner.program(None, images.shape)
  r = tome_r_for_ratio(model, length, ratio)
  plain = lambda m: (lambda p, x: m.apply({"params": p}, x)[0])
  methods = {
      "baseline": Counted(plain(model)),
      "mame": Counted(lambda p, x: mame_program(p, x)[0]),
      "slice": Counted(plain(model.clone(merge=SliceTo(lengths)))),
      "tome": Counted(plain(model.clone(merge=mj.ToMeConfig(r=r)))),
  }
  if jax.default_backend() == "gpu" and key == "B/16":
    methods["baseline_xla_attn"] = Counted(plain(model.clone(attention="xla")))
  fns = {m: (fn, (params, images)) for m, fn in methods.items()}
  timm_note = None
  if key == "B/16" and not args.no_timm:
    entry, timm_note = timm_fn(batch)
    if entry is not None:
      fns["timm"] = entry
  timings = timing.time_interleaved(fns, rounds=args.rounds, warmup=args.warmup)
  rows = []
  for m, t in timings.items():
    fn = methods.get(m)
    g = timing.gflops(fn.jitted, params, images) / batch if fn is not None else None
    rows.append(dict(
        model=name, batch=batch, dtype=dtype, method=m,
        images_per_s=batch / t.median_s, ms_per_batch=1e3 * t.median_s,
        iqr_ms=1e3 * t.iqr_s, min_ms=1e3 * t.min_s, max_ms=1e3 * t.max_s,
        gflops_per_image=g, compile_s=t.compile_s,
        programs_compiled=fn.traces if fn is not None else None,
        peak_memory_bytes=peak_memory_bytes()))
  by = {row["method"]: row for row in rows}
  base = by["baseline"]
  for row in rows:
    row["measured_speedup"] = row["images_per_s"] / base["images_per_s"]
    if row["gflops_per_image"]:
      row["ideal_speedup"] = base["gflops_per_image"] / row["gflops_per_image"]
      row["measured_over_ideal"] = row["measured_speedup"] / row["ideal_speedup"]
  by["mame"].update(mame_mode="fixed", mame_capacities=[cap] * 8, mame_layers=list(MERGE_LAYERS),
                    target_flops_ratio=TARGET_RATIO, analytic_flops_ratio=ratio,
                    lengths=[list(p) for p in lengths],
                    merge_share_of_forward=(by["mame"]["ms_per_batch"] - by["slice"]["ms_per_batch"])
                    / by["mame"]["ms_per_batch"])
  by["tome"]["r"] = r
  if timm_note:
    rows.append(dict(model=name, batch=batch, method="timm", note=timm_note))
  for row in rows:
    if "images_per_s" in row:
      print(f"  {row['method']:<18} {row['images_per_s']:9.1f} img/s  IQR {row['iqr_ms']:.2f} ms"
            f"  {row['gflops_per_image'] or float('nan'):7.2f} GFLOPs/img"
            f"  x{row['measured_speedup']:.2f} (ideal x{row.get('ideal_speedup', math.nan):.2f})"
            f"  compile {row['compile_s']:.1f}s", flush=True)
  return rows


def compaction(batch, length, width, capacity, rounds, warmup, dtype) -> dict:
  """MaMe's last step, compacting ``(B, P, D)`` tokens into ``(B, K, D)`` by an
  index ``(B, K)``: gathers (``take_along_axis``, as ``mame`` does) against a
  one-hot matmul (``one_hot(idx, P) @ pool``, which runs on the matrix units), timed
  interleaved on this device. Both give the same tokens."""
  rng = np.random.default_rng(0)
  pool = jnp.asarray(rng.normal(size=(batch, length, width)), dtype)
  out_len = length // 2 + capacity
  idx = jnp.asarray(np.sort(rng.integers(0, length, size=(batch, out_len)), -1), jnp.int32)
  gather = jax.jit(lambda x, i: jnp.take_along_axis(x, i[..., None], axis=1))
  onehot = jax.jit(lambda x, i: jnp.einsum("bkp,bpd->bkd", jax.nn.one_hot(i, x.shape[1],
                                                                        dtype=x.dtype), x))
  np.testing.assert_allclose(np.asarray(gather(pool, idx), np.float32),
                             np.asarray(onehot(pool, idx), np.float32), rtol=1e-2, atol=1e-2)
  t = timing.time_interleaved({"gather": (gather, (pool, idx)), "onehot": (onehot, (pool, idx))},
                              rounds=rounds, warmup=warmup)
  row = dict(batch=batch, length=length, width=width, out_length=out_len, dtype=str(dtype),
             gather_ms=1e3 * t["gather"].median_s, onehot_ms=1e3 * t["onehot"].median_s,
             gather_iqr_ms=1e3 * t["gather"].iqr_s, onehot_iqr_ms=1e3 * t["onehot"].iqr_s)
  row["winner"] = "gather" if row["gather_ms"] <= row["onehot_ms"] else "onehot"
  print(f"  compaction B={batch} P={length} D={width} -> K={out_len}: gather "
        f"{row['gather_ms']:.3f} ms, one-hot matmul {row['onehot_ms']:.3f} ms", flush=True)
  return row


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="a first look: S/16 at batch 8 (or --models / --batches)")
  parser.add_argument("--models", nargs="+", default=None, choices=sorted(MODELS))
  parser.add_argument("--batches", nargs="+", type=int, default=None)
  parser.add_argument("--rounds", type=int, default=None)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--budget-s", type=float, default=330.0,
                      help="stop starting new configurations after this many seconds")
  parser.add_argument("--float32", action="store_true", help="float32 instead of bf16")
  parser.add_argument("--no-timm", action="store_true")
  parser.add_argument("--json", nargs="?", const="", default=None,
                      help="write the results here (default results/gpu[_quick]_<platform>.json)")
  args = parser.parse_args(argv)
  on_gpu = jax.default_backend() == "gpu"
  if args.quick:
    models = args.models or ["S/16"]
    batches = args.batches or [8]
    args.rounds = args.rounds or 3
  else:
    models = args.models or (["B/16", "S/16", "L/16"] + (["SigLIP-B/16-512"] if on_gpu else []))
    batches = args.batches or [256, 1024]
    args.rounds = args.rounds or 5

  start = time.perf_counter()
  rows, skipped, comp = [], [], []
  configs = [(m, b) for b in batches for m in models]
  for m, b in configs:
    if time.perf_counter() - start > args.budget_s:
      skipped.append(dict(model=m, batch=b, why=f"budget of {args.budget_s:.0f} s spent"))
      continue
    try:
      rows += bench(m, b, args)
    except Exception as e:  # pylint: disable=broad-except  # e.g. out of memory: say so, go on
      skipped.append(dict(model=m, batch=b, why=f"{type(e).__name__}: {str(e)[:300]}"))
      print(f"  skipped {m} batch {b}: {type(e).__name__}: {str(e)[:300]}", flush=True)
  shapes = [(8, 197, 384)] if args.quick and not on_gpu else [(256, 197, 768), (64, 577, 768)]
  dtype = jnp.float32 if args.float32 else jnp.bfloat16
  for bsz, length, width in shapes:
    comp.append(compaction(bsz, length, width, 16, args.rounds, args.warmup, dtype))
  total = time.perf_counter() - start

  columns = ["model", "batch", "method", "images_per_s", "iqr_ms", "gflops_per_image",
             "measured_speedup", "ideal_speedup", "measured_over_ideal", "compile_s"]
  print()
  print(timing.format_table([r for r in rows if "images_per_s" in r], columns))
  print(f"\ntotal {total:.0f} s; skipped: {skipped or 'none'}")
  out = dict(device=device_info(), versions=versions(), date=timing.today(),
             command=("python -m benchmarks.gpu " + shlex.join(sys.argv[1:] if argv is None
                                                                 else argv)),
             quick=args.quick, rounds=args.rounds, warmup=args.warmup,
             target=dict(paper_gflops=PAPER_GFLOPS, ratio=TARGET_RATIO,
                         how="fixed capacities, one per merge layer, analytic cost ratio"),
             total_s=total, rows=rows, skipped=skipped, compaction=comp)
  if args.json is not None:
    path = args.json or (f"results/gpu{'_quick' if args.quick else ''}_"
                         f"{jax.devices()[0].platform}.json")
    write_json(path, out)
    print(f"saved {path}")
  return out


if __name__ == "__main__":
  main()
