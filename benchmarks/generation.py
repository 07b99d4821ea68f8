"""Per-step latency of a stack of generation blocks: baseline, MaMe + MaRe, ToMe-SD.

    python -m benchmarks.generation --quick --json results/generation_cpu.json   # CPU, ~2 min
    python -m benchmarks.generation --json results/generation_gpu.json           # a GPU
    python -m benchmarks.generation --tokens 64 --width 32 --rounds 1 --json /tmp/g.json

One step is one forward of ``mame_jax.models.dit_blocks.GenerationStack`` (eqs.
17-18: ``x = x + MaRe(MSA(MaMe(LN(x)))); x = x + MLP(LN(x))``), random weights,
head width 64, MLP width 4 x D, merging in every block, float32 unless
``--dtype``. Per token count L (1024, 4096, 9216: the 32², 64² and 96² latent
grids of 256², 512² and 768² Stable Diffusion images) and width D, the methods:

* ``baseline`` -- the plain stack (``merge=None``);
* ``mame_exact`` -- MaMe + MaRe at ``tau`` (``--taus``, 0.7 and 0.8) in exact
  mode: ``mame_jax.generation.run_exact``, started from the smallest bucket,
  grows bucketed capacities (step 16) until no block drops a preserved token,
  so each block ends at the tightest bucket holding its preserved tokens; the
  program at the capacities it found is timed;
* ``mame_fixed`` -- MaMe + MaRe at ``--fixed-tau`` (0.8) with fixed capacities
  (``mode="fixed"``) chosen so that each block attends ``(1 - p) L`` tokens for
  ``p`` in ``--removes`` (0.25, 0.5); preserved tokens beyond the capacity are
  dropped (their count is in the row);
* ``tome_sd`` -- ToMe-SD (``mame_jax.tome_sd.ToMeSDConfig``, 2 x 2 windows, random
  destinations) merging ``int(ratio L)`` tokens, ``ratio`` in ``--ratios``.

The tokens: how many tokens merge at a given tau depends on their content, so
they carry the structure of real photographs. Each sample is one of
``mame_jax.eval.data.PHOTOS`` (``load_image(name, 8 * side)``, ``side = sqrt(L)``)
cut into non-overlapping 8 x 8 x 3 patches -- one per latent position, as the
Stable Diffusion VAE downsamples by 8 -- flattened (192 values in [-1, 1]) and
projected to D by one fixed Gaussian matrix (seed 0, entries N(0, 1/192)). The
JSON says so under ``tokens``.

Timing: ``mame_jax.eval.timing.time_interleaved`` over all methods of one (L, D)
in this one process (each compiled first, then interleaved rounds; medians and
interquartile ranges). GFLOPs: XLA's cost analysis of the same programs
(``timing.gflops``). ``measured_speedup`` is baseline / method latency,
``ideal_speedup`` baseline / method GFLOPs. ``tokens_attended`` is the mean
static length the blocks' attention runs on (what the compute pays for);
``tokens_real`` the mean number of real (unpadded) tokens among them.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import shlex
import sys
import time

if not __package__:  # run as a file, not with -m: see benchmarks/__init__.py
  sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.gpu import device_info, versions
from mame_jax import generation
from mame_jax.eval import timing
from mame_jax.eval.data import PHOTOS, load_image
from mame_jax.merge import num_sources
from mame_jax.models.dit_blocks import GenerationStack
from mame_jax.models.merging import MergeConfig, merge_records
from mame_jax.tome_sd import ToMeSDConfig, num_to_merge
from mame_jax.eval.report import write_json

HEAD_DIM = 64
PATCH = 8  # the Stable Diffusion VAE's downsampling factor
NUM_SPECIAL = 0  # a diffusion model's latent tokens have no class token
FULL = dict(tokens=(1024, 4096, 9216), width=(320, 640), depth=4, rounds=7)
QUICK = dict(tokens=(1024, 4096), width=(320,), depth=2, rounds=3)
COLUMNS = ["L", "D", "method", "setting", "tokens_attended", "tokens_real", "latency_ms",
           "iqr_ms", "gflops", "measured_speedup", "ideal_speedup", "dropped"]


def photo_tokens(batch: int, length: int, width: int, seed: int = 0) -> np.ndarray:
  """(batch, length, width) float32: photographs cut into 8 x 8 patches on a
  ``sqrt(length)`` grid, projected to ``width`` by a fixed random matrix."""
  side = math.isqrt(length)
  if side * side != length:
    raise ValueError(f"--tokens must be square numbers (a latent grid); got {length}")
  images = np.stack([load_image(PHOTOS[i % len(PHOTOS)], PATCH * side) for i in range(batch)])
  patches = images.reshape(batch, side, PATCH, side, PATCH, 3).transpose(0, 1, 3, 2, 4, 5)
  patches = patches.reshape(batch, length, PATCH * PATCH * 3)
  proj = np.random.default_rng(seed).normal(size=(patches.shape[-1], width))
  return (patches @ (proj / math.sqrt(patches.shape[-1]))).astype(np.float32)


def fixed_capacity(length: int, remove: float) -> int:
  """The capacity that leaves ``(1 - remove) L`` tokens: ``s + M + c`` of them,
  ``M = L - s - N`` destinations, at most all ``N`` sources."""
  n = num_sources(length, NUM_SPECIAL)
  dst = length - NUM_SPECIAL - n
  return int(min(n, max(0, round((1 - remove) * length) - NUM_SPECIAL - dst)))


def make_program(stack: GenerationStack):
  """A jitted step: ``(params, x) -> (out, tokens_per_block (B, depth), stats)``,
  ``stats`` what exact mode reads (``generation.summary``)."""
  def step(params, x):
    out, aux = stack.apply({"params": params}, x)
    stats = generation.summary(stack.merge, aux)
    attended = jnp.asarray([_static_length(rec, x.shape[1]) for rec in merge_records(aux)])
    return out, aux["tokens_per_block"], attended, stats
  return jax.jit(step)


def _static_length(record: dict, length: int) -> int:
  """The length block attention ran on (static): the merged tokens, padding included."""
  if "info" in record:
    return record["info"].token_mask.shape[1]
  if "record" in record:
    return record["record"].num_out
  return length


def bench_shape(length: int, width: int, args, log) -> list[dict]:
  depth = args.depth
  heads = max(1, width // HEAD_DIM)
  layers = tuple(range(depth))
  x = jnp.asarray(photo_tokens(args.batch, length, width), args.dtype)

  def stack(merge=None):
    return GenerationStack(depth=depth, num_heads=heads, mlp_dim=4 * width, merge=merge,
                           num_special=NUM_SPECIAL, dtype_mm=args.dtype)

  params = stack().init(jax.random.key(0), x[:1])["params"]
  # name -> (method, setting, jitted step, capacities)
  methods = {"baseline": ("baseline", "", make_program(stack()), None)}
  for tau in args.taus:
    cfg = MergeConfig(tau=tau, layers=layers, mode="exact")
    programs = {}

    def step(caps, cfg=cfg, programs=programs):
      if caps not in programs:
        programs[caps] = make_program(stack(cfg.replace(capacities=caps)))
      _, _, _, stats = programs[caps](params, x)
      return None, jax.device_get(stats)

    start = time.perf_counter()
    if cfg.active:
      # From the smallest bucket up, so every block ends at the tightest bucket that
      # holds its preserved tokens (run_exact only grows).
      first = generation.layer_buckets(cfg, length, NUM_SPECIAL)[0]
      _, _, caps = generation.run_exact(step, cfg, length, NUM_SPECIAL, (first,) * depth)
    else:  # tau >= 1: nothing merges, the blocks skip MaMe
      caps = None
    log(f"  L={length} D={width} tau={tau}: exact capacities {caps} "
        f"({len(programs)} programs, {time.perf_counter() - start:.1f} s)")
    # The program run_exact compiled last is the one to time (no second compile).
    program = programs.get(caps) or make_program(stack(cfg.replace(capacities=caps)))
    methods[f"mame_exact_tau{tau}"] = ("mame_exact", f"tau={tau} capacities={caps}",
                                       program, caps)
  for remove in args.removes:
    c = fixed_capacity(length, remove)
    cfg = MergeConfig(tau=args.fixed_tau, layers=layers, mode="fixed",
                      capacities=(c,) * depth)
    methods[f"mame_fixed_{remove}"] = ("mame_fixed", f"tau={args.fixed_tau} remove={remove} "
                                       f"capacity={c}", make_program(stack(cfg)), (c,) * depth)
  for ratio in args.ratios:
    methods[f"tome_sd_{ratio}"] = ("tome_sd", f"ratio={ratio} r={num_to_merge(length, ratio)}",
                                   make_program(stack(ToMeSDConfig(ratio=ratio))), None)

  fns = {name: (m[2], (params, x)) for name, m in methods.items()}
  times = timing.time_interleaved(fns, rounds=args.rounds, warmup=args.warmup)
  rows = []
  for name, (method, setting, _, caps) in methods.items():
    fn, fargs = fns[name]
    _, real, attended, stats = jax.device_get(fn(*fargs))
    t = times[name]
    row = dict(L=length, D=width, depth=depth, batch=args.batch, heads=heads, method=method,
               setting=setting, capacities=None if caps is None else list(caps),
               tokens_input=length, tokens_attended=float(np.mean(attended)),
               tokens_real=float(np.mean(real)),
               tokens_per_block=np.asarray(real).mean(0).tolist(),
               latency_ms=t.median_ms, iqr_ms=1e3 * t.iqr_s, compile_s=t.compile_s,
               gflops=timing.gflops(fn, *fargs),
               dropped=int(np.asarray(stats["dropped"]).sum()) if stats else 0)
    rows.append(row)
  base = rows[0]
  for row in rows:
    row["measured_speedup"] = base["latency_ms"] / row["latency_ms"]
    row["ideal_speedup"] = base["gflops"] / row["gflops"]
  return rows


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help=f"CPU settings: tokens {QUICK['tokens']}, width {QUICK['width']}, "
                           f"depth {QUICK['depth']}")
  parser.add_argument("--tokens", nargs="+", type=int, default=None,
                      help="sequence lengths (square: latent grids)")
  parser.add_argument("--width", nargs="+", type=int, default=None)
  parser.add_argument("--depth", type=int, default=None)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--taus", nargs="+", type=float, default=[0.7, 0.8])
  parser.add_argument("--fixed-tau", type=float, default=0.8)
  parser.add_argument("--removes", nargs="+", type=float, default=[0.25, 0.5],
                      help="fractions of the tokens the fixed capacities remove")
  parser.add_argument("--ratios", nargs="+", type=float, default=[0.25, 0.5],
                      help="ToMe-SD merge ratios")
  parser.add_argument("--rounds", type=int, default=None)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--json", default=None, help="write the results here")
  args = parser.parse_args(argv)
  preset = QUICK if args.quick else FULL
  args.tokens = args.tokens or list(preset["tokens"])
  args.width = args.width or list(preset["width"])
  args.depth = args.depth or preset["depth"]
  args.rounds = args.rounds or preset["rounds"]
  for name in ("removes", "ratios"):
    if any(not 0 <= v < 1 for v in getattr(args, name)):
      parser.error(f"--{name} must lie in [0, 1); got {getattr(args, name)}")

  start = time.perf_counter()
  rows = []
  for length in args.tokens:
    for width in args.width:
      rows += bench_shape(length, width, args, log=print)
      print(timing.format_table([r for r in rows if r["L"] == length and r["D"] == width],
                                COLUMNS), flush=True)
  out = dict(
      command="python -m benchmarks.generation " + shlex.join(argv),
      device=device_info(), versions=versions(), date=timing.today(), quick=args.quick,
      dtype=args.dtype, depth=args.depth, batch=args.batch, rounds=args.rounds,
      warmup=args.warmup, head_dim=HEAD_DIM, mlp_ratio=4, merge_layers="every block",
      tokens=dict(
          source="mame_jax.eval.data.PHOTOS via load_image(name, 8 * sqrt(L)), sample i "
                 "is PHOTOS[i]",
          how="non-overlapping 8 x 8 x 3 patches (one per latent position), flattened to "
              "192 values in [-1, 1], projected to D by a fixed N(0, 1/192) matrix (seed 0)",
          photos=[PHOTOS[i % len(PHOTOS)] for i in range(args.batch)]),
      total_s=time.perf_counter() - start, rows=rows)
  if args.json:
    write_json(args.json, out)
    print(f"wrote {args.json}")
  return out


if __name__ == "__main__":
  main()
