"""``mame-jax demo``: MaMe on real photographs, tokens kept per layer.

Runs a ViT (a checkpoint if given, else a randomly initialised one -- MaMe
still finds the flat regions of a photograph in the first blocks) on the
photographs that ship with scikit-image, in exact mode, for a few ``tau``
values, and prints how many tokens each block keeps.
"""

from __future__ import annotations

import argparse
import sys

import jax
import numpy as np

from mame_jax.eval.data import PHOTOS, load_image
from mame_jax.vis import pictures

def build_model(checkpoint=None, variant="Ti/16", image_size=224, seed=0):
  """(model, params, description): a checkpoint, or a random ``variant``."""
  from mame_jax.models import checkpoints, vit
  if checkpoint:
    model, params = checkpoints.load_model(checkpoint, image_size=image_size)
    return model, params, f"checkpoint {checkpoint}"
  model = vit.Model(1000, variant=variant, pool_type="tok")
  x = np.zeros((1, image_size, image_size, 3), np.float32)
  params = jax.jit(model.init)(jax.random.key(seed), x)["params"]
  return model, params, f"randomly initialised ViT-{variant} (no checkpoint given)"


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


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="mame-jax demo", description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", help="a big_vision .npz or timm .safetensors file")
  parser.add_argument("--variant", default="Ti/16", help="random model when no checkpoint")
  parser.add_argument("--tau", type=float, nargs="+", default=[0.7, 0.8, 0.9])
  parser.add_argument("--layers", type=int, default=8, help="merge in the first N blocks")
  parser.add_argument("--image-size", type=int, default=224)
  parser.add_argument("--figure", default="mame_demo.png",
                      help="token-cluster picture (MaMe and ToMe rows) for the first three "
                           "photographs, at the middle tau; '' to skip")
  parser.add_argument("--no-throughput", action="store_true",
                      help="skip the baseline-vs-MaMe throughput line")
  args = parser.parse_args(argv)

  model, params, what = build_model(args.checkpoint, args.variant, args.image_size)
  images = np.stack([load_image(n, args.image_size) for n in PHOTOS[:6]])
  layers = tuple(range(min(args.layers, model.depth)))
  print(f"mame-jax demo: {what}; {len(images)} skimage.data photographs at "
        f"{args.image_size}px; MaMe in blocks {layers[0]}-{layers[-1]}; {jax.default_backend()}")
  header = "tau    " + " ".join(f"{f'b{i}':>5}" for i in range(model.depth))
  print(header)
  full = np.full(model.depth, float((args.image_size // model.patch_size[0]) ** 2
                                    + (1 if model.has_class_token else 0)))
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
    names = PHOTOS[:3]
    pictures.draw(model, params, images[:3], tau=tau, layers=layers, tome_r="match",
                   out_path=args.figure, names=list(names))
    print(f"wrote {args.figure}: token clusters at tau={tau} (MaMe) and ToMe with the same "
          f"token count, {', '.join(names)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
