"""``mame-jax demo``: MaMe on real photographs with a real pretrained ViT.

Runs the AugReg ViT-S/16 (ImageNet-21k pre-trained, ImageNet-1k fine-tuned, 224
px; the known checkpoint ``augreg_s16`` of :func:`mame_jax.models.load.load_model`,
downloaded once from the public ``gs://vit_models/augreg`` bucket into
``$MAME_JAX_CACHE`` or ``~/.cache/mame_jax``) on the photographs that ship with
scikit-image, in exact mode, for a few ``tau`` values; prints how many tokens
each block keeps, a baseline-vs-MaMe throughput line, and draws the token
clusters of MaMe and of ToMe side by side.

Why S/16 and not the paper's ablation model B/16: the same AugReg recipe at a
quarter of the compute (4.6 against 17.6 GFLOPs per image) and a quarter of the
download (~88 MB against ~330 MB), so the demo stays quick on a laptop CPU;
``--checkpoint augreg_b16`` runs B/16.

``--checkpoint`` (a file, a URL or a known name) replaces the default and is
never silently replaced: if it cannot be had, the demo fails. Without network
(``$MAME_JAX_OFFLINE=1``, which touches neither the network nor the cache, or a
download that fails within ``--timeout`` seconds) the demo says so in one line
and runs a randomly initialised ``--variant`` instead -- on real photographs
its first blocks still see colours and edges, so MaMe still finds the flat
regions, but this is not what a trained model merges.
"""

from __future__ import annotations

import argparse
import sys

import jax
import numpy as np

from mame_jax.eval.data import PHOTOS, load_image
from mame_jax.models import load
from mame_jax.vis import pictures

DEMO_CHECKPOINT = "augreg_s16"


def build_model(checkpoint=None, variant="Ti/16", image_size=224, *, timeout=10.0):
  """``(model, params, note)``: ``checkpoint`` (anything ``load_model`` takes), else
  :data:`DEMO_CHECKPOINT` when it can be downloaded, else a random ``variant``;
  ``note`` is one line saying which (with "offline" and "random" in it when the
  random model stands in)."""
  if checkpoint:
    model, params = load.load_model(checkpoint, image_size=image_size, timeout=timeout,
                                    tower="img")
    return model, params, f"checkpoint {checkpoint} ({load.describe(model)})"
  return load.pretrained_or_random(DEMO_CHECKPOINT, timeout=timeout, image_size=image_size,
                                   fallback_variant=variant)


def tokens_per_layer(model, params, images, tau, layers):
  """Mean real tokens after each block, exact mode: ``(depth,)``."""
  from mame_jax import MergeConfig, Runner
  runner = Runner(model.clone(merge=MergeConfig(tau=tau, layers=layers)), params)
  _, aux = runner(images)
  return np.asarray(aux["tokens_per_block"]).mean(0), runner


def throughput_line(model, params, images, runner) -> str:
  """Baseline vs MaMe (the runner's settled program) on the same batch: images/s
  (median of timed runs after compiling) and XLA GFLOPs per image."""
  from mame_jax.eval import timing
  base = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])
  program = runner.program(runner.schedule, images.shape)
  merged = lambda p, x: program(p, x)[0]
  n = images.shape[0]
  t_base = timing.time_fn(base, params, images, warmup=1, runs=3)
  t_mame = timing.time_fn(merged, params, images, warmup=1, runs=3)
  g_base = timing.gflops(base, params, images) / n
  g_mame = timing.gflops(merged, params, images) / n
  tau = runner.cfg.tau
  return (f"throughput, batch {n} on {jax.default_backend()}: baseline "
          f"{t_base.throughput(n):.1f} img/s ({g_base:.2f} GFLOPs/img), MaMe tau={tau} "
          f"{t_mame.throughput(n):.1f} img/s ({g_mame:.2f} GFLOPs/img): measured "
          f"{t_base.median_s / t_mame.median_s:.2f}x, ideal {g_base / g_mame:.2f}x")


def figure_caption(counts: dict, layers) -> str:
  """What the picture's two rows match, with both final counts: MaMe's per image
  and ToMe's, after the last merge block. ``counts``: :func:`pictures.draw`'s,
  ``{label: (B, depth) tokens after every block}`` with the MaMe row first."""
  (mame_label, mame), (tome_label, tome) = list(counts.items())[:2]
  last = max(layers)
  per_image = ", ".join(str(int(c)) for c in mame[:, last])
  return (f"{mame_label} ends block {last} with {float(np.mean(mame[:, last])):.1f} tokens "
          f"(mean of {per_image}); {tome_label} with {int(np.mean(tome[:, last]))} -- the r "
          f"whose count after block {last} comes closest to MaMe's (ToMe merges the same r "
          "in every block, at most half of a block's tokens)")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="mame-jax demo", description=__doc__.splitlines()[0])
  known = ", ".join(sorted(load.KNOWN))
  parser.add_argument("--checkpoint",
                      help=f"a checkpoint file, URL or known name ({known}); default "
                           f"{DEMO_CHECKPOINT}, downloaded once")
  parser.add_argument("--variant", default="Ti/16",
                      help="the random model when offline (no checkpoint to be had)")
  parser.add_argument("--timeout", type=float, default=10.0,
                      help="seconds to wait for the network before going offline")
  parser.add_argument("--tau", type=float, nargs="+", default=[0.7, 0.8, 0.9])
  parser.add_argument("--layers", type=int, default=8, help="merge in the first N blocks")
  parser.add_argument("--image-size", type=int, default=224)
  parser.add_argument("--figure", default="mame_demo.png",
                      help="token-cluster picture (MaMe and ToMe rows) for the first three "
                           "photographs, at the middle tau; '' to skip")
  parser.add_argument("--no-throughput", action="store_true",
                      help="skip the baseline-vs-MaMe throughput line")
  args = parser.parse_args(argv)

  model, params, note = build_model(args.checkpoint, args.variant, args.image_size,
                                    timeout=args.timeout)
  images = np.stack([load_image(n, args.image_size) for n in PHOTOS[:6]])
  layers = tuple(range(min(args.layers, model.depth)))
  print(f"mame-jax demo: {note}")
  print(f"{len(images)} skimage.data photographs at {args.image_size}px; MaMe in blocks "
        f"{layers[0]}-{layers[-1]}; {jax.default_backend()}")
  header = "tau    " + " ".join(f"{f'b{i}':>5}" for i in range(model.depth))
  print(header)
  full = np.full(model.depth, float((args.image_size // model.patch_size[0]) ** 2
                                    + model.num_special))
  print("plain  " + " ".join(f"{t:5.0f}" for t in full))
  runners = {}
  for tau in args.tau:
    counts, runners[tau] = tokens_per_layer(model, params, images, tau, layers)
    print(f"{tau:<6} " + " ".join(f"{t:5.1f}" for t in counts)
          + f"   (capacities {runners[tau].schedule}, {runners[tau].num_programs} program(s))")
  tau = args.tau[len(args.tau) // 2]
  if not args.no_throughput:
    print(throughput_line(model, params, images, runners[tau]))
  if args.figure:
    names = list(PHOTOS[:3])
    _, counts = pictures.draw(model, params, images[:3], tau=tau, layers=layers,
                              tome_r="match", out_path=args.figure, names=names)
    print(f"wrote {args.figure}: token clusters of {', '.join(names)}; "
          + figure_caption(counts, layers))
  return 0


if __name__ == "__main__":
  sys.exit(main())
