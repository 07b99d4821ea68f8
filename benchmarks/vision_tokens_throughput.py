"""Vision tokens for a language model: encoder time and tokens out with MaMe and ToMe.

    python -m benchmarks.vision_tokens_throughput --quick     # cut models, batch 1 and 32 (CPU)
    python -m benchmarks.vision_tokens_throughput             # the full-size encoders (big CPU)
    python -m benchmarks.vision_tokens_throughput --batches 1 32 256 --dtype bfloat16  # a GPU

The image tower as a language model's visual encoder, timed as the program a
LLaVA- or PaliGemma-style model runs before its language model:
``mame_jax.vision_tokens`` jitted, returning only ``(tokens, sizes, token_mask)``
(the blocks after ``layer``, the pooling and the head are not run). Encoders
(``ENCODERS``; ``--encoders`` picks some):

* ``clip_l14_224`` -- CLIP ViT-L/14 at 224 px (256 patches): width 1024, 24
  blocks, 16 heads, MLP 4096, 14-px patches, the class token, CLIP's pre-encoder
  LayerNorm and quick-GELU, as ``mame_jax.models.clip`` loads
  ``openai/clip-vit-large-patch14``; LLaVA's rule: the penultimate block's
  output (``layer=-2``), the class token dropped;
* ``clip_l14_336`` -- the same at 336 px (576 patches): LLaVA-1.5's encoder
  (``clip-vit-large-patch14-336``);
* ``so400m_224`` -- SigLIP So400m/14 at 224 px (256 patches): width 1152, 27
  blocks, 16 heads, MLP 4304, no class token; PaliGemma's rule: the last block
  after the final LayerNorm (``layer=-1, norm=True``), no pooling head.

Presets (``--preset``): ``full`` is those encoders; ``quick`` (what ``--quick``
runs) cuts width, heads, MLP and depth by 4 (the merge layers with them: MaMe
in the first 2 of 6 blocks instead of 8 of 24) at the real image sizes, hence
the real token counts -- the full encoders take minutes per batch of 32 on a
2-core CPU; ``tiny`` (width 64, 2 blocks) is for smoke tests. The JSON's
``note`` says which ran.

Weights are random (``mame_jax.models.load.random_params``; no download), inputs
the project's photographs (``vit_throughput.photo_batch``). A random tower's
tokens are mostly its patch embedding and merge far more than a trained one's,
so the token counts (and the speedups) are not those of the real checkpoint;
the cost of a given token count is. Rows per encoder and batch:

* ``baseline`` -- no merging;
* ``mame(tau)`` at the paper's CLIP taus 0.7 and 0.8 (Table 3) in the first
  8 blocks (exact mode: ``mame_jax.Runner`` settles the capacity schedule on the
  batch first, then that one program is timed);
* ``tome(r=...)`` -- ToMe (its "timm" recipe) in every block up to ``layer``,
  with the ``r`` whose analytic cost comes closest to a MaMe row's GFLOPs
  (``siglip_throughput.tome_r_per_tau``: each distinct ``r`` once,
  ``matches_tau`` lists the taus).

Timing is ``mame_jax.eval.timing.time_interleaved`` (each program first called
alone -- its ``compile_s`` -- then rounds calling every method in turn; the
median), GFLOPs per image ``timing.gflops`` (XLA's count, 2 per multiply-add).
Per row: ``ms_per_batch``, ``images_per_s``, ``tokens_out`` (the mean number of
real tokens the language model would read), ``patches_held`` (the mean sum of
``sizes``: every patch is in some token), ``gflops_per_image``,
``measured_speedup`` (baseline ms / row ms) and ``ideal_speedup`` (baseline
GFLOPs / row GFLOPs).

GPU: ``--dtype bfloat16`` runs the towers in bf16 end to end (activations and
matmuls, parameters cast with ``vit.cast_params``); on an H100/H200 the full
preset at batches 1, 32 and 256 should fit in a few minutes:

    python -m benchmarks.vision_tokens_throughput --batches 1 32 256 --dtype bfloat16 \\
        --json results/vision_tokens_throughput_gpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time

if not __package__:  # run as a file, not with -m: see benchmarks/__init__.py
  sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import jax
import numpy as np

import mame_jax as mj
from benchmarks.siglip_throughput import display, tome_r_per_tau
from benchmarks.vit_throughput import (batch_wide_note, command_line, open_section, photo_batch,
                                       weights_line)
from mame_jax.eval import timing
from mame_jax.eval.data import PHOTOS
from mame_jax.eval.report import write_json
from mame_jax.models import clip, load, vit
from mame_jax.models.merging import DEFAULT_NUM_LAYERS
from mame_jax.vision_tokens import block_index

RESULTS = pathlib.Path("results/vision_tokens_throughput.json")
TAUS = (0.7, 0.8)  # the paper's CLIP ViT-L/14 rows (Table 3)
COLUMNS = ["model", "image_size", "batch", "method", "matches_tau", "ms_per_batch",
           "images_per_s", "tokens_out", "gflops_per_image", "measured_speedup",
           "ideal_speedup"]


@dataclasses.dataclass(frozen=True)
class Encoder:
  """One visual encoder and the layer a language model reads from it."""
  name: str
  family: str       # "clip" (class token, pre-LN, quick-GELU) or "siglip" (MAP head)
  image_size: int
  layer: int        # the block whose output the LM reads (-2: LLaVA, -1: PaliGemma)
  norm: bool        # the final LayerNorm on the tokens (PaliGemma's encoder output)
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  merge_layers: int = DEFAULT_NUM_LAYERS  # MaMe in the first this many blocks
  patch: int = 14
  reader: str = ""  # which language models read this encoder so

  @property
  def patches(self) -> int:
    return (self.image_size // self.patch) ** 2

  def cut(self, factor: int = 4, **fields) -> "Encoder":
    """The same family smaller: width, heads, MLP, depth and merge layers / ``factor``
    (head width kept), at the same image size and layer; ``fields`` win."""
    kw = dict(width=self.width // factor, num_heads=max(1, self.num_heads // factor),
              mlp_dim=self.mlp_dim // factor, depth=max(2, self.depth // factor),
              merge_layers=max(1, self.merge_layers // factor))
    return dataclasses.replace(self, **{**kw, **fields})

  def describe(self) -> str:
    return (f"width {self.width}, {self.depth} blocks, {self.num_heads} heads, "
            f"MLP {self.mlp_dim}, patch {self.patch}")


_CLIP_L14 = dict(family="clip", layer=-2, norm=False, width=1024, depth=24, mlp_dim=4096,
                 num_heads=16)
ENCODERS = {
    "clip_l14_224": Encoder("CLIP ViT-L/14", image_size=224, reader="LLaVA-style",
                            **_CLIP_L14),
    "clip_l14_336": Encoder("CLIP ViT-L/14", image_size=336, reader="LLaVA-1.5",
                            **_CLIP_L14),
    "so400m_224": Encoder("SigLIP So400m/14", family="siglip", image_size=224, layer=-1,
                          norm=True, width=1152, depth=27, mlp_dim=4304, num_heads=16,
                          reader="PaliGemma 224"),
}
PRESETS = {
    "full": {k: e for k, e in ENCODERS.items()},
    "quick": {k: e.cut(4) for k, e in ENCODERS.items()},
    "tiny": {k: e.cut(width=64, num_heads=1, mlp_dim=128, depth=2, merge_layers=1)
             for k, e in ENCODERS.items()},
}
NOTES = {
    "full": "the full-size encoders",
    "quick": ("quick preset: each encoder cut by 4 in width, heads, MLP and depth (merge "
              "layers too), at the real image sizes and token counts; not the full-size "
              "encoders"),
    "tiny": "tiny preset (width 64, 2 blocks): a smoke test, not a measurement",
}


def tower(enc: Encoder, dtype: str = "float32"):
  """``enc``'s image tower (a ``vit.Model``, no parameters): CLIP's as
  ``mame_jax.models.clip`` loads it (class token, pre-LN, quick-GELU, the
  projection as head); SigLIP's with its MAP head, no class token, no classifier.
  ``dtype="bfloat16"``: activations and matmuls in bf16."""
  shape = dict(width=enc.width, depth=enc.depth, mlp_dim=enc.mlp_dim,
               num_heads=enc.num_heads, patch_size=enc.patch)
  if enc.family == "clip":
    kw = dict(pool_type="tok", class_token=True, pre_norm=True, activation="quick_gelu",
              ln_eps=clip.DEFAULT_LN_EPS, input_norm=(clip.CLIP_MEAN, clip.CLIP_STD))
    num_classes = 768  # ViT-L/14's projection; vision_tokens leaves it out
  elif enc.family == "siglip":
    kw, num_classes = dict(pool_type="map", class_token=False), None
  else:
    raise ValueError(f"Encoder.family must be 'clip' or 'siglip'; got {enc.family!r}")
  if dtype != "float32":  # bf16 end to end, as benchmarks/gpu.py runs its towers
    kw.update(dtype=dtype, **load.matmul_dtype(dtype))
  return mj.Model(num_classes, **shape, **kw)


def build(enc: Encoder, dtype: str = "float32", seed: int = 0):
  """``(model, params)``: :func:`tower` with random weights
  (``mame_jax.models.load.random_params``; cast to ``dtype``)."""
  model = tower(enc, dtype)
  params = load.random_params(model, enc.image_size, seed)
  return model, params if dtype == "float32" else vit.cast_params(params, dtype)


def tokens_program(model, enc: Encoder):
  """The lean jitted ``(params, images) -> (tokens, sizes, token_mask)``."""
  return jax.jit(lambda p, x: mj.vision_tokens(model, p, x, layer=enc.layer,
                                               drop_special=True, norm=enc.norm))


def bench_encoder(enc: Encoder, batch: int, *, taus=TAUS, runs: int = 3, warmup: int = 1,
                  dtype: str = "float32", model_params=None) -> list:
  """Rows for one encoder at one batch size: baseline, MaMe per tau, ToMe per
  distinct matching ``r``."""
  model, params = model_params or build(enc, dtype)
  images = photo_batch(batch, enc.image_size, count=len(PHOTOS))
  k = block_index(enc.layer, model.depth)
  ns = model.num_special
  methods = [("baseline", tokens_program(model, enc), {})]
  layers = tuple(range(min(enc.merge_layers, k + 1)))
  for tau in taus:
    cfg = mj.MergeConfig(tau=tau, layers=layers)
    runner = mj.Runner(model.clone(merge=cfg), params)
    if runner.exact:  # settles the capacity schedule on this batch (tau >= 1: no merge)
      runner(images)
      cfg = cfg.replace(capacities=runner.schedule)
    methods.append((f"mame({tau:g})", tokens_program(model.clone(merge=cfg), enc), dict(
        tau=tau, capacities=None if runner.schedule is None else list(runner.schedule),
        merge_layers=list(layers))))
  flops = {name: timing.gflops(fn, params, images) / batch for name, fn, _ in methods}
  ratios = {extra["tau"]: flops[name] / flops["baseline"] for name, _, extra in methods[1:]}
  # ToMe's r is matched on the blocks that run: those up to `layer`.
  for r, matched in tome_r_per_tau(model.clone(depth=k + 1), enc.patches + ns, ratios):
    tome = model.clone(merge=mj.ToMeConfig.recipe("timm", r=r))
    name = f"tome(r={r})"
    methods.append((name, tokens_program(tome, enc), dict(r=r, matches_tau=matched)))
    flops[name] = timing.gflops(methods[-1][1], params, images) / batch
  print(f"{enc.name} at {enc.image_size} px ({enc.patches} patches, layer {enc.layer}), "
        f"batch {batch}, {dtype}", flush=True)
  counts, compile_s = {}, {}
  for name, fn, _ in methods:  # the first call compiles; its output gives the counts
    start = time.perf_counter()
    _, sizes, mask = jax.block_until_ready(fn(params, images))
    compile_s[name] = time.perf_counter() - start
    counts[name] = (float(np.asarray(mask).sum(-1).mean()),
                    float(np.asarray(sizes, np.float64).sum(-1).mean()))
  timings = timing.time_interleaved({name: (fn, (params, images)) for name, fn, _ in methods},
                                    rounds=runs, warmup=warmup)
  rows = []
  for name, _, extra in methods:
    t = timings[name]
    rows.append(dict(
        model=enc.name, encoder=enc.describe(), reader=enc.reader, image_size=enc.image_size,
        patches=enc.patches, layer=enc.layer, batch=batch, dtype=dtype, method=name,
        ms_per_batch=t.median_s * 1e3, iqr_ms=t.iqr_s * 1e3, images_per_s=batch / t.median_s,
        tokens_out=counts[name][0], patches_held=counts[name][1],
        gflops_per_image=flops[name], compile_s=compile_s[name], **extra))
  base = rows[0]
  for row in rows:
    row["measured_speedup"] = base["ms_per_batch"] / row["ms_per_batch"]
    row["ideal_speedup"] = base["gflops_per_image"] / row["gflops_per_image"]
    print(f"  {row['method']:<12} {row['ms_per_batch']:9.1f} ms  {row['images_per_s']:8.2f} "
          f"img/s  {row['tokens_out']:6.1f} tokens  {row['gflops_per_image']:8.2f} GFLOPs/img  "
          f"x{row['measured_speedup']:.2f} (ideal x{row['ideal_speedup']:.2f})", flush=True)
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
  parser.add_argument("--encoders", nargs="+", choices=sorted(ENCODERS), default=None,
                      help="default: all three")
  parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
  parser.add_argument("--taus", type=float, nargs="+", default=list(TAUS))
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--runs", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--quick", action="store_true",
                      help="the quick preset (cut encoders), 3 runs, no warm-up round (the "
                      "compiling call warms up)")
  parser.add_argument("--json", default=str(RESULTS))
  args = parser.parse_args(argv)
  if args.quick:
    args.preset, args.runs, args.warmup = "quick", 3, 0
  preset = PRESETS[args.preset]
  keys = args.encoders or list(preset)
  rows = []
  for key in keys:
    enc = preset[key]
    built = build(enc, args.dtype)
    for batch in args.batches:
      rows += bench_encoder(enc, batch, taus=args.taus, runs=args.runs, warmup=args.warmup,
                            dtype=args.dtype, model_params=built)
  print()
  print(timing.format_table(display(rows), COLUMNS))
  command = command_line("vision_tokens_throughput", argv)
  write_json(args.json, dict(
      device=timing.device_description(), platform=jax.default_backend(), date=timing.today(),
      dtype=args.dtype, preset=args.preset, note=NOTES[args.preset],
      encoders={k: dict(dataclasses.asdict(preset[k]), patches=preset[k].patches)
                for k in keys},
      batches=args.batches, taus=args.taus, runs=args.runs, warmup=args.warmup,
      command=command,
      weights="random", inputs="mame_jax.eval.data.PHOTOS", rows=rows))
  print(f"\nsaved {args.json}")


def section(path=RESULTS) -> list:
  """The BENCHMARKS.md section from ``path`` (a run of this script): command, device
  and date beside the table, what the rows are, then what was not measured or
  fell short, said plainly."""
  out, run = open_section("Vision tokens for a language model: CLIP ViT-L/14 and SigLIP "
                          "So400m/14", path, "vision_tokens_throughput")
  if run is None:
    return out
  rows = run["rows"]
  out += ["",
          "The encoder a LLaVA- or PaliGemma-style model runs before its language model:",
          "`mame_jax.vision_tokens` jitted (tokens, sizes and mask out; the blocks after",
          "the layer read, the pooling and the head not run). CLIP ViT-L/14: the",
          "penultimate block, class token dropped (LLaVA-1.5 at 336 px); SigLIP",
          "So400m/14: the last block after the final LayerNorm (PaliGemma at 224 px).",
          f"Models: {run['note']}.",
          weights_line("random", "random towers on the project's photographs: the cost "
                       "of each token count is real, the counts are not a trained "
                       "checkpoint's (random towers merge more)."),
          "`tokens_out`: the real tokens the language model reads, mean per image.",
          "", timing.format_table(display(rows), COLUMNS), ""]
  encoders = run.get("encoders", {})
  out += [f"- {e['name']} at {e['image_size']} px: {e['width']} wide, {e['depth']} blocks, "
          f"{e['num_heads']} heads, MLP {e['mlp_dim']}, MaMe in the first "
          f"{e['merge_layers']} blocks, layer {e['layer']}" for e in encoders.values()]
  pairs = [(m, t) for m in rows if m["method"].startswith("mame") for t in rows
           if _same_setting(m, t) and m["tau"] in (t.get("matches_tau") or [])]
  if pairs:
    out += ["", "Tokens the language model reads, MaMe against its GFLOPs-matched ToMe:", ""]
    out += [f"- {_where(m)} {m['method']}: {m['tokens_out']:.0f} tokens at "
            f"{m['gflops_per_image']:.2f} GFLOPs; {t['method']}: {t['tokens_out']:.0f} at "
            f"{t['gflops_per_image']:.2f}" for m, t in pairs]
  out += ["", "Not measured or short of the goal:", ""]
  misses = [f"- batch {b}: not measured in this run" for b in (1, 32)
            if b not in run["batches"]]
  if run.get("preset") != "full":
    misses.append("- the full-size encoders (CLIP ViT-L/14: width 1024, 24 blocks; "
                  "So400m/14: width 1152, 27 blocks): not measured in this run "
                  f"({run.get('preset')} preset)")
  if run.get("platform", "cpu") == "cpu":
    misses.append("- a GPU (bf16, batch >= 256): not measured in this run")
  for m in (r for r in rows if r["method"].startswith("mame")):
    at = f"{_where(m)} {m['method']}"
    if m["measured_speedup"] < 1:
      misses.append(f"- {at}: slower than the baseline ({m['measured_speedup']:.2f}x)")
    if m["tokens_out"] >= m["patches"]:
      misses.append(f"- {at}: merged nothing ({m['tokens_out']:.0f} tokens out of "
                    f"{m['patches']} patches). {batch_wide_note(m['batch'], 'photographs')}")
    tome = next((t for mm, t in pairs if mm is m), None)
    if tome is not None and m["ms_per_batch"] > tome["ms_per_batch"]:
      misses.append(f"- {at}: {m['ms_per_batch']:.1f} ms, slower than its GFLOPs-matched "
                    f"{tome['method']} ({tome['ms_per_batch']:.1f} ms; "
                    f"{m['gflops_per_image']:.2f} against {tome['gflops_per_image']:.2f} "
                    f"GFLOPs, {m['tokens_out']:.0f} against {tome['tokens_out']:.0f} "
                    "tokens out)")
  return out + (misses or ["- nothing: every row measured, MaMe ahead of the baseline "
                           "and of ToMe at matched GFLOPs"])


def _same_setting(a, b) -> bool:
  return all(a[k] == b[k] for k in ("model", "image_size", "batch"))


def _where(row) -> str:
  return f"{row['model']} {row['image_size']} px batch {row['batch']}"


if __name__ == "__main__":
  main()
