"""Train a tiny class-conditional DiT on the CPU, then sample baseline / MaMe + MaRe /
ToMe-SD from the same noise: image grids and PSNR / SSIM against the baseline.

    python -m benchmarks.dit_digits --quick --json results/dit_digits.json   # CPU, minutes
    python -m benchmarks.dit_digits --steps 3000 --json results/dit_digits_long.json
    python -m benchmarks.dit_digits --checkpoint results/dit_digits/dit.npz --json /tmp/d.json
    python -m benchmarks.dit_digits --data tfds:mnist --channels 1 --json /tmp/mnist.json

Data: ``--data digits`` (default) is scikit-learn's handwritten digits (1797 8 x 8
images that ship with the package) upscaled to 32 x 32
(``mame_jax.eval.data.load_digits``); ``--data tfds:NAME[:SPLIT]`` any prepared
tensorflow-datasets image dataset (``data.tfds_source``: never downloads; images
resized bilinearly to ``--image-size``, grey when ``--channels 1``; labels modulo
``--num-classes``).

The model (``mame_jax.models.dit.DiT``: patchify, adaLN-Zero on timestep + class,
``dit_blocks`` generation blocks, unpatchify) is trained with the DDPM loss
(``mame_jax.diffusion``, linear betas over 1000 steps, 10% null-class labels)
and Adam, then saved to ``OUT/dit.npz`` (params + ``meta/config`` JSON; read back
with ``dit.load``, never unpickled). ``--checkpoint`` loads one instead of
training.

Sampling: deterministic DDIM (``--ddim-steps``, ``--guidance``) from one batch of
noise (key ``--seed``), labels ``0, 1, ..., 9, 0, ...``, the same for every method:

* ``baseline`` -- no merging;
* ``mame_mare`` -- MaMe before and MaRe after attention in every block (eq. 17)
  at each ``--taus``, exact mode (``diffusion.sample_exact``: bucketed capacities,
  one per block for all timesteps, grown until no preserved token is dropped);
* ``tome_sd`` -- ToMe-SD (2 x 2 windows, random destinations) at each ``--ratios``.

Per method: PSNR and SSIM of its samples against the baseline's
(``mame_jax.eval.quality``, images in [-1, 1]), the mean number of real tokens
the blocks attended (``tokens_real``; 64 without merging), the static length
they ran on (``tokens_attended``), and the latency of the whole sampler
(``timing.time_interleaved``: compiled first, interleaved rounds, medians).
Grids: ``OUT/samples.png`` (one row per method) and ``OUT/training_data.png``.
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

from benchmarks.gpu import device_info, versions
from benchmarks.vit_throughput import weights_line
from mame_jax import diffusion
from mame_jax.eval import data as data_lib
from mame_jax.eval import quality, timing
from mame_jax.eval.report import write_json
from mame_jax.models import dit
from mame_jax.models.merging import MergeConfig
from mame_jax.tome_sd import ToMeSDConfig, num_to_merge
from mame_jax.vis.pictures import image_grid

FULL = dict(steps=3000, width=64, depth=4, samples=20, ddim_steps=25, rounds=5)
QUICK = dict(steps=600, width=48, depth=3, samples=20, ddim_steps=20, rounds=2)
COLUMNS = ["method", "setting", "tokens_real", "tokens_attended", "psnr", "ssim",
           "latency_ms", "measured_speedup", "dropped"]


def load_images(spec: str, size: int, channels: int, num_classes: int, limit: int):
  """``(images (N, size, size, channels) in [-1, 1], labels (N,))`` for ``--data``."""
  if spec == "digits":
    if channels != 1 or size < 8:
      raise ValueError(f"--data digits is grey (--channels 1) and 8 x 8 (--image-size >= 8); "
                       f"got --channels {channels} --image-size {size}")
    return data_lib.load_digits(size)
  if not spec.startswith("tfds:"):
    raise ValueError(f"--data must be 'digits' or 'tfds:NAME[:SPLIT]'; got {spec!r}")
  name, _, split = spec[len("tfds:"):].partition(":")
  source = data_lib.tfds_source(name, split or "train")
  images, labels = [], []
  for i, record in enumerate(source.records()):
    if i >= limit:
      break
    image, label = source.fetch(record)
    image = np.asarray(image, np.float64)
    if image.ndim == 2:
      image = image[..., None]
    image = data_lib.resize_bilinear(image / 255.0, (size, size))
    image = image.mean(-1, keepdims=True) if channels == 1 else np.broadcast_to(
        image, (size, size, 3)) if image.shape[-1] == 1 else image[..., :3]
    images.append(image * 2 - 1)
    labels.append(max(int(label), 0) % num_classes)
  return np.asarray(images, np.float32), np.asarray(labels, np.int32)


def train_model(args, images, labels, log):
  model = dit.DiT(image_size=args.image_size, patch_size=args.patch_size,
                  channels=images.shape[-1], width=args.width, depth=args.depth,
                  num_heads=args.heads, num_classes=args.num_classes)
  params = dit.init(model, args.seed)
  start = time.perf_counter()
  params, losses = diffusion.train(model, params, images, labels, steps=args.steps,
                                   batch_size=args.batch, seed=args.seed,
                                   log_every=max(1, args.steps // 10), log=log)
  extra = dict(data=args.data, steps=args.steps, batch=args.batch, seed=args.seed,
               train_s=time.perf_counter() - start, first_loss=losses[0],
               final_loss=float(np.mean(losses[-max(1, len(losses) // 20):])),
               loss_curve=[float(np.mean(losses[i:i + 20])) for i in range(0, len(losses), 20)])
  return model, params, extra


def compare(model, params, args, log) -> tuple[list[dict], dict]:
  """Samples every method from the same noise; rows and ``{name: images}``."""
  schedule = diffusion.linear_schedule()
  noise = diffusion.initial_noise(model, jax.random.key(args.seed), args.samples)
  labels = jnp.arange(args.samples, dtype=jnp.int32) % model.num_classes
  kw = dict(steps=args.ddim_steps, guidance=args.guidance)
  layers = tuple(range(model.depth))
  # name -> (method, setting, jitted sampler, capacities)
  methods = {"baseline": ("baseline", "", diffusion.make_sampler(model, schedule, **kw), None)}
  for tau in args.taus:
    cfg = MergeConfig(tau=tau, layers=layers, mode="exact", bucket_step=args.bucket_step)
    start = time.perf_counter()
    _, _, caps, sampler = diffusion.sample_exact(model.clone(merge=cfg), params, noise,
                                                 labels, schedule, **kw)
    log(f"  tau={tau}: exact capacities {caps} ({time.perf_counter() - start:.1f} s)")
    methods[f"mame_mare_tau{tau}"] = ("mame_mare", f"tau={tau}", sampler, caps)
  for ratio in args.ratios:
    methods[f"tome_sd_{ratio}"] = ("tome_sd", f"ratio={ratio}", diffusion.make_sampler(
        model.clone(merge=ToMeSDConfig(ratio=ratio, seed=args.seed)), schedule, **kw), None)

  fns = {name: (m[2], (params, noise, labels)) for name, m in methods.items()}
  times = timing.time_interleaved(fns, rounds=args.rounds, warmup=1)
  rows, samples = [], {}
  for name, (method, setting, sampler, caps) in methods.items():
    images, stats = jax.device_get(sampler(params, noise, labels))
    samples[name] = np.asarray(images)
    n = model.num_tokens
    attended = [_attended(model, method, setting, caps)] * model.depth if caps is None else [
        n // 2 + c for c in caps]                  # M = floor(n / 2) destinations + c
    rows.append(dict(
        method=method, setting=setting, capacities=None if caps is None else list(caps),
        tokens_input=n, tokens_real=float(np.mean(stats["tokens"])),
        tokens_per_block=np.asarray(stats["tokens"]).mean(0).tolist(),
        tokens_attended=float(np.mean(attended)),
        dropped=int(np.asarray(stats.get("dropped", 0)).sum()),
        latency_ms=times[name].median_ms, iqr_ms=1e3 * times[name].iqr_s,
        compile_s=times[name].compile_s,
        **quality.summary(samples[name], samples["baseline"])))
  for row in rows:
    row["measured_speedup"] = rows[0]["latency_ms"] / row["latency_ms"]
    row["tau"] = float(row["setting"].split("=")[1]) if row["method"] == "mame_mare" else None
  return rows, samples


def _attended(model, method: str, setting: str, caps) -> int:
  """The static length attention runs on without MaMe capacities: ToMe-SD removes
  ``r = int(L ratio)``, clipped to its sources (every token but one per 2 x 2 window)."""
  n = model.num_tokens
  if method != "tome_sd":
    return n
  r = num_to_merge(n, float(setting.split("=")[1]))
  return n - min(r, n - (model.grid // 2) ** 2)


def save_grids(out: pathlib.Path, samples: dict, rows: list[dict], images, columns: int):
  """``samples.png`` (a row of samples per method, named on the left) and
  ``training_data.png``."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  out.mkdir(parents=True, exist_ok=True)
  names = list(samples)
  fig, axes = plt.subplots(len(names), 1, figsize=(columns * 0.5 + 2, 0.6 * len(names) + 0.4))
  for ax, name, row in zip(np.atleast_1d(axes), names, rows):
    ax.imshow(image_grid(samples[name], columns), cmap="gray", vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])
    label = name if row["method"] == "baseline" else (
        f"{row['method']} {row['setting']}\nPSNR {row['psnr']:.1f} SSIM {row['ssim']:.2f}")
    ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
  fig.tight_layout()
  fig.savefig(out / "samples.png", dpi=100)
  plt.close(fig)
  plt.imsave(out / "training_data.png", image_grid(images[:40], 20), cmap="gray", vmin=0,
             vmax=1)


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help=f"CPU settings: {QUICK['steps']} steps, width {QUICK['width']}, "
                           f"depth {QUICK['depth']}")
  parser.add_argument("--data", default="digits", help="'digits' or 'tfds:NAME[:SPLIT]'")
  parser.add_argument("--limit", type=int, default=20000, help="tfds images read at most")
  parser.add_argument("--image-size", type=int, default=32)
  parser.add_argument("--channels", type=int, default=1, choices=(1, 3))
  parser.add_argument("--num-classes", type=int, default=10)
  parser.add_argument("--patch-size", type=int, default=4)
  parser.add_argument("--width", type=int, default=None)
  parser.add_argument("--depth", type=int, default=None)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--steps", type=int, default=None, help="training steps")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--checkpoint", default=None, help="a dit.save file: skip training")
  parser.add_argument("--out", default="results/dit_digits",
                      help="folder for dit.npz, samples.png, training_data.png")
  parser.add_argument("--samples", type=int, default=None)
  parser.add_argument("--ddim-steps", type=int, default=None)
  parser.add_argument("--guidance", type=float, default=1.0)
  parser.add_argument("--taus", nargs="+", type=float, default=[0.6, 0.7, 0.8, 0.9, 0.95])
  parser.add_argument("--ratios", nargs="+", type=float, default=[0.25, 0.5])
  parser.add_argument("--bucket-step", type=int, default=8)
  parser.add_argument("--rounds", type=int, default=None)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", default=None, help="write the results here")
  args = parser.parse_args(argv)
  preset = QUICK if args.quick else FULL
  for name in ("steps", "width", "depth", "samples", "ddim_steps", "rounds"):
    if getattr(args, name) is None:
      setattr(args, name, preset[name])

  start = time.perf_counter()
  out = pathlib.Path(args.out)
  images, labels = load_images(args.data, args.image_size, args.channels, args.num_classes,
                               args.limit)
  print(f"data {args.data}: {images.shape} images, {len(np.unique(labels))} classes")
  if args.checkpoint:
    model, params, extra = dit.load(args.checkpoint)
    print(f"loaded {args.checkpoint}: DiT({model.config()})")
  else:
    model, params, extra = train_model(args, images, labels, print)
    out.mkdir(parents=True, exist_ok=True)
    dit.save(out / "dit.npz", model, params, extra)
    print(f"trained {args.steps} steps in {extra['train_s']:.0f} s (loss {extra['first_loss']:.3f}"
          f" -> {extra['final_loss']:.3f}); saved {out / 'dit.npz'}")
  rows, samples = compare(model, params, args, print)
  print(timing.format_table(rows, COLUMNS), flush=True)
  save_grids(out, samples, rows, images, min(args.samples, 20))
  result = dict(
      command="python -m benchmarks.dit_digits " + shlex.join(argv),
      device=device_info(), versions=versions(), date=timing.today(), quick=args.quick,
      model=model.config(), training=extra, data=args.data,
      checkpoint=args.checkpoint or str(out / "dit.npz"),
      sampling=dict(sampler="DDIM eta=0", steps=args.ddim_steps, guidance=args.guidance,
                    samples=args.samples, seed=args.seed,
                    labels="0, 1, ..., num_classes - 1, 0, ...",
                    merge_layers="every block", mame_mode="exact",
                    bucket_step=args.bucket_step, tome_sd="2 x 2 windows, random destinations"),
      grids=[str(out / "samples.png"), str(out / "training_data.png")],
      total_s=time.perf_counter() - start, rows=rows)
  if args.json:
    write_json(args.json, result)
    print(f"wrote {args.json}")
  return result


SECTION_COLUMNS = ["method", "setting", "tokens_real", "tokens_attended", "psnr", "ssim",
                   "latency_ms", "measured_speedup"]


def section(path="results/dit_digits.json") -> list[str]:
  """The BENCHMARKS.md section rendered from the committed JSON (nothing when
  there is none)."""
  path = pathlib.Path(path)
  if not path.exists():
    return []
  run = json.loads(path.read_text())
  tr, sm = run["training"], run["sampling"]
  note = (" Timed on a CPU shared with other processes: read the ratios, not the "
          "milliseconds." if run["device"]["platform"] == "cpu" else "")
  lines = ["", "## A trained DiT: baseline, MaMe + MaRe, ToMe-SD from the same noise", "",
           f"`{run['command']}` -- {run['device']['description']}, {run['date']} (`{path}`).",
           "",
           f"DiT({', '.join(f'{k}={v}' for k, v in run['model'].items())}) trained "
           f"{tr.get('steps')} steps on `{tr.get('data')}` (loss {tr.get('first_loss', 0):.3f}"
           f" -> {tr.get('final_loss', 0):.3f}, {tr.get('train_s', 0):.0f} s); "
           f"{sm['samples']} samples, {sm['sampler']}, {sm['steps']} steps, guidance "
           f"{sm['guidance']}; merging in every block. PSNR / SSIM: each method's samples "
           f"against the baseline's from the same noise; `tokens_real`: real tokens the "
           f"blocks attended (of {run['rows'][0]['tokens_input']}); latency: the whole "
           f"sampler.{note}", "",
           weights_line("trained", "the DiT is trained by this command on the digits "
                        "above; the samples and PSNR / SSIM are that model's."), "",
           timing.format_table(run["rows"], SECTION_COLUMNS), ""]
  best = [r for r in run["rows"] if r["method"] == "mame_mare"]
  if len(best) >= 2:
    lo, hi = min(best, key=lambda r: r["tau"]), max(best, key=lambda r: r["tau"])
    trend = "rises" if hi["psnr"] > lo["psnr"] else "does NOT rise"
    lines.append(f"- PSNR {trend} with tau: {lo['psnr']:.1f} dB at tau={lo['tau']} -> "
                 f"{hi['psnr']:.1f} dB at tau={hi['tau']} (the paper: a higher tau gives a "
                 f"picture closer to the baseline).")
  same = [r for r in run["rows"][1:] if r["tokens_attended"] == run["rows"][0]["tokens_attended"]
          and abs(r["measured_speedup"] - 1) > 0.2]
  if same:
    lines.append(f"- Timing noise: {', '.join(r['method'] + ' ' + r['setting'] for r in same)} "
                 f"attended as many tokens as the baseline yet timed "
                 f"{min(r['measured_speedup'] for r in same):.2f}-"
                 f"{max(r['measured_speedup'] for r in same):.2f}x its speed: the latencies of "
                 f"this run are not a speed measurement.")
  slower = [r for r in run["rows"][1:] if r["measured_speedup"] < 1]
  if slower:
    lines.append(f"- Slower than the baseline in this run: "
                 f"{', '.join(r['method'] + ' ' + r['setting'] for r in slower)} (at "
                 f"{run['rows'][0]['tokens_input']} tokens there is little attention to save; "
                 f"the speed figures are `benchmarks/generation.py`'s, at 1024-9216 tokens).")
  lines += [f"- Grids: {', '.join(f'`{g}`' for g in run['grids'])}.", ""]
  return lines


if __name__ == "__main__":
  main()
