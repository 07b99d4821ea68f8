"""Training a ViT with MaMe in the loop (the paper's from-scratch setting).

    python train.py --data imagenette --variant Ti/16 --num-classes 1000 --steps 10000
    python train.py --data photos-labelled --variant Ti/16 --image-size 64 --steps 50   # smoke run

The model merges in fixed mode (DESIGN §3): MaMe after attention in blocks 3, 6
and 9 (``--merge-layers``) at ``tau = 0.5`` with capacity 0 (``--capacity``), so
each merge halves the tokens (2:1) and preserved tokens beyond the capacity are
dropped -- the paper's own choice for training, counted and logged as
``dropped``. The merge is differentiable, so gradients flow through the fusion
weights into every block. AdamW (optax) with a cosine schedule and warm-up,
softmax cross-entropy on integer labels; one jitted step.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mame_jax import MergeConfig
from mame_jax.models.merging import merge_records
from mame_jax.models import vit
from mame_jax.eval.data import PHOTOS, Loader, array_source, load_image, load_source, preprocess_fn


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
          log=print):
  """Runs ``steps`` steps over ``batches`` (an iterable of ``(images, labels)``,
  cycled). Returns ``(params, history)``, history a list of per-step metrics."""
  tx = optimizer(learning_rate, steps)
  opt_state = tx.init(params)
  step = make_step(model, tx)
  rng = jax.random.key(seed)
  history, it = [], iter(())
  for i in range(steps):
    try:
      images, labels = next(it)
    except StopIteration:
      it = iter(batches)
      images, labels = next(it)
    rng, sub = jax.random.split(rng)
    params, opt_state, metrics = step(params, opt_state, images, labels, sub)
    metrics = jax.tree.map(np.asarray, metrics)
    history.append(metrics)
    if log and (i % log_every == 0 or i == steps - 1):
      log(f"step {i:5d}  loss {float(metrics['loss']):.4f}  acc {float(metrics['accuracy']):.3f}"
          f"  dropped {int(metrics['dropped'])}  tokens/block {np.round(metrics['tokens'], 1)}")
  return params, history


class _Epochs:
  """Re-iterable ``(images, labels)`` batches of a data source (valid rows only)."""

  def __init__(self, source, preprocess, batch_size):
    self.source, self.preprocess, self.batch_size = source, preprocess, batch_size

  def __iter__(self):
    for batch in Loader(self.source, self.preprocess, self.batch_size, warn=False):
      if batch.valid.all():
        yield jnp.asarray(batch.images), jnp.asarray(batch.labels)


def labelled_photos():
  """Each skimage.data photograph is its own class: a tiny dataset for smoke runs."""
  images = [((load_image(n, 256) + 1) * 127.5).round().astype(np.uint8) for n in PHOTOS[:6]]
  return array_source(images, list(range(len(images))), name="photos-labelled")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", default="photos-labelled",
                      help="a tfds name, a folder of class folders, or photos-labelled")
  parser.add_argument("--variant", default="Ti/16")
  parser.add_argument("--num-classes", type=int, default=6)
  parser.add_argument("--image-size", type=int, default=224)
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--steps", type=int, default=100)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--tau", type=float, default=0.5)
  parser.add_argument("--merge-layers", type=int, nargs="*", default=[3, 6, 9])
  parser.add_argument("--capacity", type=int, default=0,
                      help="preserved tokens kept per merge (0: 2:1 reduction)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  layers = tuple(l for l in args.merge_layers)
  merge = MergeConfig(tau=args.tau, layers=layers, mode="fixed",
                      capacities=(args.capacity,) * len(layers)) if layers else None
  model = vit.Model(args.num_classes, variant=args.variant, pool_type="tok", merge=merge)
  if merge is not None and max(layers) >= model.depth:
    parser.error(f"--merge-layers {layers} beyond the model's {model.depth} blocks")
  source = labelled_photos() if args.data == "photos-labelled" else load_source(args.data)
  batches = _Epochs(source, preprocess_fn("big_vision", args.image_size), args.batch_size)
  x = jnp.zeros((1, args.image_size, args.image_size, 3))
  params = jax.jit(model.init)(jax.random.key(args.seed), x)["params"]
  print(f"training ViT-{args.variant} on {source.name} ({len(source)} images), MaMe fixed mode "
        f"in blocks {layers} at tau={args.tau}, capacity {args.capacity}")
  train(model, params, batches, steps=args.steps, learning_rate=args.lr, seed=args.seed)
  return 0


if __name__ == "__main__":
  sys.exit(main())
