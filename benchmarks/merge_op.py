"""Cost of the merge op itself: jitted ``mame`` beside one self-attention layer.

    python -m benchmarks.merge_op --quick          # < 3 min on a 2-core CPU
    python -m benchmarks.merge_op                  # B {1,32} x L {197,577,1025,4097} x D {384,768}
    python -m benchmarks.merge_op --dtype bfloat16 --out-md results/merge_op.md

For every (B, L, D) it times (``mame_jax.eval.timing.time_fn``: one compiling call,
warm-up, median of the timed calls) two jitted functions on the same tokens
``x (B, L, D)`` in the same dtype:

* ``mame(x, tau=0.8, num_special=1, capacity=c)``, the whole op as the API gives
  it (merged tokens and the merge record), with ``c`` the smallest linear bucket
  (step 16) that holds this input's ``r`` preserved tokens, so nothing is dropped;
* one multi-head self-attention of the same size: ``mame_jax.models.vit``'s
  ``MultiHeadDotProductAttention`` with ``D // 64`` heads -- the q/k/v/out
  projections, ``softmax(q k^T / sqrt(64)) v`` with float32 logits, exactly the
  layer the ViT runs -- on the *unmerged* ``x``.

``mame/attn`` is their ratio: the price of merging in units of one attention
layer. GFLOPs come from XLA's cost analysis (``mame_jax.eval.timing.gflops``).

The tokens are clustered so that merging has work to do: a few cluster centres
per sample, each token a centre plus noise (cosine ~0.9 to its cluster, far above
tau), except a fraction ``--outliers`` of positions holding unrelated random
vectors, which have nothing to merge with and are preserved. The positions of
the clusters and outliers are the same for every sample, so ``r`` (batch-wide,
Sec. 3.3) does not grow with B and every B times the same capacity.

Then the compilation count (docs/design.md, §3 Static shapes): 40 inputs (24
with ``--quick``) whose outlier fraction is drawn from ``--sweep-outliers`` (so each has its own ``r``)
go through a jitted ``mame`` whose capacity is static, once with
``capacity = bucket_for(r, linear buckets of step 16)`` and once with
``capacity = r`` exactly; ``TraceCounter`` counts the programs compiled. ``r``
itself is read from a probe at full capacity (compiled once, not counted).

A case whose estimated working memory exceeds the device's is skipped and the
table says so; nothing is left out silently. The ViT keeps its residual stream
in float32 whatever its matmul dtype; here ``--dtype`` sets the dtype of ``x``
for both functions (``mame`` computes in float32 internally either way).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import pathlib
import shlex
import sys
import time

if not __package__:  # run as a file, not with -m: see benchmarks/__init__.py
  sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import jax
import jax.numpy as jnp
import numpy as np

from mame_jax import mame
from mame_jax.buckets import TraceCounter, bucket_for, linear_buckets
from mame_jax.merge import num_sources
from mame_jax.eval.timing import device_description, format_table, gflops, time_fn, today
from mame_jax.models.vit import MultiHeadDotProductAttention
from mame_jax.eval.report import write_json

TAU = 0.8
NUM_SPECIAL = 1
HEAD_DIM = 64
BUCKET_STEP = 16
NUM_CLUSTERS = 8
NOISE = 0.3  # cosine between two tokens of one cluster ~ 1 / (1 + NOISE**2) ~ 0.92

FULL = dict(batch=(1, 32), length=(197, 577, 1025, 4097), width=(384, 768))
QUICK = dict(batch=(1, 32), length=(197, 577), width=(384,))
SWEEP_SHAPE = (8, 577, 384)  # (B, L, D) of the compilation sweep
SWEEP_INPUTS = 40  # 24 with --quick: every exact-r compile costs ~2 s on a 2-core CPU

COLUMNS = ["B", "L", "D", "r", "capacity", "mame_ms", "attention_ms", "mame/attn",
           "GFLOPs mame", "GFLOPs attn", "note"]


def clustered_tokens(key, batch, length, width, outliers, dtype=jnp.float32):
  """(B, L, D) tokens in NUM_CLUSTERS clusters plus a fraction ``outliers`` of
  unrelated positions; which position is in which cluster (or an outlier) is the
  same for every sample, the centres and the noise are not."""
  k_assign, k_out, k_centre, k_noise, k_free = jax.random.split(key, 5)
  assign = jax.random.randint(k_assign, (length,), 0, NUM_CLUSTERS)
  is_outlier = jax.random.permutation(k_out, length) < round(outliers * length)
  centres = jax.random.normal(k_centre, (batch, NUM_CLUSTERS, width))
  clustered = centres[:, assign] + NOISE * jax.random.normal(k_noise, (batch, length, width))
  free = jax.random.normal(k_free, (batch, length, width))
  return jnp.where(is_outlier[None, :, None], free, clustered).astype(dtype)


def preserved_count(x) -> int:
  """r for ``x``, from the op at full capacity (which never drops anything)."""
  return int(_probe(num_sources(x.shape[1], NUM_SPECIAL))(x))


@functools.cache
def _probe(capacity):
  merge = lambda x: mame(x, TAU, num_special=NUM_SPECIAL, capacity=capacity)
  return jax.jit(lambda x: merge(x)[1].num_preserved)


def memory_budget_bytes() -> float:
  """What one case may use: 80% of the accelerator's memory, or 70% of the host
  memory available now on CPU."""
  stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
  if stats and stats.get("bytes_limit"):
    return 0.8 * stats["bytes_limit"]
  try:
    with open("/proc/meminfo") as f:
      info = {line.split(":")[0]: line.split()[1] for line in f}
    return 0.7 * int(info["MemAvailable"]) * 1024
  except (OSError, KeyError, ValueError):
    return 0.7 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def attention_bytes(b, l, d, itemsize) -> int:
  """Rough peak of the attention: float32 logits and their softmax, plus the
  weights cast to the matmul dtype when that is not float32, all (B, heads, L, L)."""
  return b * (d // HEAD_DIM) * l * l * (4 + 4 + (itemsize if itemsize != 4 else 0))


def mame_bytes(b, l, d) -> int:
  """Rough peak of the merge: a handful of float32 (B, M, N) matrices (eqs. 2-8)."""
  m = (l - NUM_SPECIAL) // 2
  return 8 * b * m * (m + 1) * 4 + 4 * b * l * d * 4


def attention_layer(x):
  """One ViT self-attention layer for ``x`` (B, L, D): ``(jitted fn, params)``."""
  module = MultiHeadDotProductAttention(num_heads=x.shape[-1] // HEAD_DIM, dtype_mm=x.dtype)
  params = jax.jit(module.init)(jax.random.key(1), x[:1, :8], x[:1, :8])
  return jax.jit(lambda p, x: module.apply(p, x, x)[0]), params


def bench_case(b, l, d, dtype, outliers, warmup, runs, budget):
  """One row of the table: ``mame`` and attention timed on the same ``x (b, l, d)``."""
  row = {"B": b, "L": l, "D": d}
  x = clustered_tokens(jax.random.key(l * 1000 + d), b, l, d, outliers, dtype)
  if mame_bytes(b, l, d) > budget:
    row["note"] = _too_big("mame", mame_bytes(b, l, d), budget)
    return row
  try:
    n = num_sources(l, NUM_SPECIAL)
    r = preserved_count(x)
    c = bucket_for(r, linear_buckets(n, BUCKET_STEP))
    merge = jax.jit(lambda x: mame(x, TAU, num_special=NUM_SPECIAL, capacity=c))
    t_mame = time_fn(merge, x, warmup=warmup, runs=runs)
    _, info = merge(x)
    if bool(info.overflow):  # c >= r by construction: this would be a bug in mame
      raise RuntimeError(f"mame overflowed at capacity {c} >= r = {r}")
    row.update(r=r, capacity=c, mame_ms=t_mame.median_ms, **{"GFLOPs mame": gflops(merge, x)},
               tokens_out=int(info.token_mask.sum(-1).max()), mame_timing=t_mame.to_dict())
  except Exception as e:  # pylint: disable=broad-except
    if not _out_of_memory(e):
      raise
    row["note"] = "mame failed: out of device memory"
    return row

  need = attention_bytes(b, l, d, jnp.dtype(dtype).itemsize)
  if need > budget:
    row["note"] = _too_big("attention", need, budget)
    return row
  try:
    attn, params = attention_layer(x)
    t_attn = time_fn(attn, params, x, warmup=warmup, runs=runs)
    row.update(attention_ms=t_attn.median_ms, **{"GFLOPs attn": gflops(attn, params, x)},
               attention_timing=t_attn.to_dict())
    row["mame/attn"] = t_mame.median_s / t_attn.median_s
  except Exception as e:  # pylint: disable=broad-except
    if not _out_of_memory(e):
      raise
    row["note"] = "attention failed: out of device memory"
  return row


def _too_big(what, need, budget):
  return f"{what} skipped: needs ~{need / 2**30:.1f} GiB > {budget / 2**30:.1f} GiB budget"


def _out_of_memory(e: Exception) -> bool:
  return "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


def compilation_sweep(dtype, outlier_range, inputs=SWEEP_INPUTS, shape=SWEEP_SHAPE):
  """Compiled programs for ``inputs`` different r, bucketed vs exact capacity."""
  b, l, d = shape
  n = num_sources(l, NUM_SPECIAL)
  buckets = linear_buckets(n, BUCKET_STEP)
  fractions = np.random.default_rng(0).uniform(*outlier_range, size=inputs)
  xs = [clustered_tokens(jax.random.key(i), b, l, d, float(f), dtype)
        for i, f in enumerate(fractions)]
  rs = [preserved_count(x) for x in xs]

  result = {"B": b, "L": l, "D": d, "inputs": inputs, "outliers": list(outlier_range),
            "r_min": min(rs), "r_max": max(rs), "distinct_r": len(set(rs)),
            "buckets": list(buckets)}
  for mode, capacity_of in (("bucketed", lambda r: bucket_for(r, buckets)),
                            ("exact", lambda r: r)):
    counter = TraceCounter()
    merge = jax.jit(counter(lambda x, capacity: mame(x, TAU, num_special=NUM_SPECIAL,
                                                     capacity=capacity)[0]),
                    static_argnames="capacity")
    start = time.perf_counter()
    for x, r in zip(xs, rs):
      jax.block_until_ready(merge(x, capacity=capacity_of(r)))
    result[mode] = {"compilations": counter.count,
                    "seconds": time.perf_counter() - start,
                    "mean_padding": float(np.mean([capacity_of(r) - r for r in rs]))}
  return result


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help=f"only B {QUICK['batch']}, L {QUICK['length']}, D {QUICK['width']}")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--json", default="results/merge_op.json", help="where to save results")
  parser.add_argument("--out-md", default=None, help="also write the table as markdown here")
  parser.add_argument("--outliers", type=float, default=0.25,
                      help="fraction of unmergeable tokens in the timed inputs")
  parser.add_argument("--sweep-outliers", type=float, nargs=2, default=(0.15, 0.35),
                      metavar=("LOW", "HIGH"), help="outlier fraction range of the sweep")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--runs", type=int, default=7)
  args = parser.parse_args(argv)

  grid = QUICK if args.quick else FULL
  dtype = jnp.dtype(args.dtype)
  budget = memory_budget_bytes()
  print(f"# merge op vs attention -- {device_description()}, {args.dtype}, {today()}")
  print(f"# tau={TAU}, num_special={NUM_SPECIAL}, heads=D//{HEAD_DIM}, "
        f"warmup={args.warmup}, runs={args.runs} (median), "
        f"memory budget {budget / 2**30:.1f} GiB", flush=True)

  rows = []
  for d in grid["width"]:
    for l in grid["length"]:
      for b in grid["batch"]:
        row = bench_case(b, l, d, dtype, args.outliers, args.warmup, args.runs, budget)
        rows.append(row)
        print(f"B={b} L={l} D={d}: r={row.get('r')} mame {row.get('mame_ms', math.nan):.4g} ms, "
              f"attention {row.get('attention_ms', math.nan):.4g} ms {row.get('note', '')}",
              flush=True)

  sweep = compilation_sweep(dtype, args.sweep_outliers, 24 if args.quick else SWEEP_INPUTS)
  table = format_table(rows, COLUMNS)
  b, l, d = SWEEP_SHAPE
  sweep_text = (
      f"Compilations over {sweep['inputs']} inputs (B={b}, L={l}, D={d}; "
      f"r from {sweep['r_min']} to {sweep['r_max']}, {sweep['distinct_r']} distinct):\n"
      + format_table([{"capacity": "bucketed (linear, step 16)", **sweep["bucketed"]},
                      {"capacity": "exact r", **sweep["exact"]}],
                     ["capacity", "compilations", "seconds", "mean_padding"]))
  print()
  print(table)
  print()
  print(sweep_text)

  command = "python -m benchmarks.merge_op " + shlex.join(sys.argv[1:] if argv is None
                                                         else list(argv))
  record = {"benchmark": "merge_op", "command": command.strip(), "date": today(),
            "device": device_description(), "jax_version": jax.__version__,
            "backend": jax.default_backend(), "dtype": args.dtype, "tau": TAU,
            "num_special": NUM_SPECIAL, "head_dim": HEAD_DIM, "bucket_step": BUCKET_STEP,
            "outliers": args.outliers, "warmup": args.warmup, "runs": args.runs,
            "memory_budget_bytes": budget, "rows": rows, "compilations": sweep}
  write_json(args.json, record)
  print(f"\nsaved {args.json}")
  if args.out_md:
    md = pathlib.Path(args.out_md)
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(f"`python {command}` -- {device_description()}, {args.dtype}, {today()}\n\n"
                  f"{table}\n\n{sweep_text}\n")
    print(f"saved {md}")


if __name__ == "__main__":
  main()
