"""A small real training experiment on the CPU: ViT-Ti from scratch on digits.

    python -m benchmarks.digits --quick --json results/train_digits_cpu.json

scikit-learn's handwritten digits (``sklearn.datasets.load_digits``: 1,797
8 x 8 greyscale images, 10 classes) are upscaled to 32 x 32 (bilinear) and
written as PNG class folders, a stratified 80/20 train / held-out split with a
fixed seed (:func:`write_digits`). Then ``train.py``'s loop trains a ViT-Ti
(width 192, depth 12, 3 heads) with 4 x 4 patches (64 tokens + class token)
from scratch, once per setting -- ``none``, ``mame`` (blocks 3/6/9 counted from
1, tau 0.5, 2:1) and ``tome`` (r matched to MaMe's token count) -- with the
same seed, data order and schedule, and evaluates the held-out split through
``mame_jax.eval.loop.evaluate``. Reported: held-out top-1, training images/s
(the steps' wall time, loading included), evaluation images/s (the evaluation's
timing rules), and the loader alone (images/s of the grain pipeline with no
step).

What it shows: that MaMe and ToMe train end to end from scratch and how their
accuracy and speed compare with the plain model on one small, easy task at 65
tokens. What it cannot show: ImageNet accuracy (the paper's -1.3 points for
ViT-T), long-schedule behaviour, or GPU speed -- 8 x 8 digits upscaled are
nearly separable, and at 65 tokens the merge's overhead weighs more than at 197.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import sys
import tempfile
import time

if not __package__:  # run as a file, not with -m: see benchmarks/__init__.py
  sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import numpy as np

from benchmarks.gpu import device_info, versions
from benchmarks.vit_throughput import weights_line
from mame_jax.eval import timing
from mame_jax.eval.report import write_json

METHODS = ("none", "mame", "tome")
COLUMNS = ["method", "merge", "eval_top1", "final_loss", "train_images_per_s",
           "eval_images_per_s", "eval_speedup", "mean_tokens", "steps", "train_s"]


def write_digits(root, size: int = 32, test_fraction: float = 0.2, seed: int = 0) -> tuple:
  """``root/train/<digit>/*.png`` and ``root/test/<digit>/*.png``; returns the
  two folders. Stratified: the same fraction of every class is held out."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  from mame_jax.eval.data import resize_bilinear  # pylint: disable=import-outside-toplevel
  digits = load_digits()
  rs = np.random.RandomState(seed)
  for split in ("train", "test"):
    for c in range(10):
      os.makedirs(os.path.join(root, split, str(c)), exist_ok=True)
  for c in range(10):
    idx = np.flatnonzero(digits.target == c)
    rs.shuffle(idx)
    n_test = int(round(len(idx) * test_fraction))
    for rank, i in enumerate(idx):
      split = "test" if rank < n_test else "train"
      grey = digits.images[i][..., None] * (255.0 / 16.0)
      big = np.clip(resize_bilinear(grey, (size, size)), 0, 255).astype(np.uint8)
      Image.fromarray(np.repeat(big, 3, -1)).save(os.path.join(root, split, str(c),
                                                                f"{i}.png"))
  return os.path.join(root, "train"), os.path.join(root, "test")


def loader_images_per_s(train_dir, batch: int, image_size: int, steps: int, workers: int):
  from mame_jax.train import data as train_data  # pylint: disable=import-outside-toplevel
  source = train_data.load_train_source(train_dir)
  batches = train_data.Batches(source, batch_size=batch, image_size=image_size,
                               total_steps=steps, workers=workers, min_scale=0.5)
  it = batches.from_step(0)
  next(it)  # threads started
  start = time.perf_counter()
  n = sum(1 for _ in it)
  return n * batch / (time.perf_counter() - start)


def run_method(method, train_dir, test_dir, workdir, args):
  import train  # pylint: disable=import-outside-toplevel
  from mame_jax.train import loop  # pylint: disable=import-outside-toplevel
  arch = json.dumps({"patch_size": 4})
  config, wd = train.parse([
      "--config", f"configs/train.py:variant=Ti/16,merge={method},data={train_dir},"
      f"batch_size={args.batch},image_size=32,steps={args.steps}",
      "--workdir", str(workdir), f"--config.model.arch={arch}", "--config.num_classes=10",
      f"--config.input.eval_data={test_dir}", "--config.input.preprocess=siglip",
      "--config.input.min_scale=0.5", "--config.input.flip=false",
      f"--config.lr={args.lr}", f"--config.warmup_steps={args.steps // 10}",
      f"--config.log_steps={max(args.steps // 10, 1)}",
      f"--config.ckpt_steps={args.steps}", "--config.progress=false",
      f"--config.input.workers={args.workers}"])
  start = time.perf_counter()
  result = loop.train(config, wd, log=print)
  train_s = time.perf_counter() - start
  train_rows = [r for r in result.rows if "loss" in r]
  ev = [r for r in result.rows if "eval_top1" in r][-1]
  # The first interval holds the compile; leave it out of the speed.
  speed = [r["images_per_s"] for r in train_rows[1:]] or [train_rows[0]["images_per_s"]]
  return dict(method=method, merge=ev["eval_method"], eval_top1=ev["eval_top1"],
              final_loss=train_rows[-1]["loss"], train_images_per_s=float(np.median(speed)),
              eval_images_per_s=ev["eval_images_per_s"],
              eval_gflops_per_image=ev["eval_gflops_per_image"],
              mean_tokens=float(np.mean(train_rows[-1]["tokens"])),
              tokens=train_rows[-1]["tokens"], steps=result.step, train_s=train_s,
              eval_images=ev["eval_images"])


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="300 steps (about 13 epochs)")
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
  parser.add_argument("--workdir", default=None, help="default: a temporary folder")
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  args.steps = args.steps or (300 if args.quick else 2000)
  start = time.perf_counter()
  rows = []

  def report():
    base = next((r for r in rows if r["method"] == "none"), rows[0])
    for r in rows:
      r["eval_speedup"] = r["eval_images_per_s"] / base["eval_images_per_s"]
    out = dict(command="python -m benchmarks.digits " + shlex.join(argv),
               device=device_info(), versions=versions(), date=timing.today(),
               steps=args.steps, batch=args.batch, lr=args.lr,
               data="sklearn load_digits, 8x8 -> 32x32 bilinear, stratified 80/20 split "
                    "(seed 0)",
               model="ViT-Ti (width 192, depth 12, 3 heads), patch 4: 64 tokens + cls",
               methods=args.methods, loader_images_per_s=loader,
               total_s=time.perf_counter() - start, rows=rows)
    if args.json:  # after every method, so that a long run keeps what it measured
      write_json(args.json, out)
    return out

  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(args.workdir or tmp)
    train_dir, test_dir = write_digits(str(root / "digits"))
    loader = loader_images_per_s(train_dir, args.batch, 32, 20, args.workers)
    for m in args.methods:
      rows.append(run_method(m, train_dir, test_dir, root / f"run_{m}", args))
      out = report()
  print(timing.format_table(rows, COLUMNS))
  print(f"loader alone: {loader:.0f} images/s")
  if args.json:
    print(f"wrote {args.json}")
  return out


def section() -> list[str]:
  """The BENCHMARKS.md section from ``results/train_digits*.json``."""
  files = sorted(pathlib.Path("results").glob("train_digits*.json"))
  out = ["", "## Training from scratch on digits: `python -m benchmarks.digits`", "",
         "ViT-Ti (patch 4, 65 tokens) trained from scratch by `train.py`'s loop on",
         "scikit-learn's handwritten digits upscaled to 32 x 32 (1,437 training, 360",
         "held-out images), `none` vs `mame` (blocks 3/6/9 counted from 1, tau 0.5, 2:1) vs",
         "`tome` (r matched to MaMe's token count), same seed, data and schedule.",
         "It shows that the merges train end to end and how they compare on one small,",
         "easy task; it is not ImageNet and says nothing about the paper's ImageNet",
         "figures (ViT-T: 1.94x, -1.3 points), long schedules or GPU speed.", "",
         weights_line("trained", "each row's ViT-Ti is trained from a random start by "
                      "this command; its accuracy is that of this run's training."), ""]
  if not files:
    return out + ["- Not run yet."]
  for path in files:
    run = json.loads(path.read_text())
    note = (" A CPU shared with other processes: read the ratios, not the images/s."
            if run["device"]["platform"] == "cpu" else "")
    out += [f"`{run['command']}` -- {run['device']['description']}, {run['steps']} steps "
            f"of batch {run['batch']}, {run['date']} (`{path}`).{note}", "",
            timing.format_table(run["rows"], COLUMNS), "",
            *([f"Not measured (the run ended first): "
               f"{', '.join(sorted(set(run['methods']) - {r['method'] for r in run['rows']}))}.",
               ""] if set(run.get("methods", ())) - {r["method"] for r in run["rows"]} else []),
            f"The loader alone (grain, 2 threads, crop + decode): "
            f"{run['loader_images_per_s']:.0f} images/s.", ""]
    if run.get("note"):  # what the run that made the file says about itself
      out += [f"Note on this run: {run['note']}", ""]
  return out


if __name__ == "__main__":
  main()
