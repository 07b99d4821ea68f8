"""Training a ViT with MaMe in the loop (the paper's from-scratch setting).

    python train.py --data imagenette --variant Ti/16 --num-classes 1000 --steps 10000
    python train.py --config my_config.py --config.train.lr=3e-4 --workdir /tmp/run1
    python train.py --image-size 64 --steps 50   # smoke run: each skimage photograph a class

Settings are one ``ml_collections.ConfigDict``: ``common.train_config()`` of
``mame_jax.configs`` (``model``, ``merge``, ``input``, ``train``), then
``--config FILE.py[:arg]``, then ``--config.a.b=value`` overrides, then the
short flags (``--steps`` is ``train.steps``, ...). ``--workdir DIR`` writes the
resolved config (``config.json``) and every step's metrics (``metrics.jsonl``);
there is no checkpointing yet.

The model merges in fixed mode: MaMe after attention in blocks 3, 6
and 9 (``merge.layers``) at ``tau = 0.5`` with capacity 0 (``merge.capacity``), so
each merge halves the tokens (2:1) and preserved tokens beyond the capacity are
dropped -- the paper's own choice for training, counted and logged as
``dropped``. The merge is differentiable, so gradients flow through the fusion
weights into every block. AdamW (optax) with a cosine schedule and warm-up,
softmax cross-entropy on integer labels; one jitted step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mame_jax import MergeConfig
from mame_jax.cli import flags as flags_lib
from mame_jax.configs import common
from mame_jax.eval.data import (PHOTOS, Loader, array_source, load_image, load_source,
                                preprocess_fn, preprocess_for)
from mame_jax.models.merging import merge_records, parse_layers
from mame_jax.models.vit import image_size_of


def make_step(model, tx):
  """One jitted AdamW step: ``(params, opt_state, images, labels, rng) ->
  (params, opt_state, metrics)``."""

  def loss_fn(params, images, labels, rng):
    logits, aux = model.apply({"params": params}, images, train=True, rngs={"dropout": rng})
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    dropped = sum(r["info"].dropped.sum() for r in merge_records(aux) if "info" in r)
    return loss, {"loss": loss, "dropped": dropped,
                  "accuracy": (logits.argmax(-1) == labels).mean(),
                  "tokens": aux["tokens_per_block"].mean(0)}

  @jax.jit
  def step(params, opt_state, images, labels, rng):
    grads, metrics = jax.grad(loss_fn, has_aux=True)(params, images, labels, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  return step


def optimizer(learning_rate=1e-3, steps=1000, warmup=None, weight_decay=0.05):
  warmup = max(1, steps // 10) if warmup is None else warmup
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, max(steps, warmup + 1))
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, weight_decay=weight_decay))


def train(model, params, batches, *, steps, learning_rate=1e-3, seed=0, log_every=10,
          log=print, warmup=None, weight_decay=0.05, on_step=None):
  """Runs ``steps`` steps over ``batches`` (an iterable of ``(images, labels)``,
  cycled). Returns ``(params, history)``, history a list of per-step metrics;
  ``on_step(i, metrics)`` sees each step's as it comes (the metrics log)."""
  tx = optimizer(learning_rate, steps, warmup, weight_decay)
  opt_state = tx.init(params)
  step = make_step(model, tx)
  rng = jax.random.key(seed)
  history, it = [], iter(())
  for i in range(steps):
    try:
      images, labels = next(it)
    except StopIteration:
      it = iter(batches)
      try:
        images, labels = next(it)
      except StopIteration:
        raise ValueError("no full batch to train on: the batch size is larger than the "
                         "data (set --batch-size / input.batch_size)") from None
    rng, sub = jax.random.split(rng)
    params, opt_state, metrics = step(params, opt_state, images, labels, sub)
    metrics = jax.tree.map(np.asarray, metrics)
    history.append(metrics)
    if on_step is not None:
      on_step(i, metrics)
    if log and (i % log_every == 0 or i == steps - 1):
      log(f"step {i:5d}  loss {float(metrics['loss']):.4f}  acc {float(metrics['accuracy']):.3f}"
          f"  dropped {int(metrics['dropped'])}  tokens/block {np.round(metrics['tokens'], 1)}")
  return params, history


class _Epochs:
  """Re-iterable ``(images, labels)`` batches of a data source (valid rows only)."""

  def __init__(self, source, preprocess, batch_size, limit=None):
    self.source, self.preprocess, self.batch_size = source, preprocess, batch_size
    self.limit = limit

  def __iter__(self):
    for batch in Loader(self.source, self.preprocess, self.batch_size, limit=self.limit,
                        warn=False):
      if batch.valid.all():
        yield jnp.asarray(batch.images), jnp.asarray(batch.labels)


def labelled_photos():
  """Each skimage.data photograph is its own class: a tiny dataset for smoke runs."""
  images = [((load_image(n, 256) + 1) * 127.5).round().astype(np.uint8) for n in PHOTOS[:6]]
  return array_source(images, list(range(len(images))), name="photos-labelled")


def parse(argv=None):
  """``train.py`` arguments -> ``(config, workdir)``: the resolved config
  (``common.train_config`` < ``--config`` < ``--config.a.b=v`` < short flags)
  and ``--workdir`` (``None``: write nothing). Exits 2 on a bad argument."""
  s = argparse.SUPPRESS
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   argument_default=s)
  flags_lib.add_config_flag(parser)
  parser.add_argument("--workdir", default=None,
                      help="write the resolved config (config.json) and the metrics of "
                           "every step (metrics.jsonl) here")
  parser.add_argument("--checkpoint", help="model.checkpoint: start from these weights")
  parser.add_argument("--data", help="input.data: a tfds name, a folder of class folders, "
                                     "or photos-labelled")
  parser.add_argument("--variant", help="model.variant, e.g. Ti/16")
  parser.add_argument("--num-classes", type=int, help="model.num_classes")
  parser.add_argument("--image-size", type=int, help="model.image_size")
  parser.add_argument("--batch-size", type=int, help="input.batch_size")
  parser.add_argument("--steps", type=int, help="train.steps")
  parser.add_argument("--lr", type=float, help="train.lr: peak learning rate")
  parser.add_argument("--tau", type=float, help="merge.tau")
  parser.add_argument("--merge-layers", nargs="*",
                      help="merge.layers: blocks that merge, e.g. 3 6 9 or 3,6,9 (none: "
                           "no merge)")
  parser.add_argument("--capacity", type=int,
                      help="merge.capacity: preserved tokens kept per merge (0: 2:1 "
                           "reduction)")
  parser.add_argument("--seed", type=int, help="train.seed")
  shorthands = {
      "checkpoint": "model.checkpoint", "data": "input.data", "variant": "model.variant",
      "num_classes": "model.num_classes", "image_size": "model.image_size",
      "batch_size": "input.batch_size", "steps": "train.steps", "lr": "train.lr",
      "tau": "merge.tau", "capacity": "merge.capacity", "seed": "train.seed",
      "merge_layers": lambda config, layers: flags_lib.set_field(
          config, "merge.layers", ",".join(layers)),
  }
  config, args = flags_lib.resolve("train.py", parser, argv, common.train_config(),
                                   shorthands)
  try:
    parse_layers(config.merge.layers or "")
  except ValueError as e:
    parser.error(f"--merge-layers (merge.layers): {e}")
  return config, args.workdir


class _MetricsLog:
  """``workdir/metrics.jsonl``: one JSON object per step (what ``train`` logs)."""

  def __init__(self, path):
    self.file = open(path, "w")

  def __call__(self, step, metrics):
    row = {"step": step, **{k: np.asarray(v).tolist() for k, v in metrics.items()}}
    self.file.write(json.dumps(row) + "\n")
    self.file.flush()

  def close(self):
    self.file.close()


def _preprocess(kind, model):
  return preprocess_for(model) if kind in (None, "auto") else kind


def main(argv=None) -> int:
  config, workdir = parse(argv)
  m, mc, inp, tc = config.model, config.merge, config.input, config.train
  layers = parse_layers(mc.layers or "") or ()
  merge = MergeConfig(tau=mc.tau, layers=layers, mode="fixed",
                      capacities=(mc.capacity,) * len(layers)) if layers else None
  try:
    model, params = flags_lib.load_model_from(config, merge=merge, seed=tc.seed,
                                              require=False)
    if merge is not None and max(layers) >= model.depth:
      raise ValueError(f"--merge-layers (merge.layers) {layers} beyond the model's "
                       f"{model.depth} blocks")
    source = labelled_photos() if inp.data == "photos-labelled" else load_source(
        inp.data, split=inp.split, data_dir=inp.data_dir,
        label_map=flags_lib.label_map_from(inp.label_map))
  except (ValueError, FileNotFoundError) as e:
    print(f"train.py: error: {e}", file=sys.stderr)
    return 2
  size = m.image_size or image_size_of(model, params)
  batches = _Epochs(source, preprocess_fn(_preprocess(m.preprocess, model), size),
                    inp.batch_size, limit=inp.limit)
  log = None
  if workdir:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2) + "\n")
    log = _MetricsLog(os.path.join(workdir, "metrics.jsonl"))
  what = m.checkpoint or f"ViT-{m.variant}"
  print(f"training {what} on {source.name} ({len(source)} images), MaMe fixed mode "
        f"in blocks {layers} at tau={mc.tau}, capacity {mc.capacity}")
  try:
    train(model, params, batches, steps=tc.steps, learning_rate=tc.lr, seed=tc.seed,
          log_every=tc.log_every, warmup=tc.warmup, weight_decay=tc.weight_decay,
          on_step=log)
  except ValueError as e:
    print(f"train.py: error: {e}", file=sys.stderr)
    return 2
  finally:
    if log is not None:
      log.close()
  if workdir:
    print(f"wrote {workdir}/config.json and {workdir}/metrics.jsonl")
  return 0


if __name__ == "__main__":
  sys.exit(main())
