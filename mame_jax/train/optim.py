"""The optimiser and the loss: optax AdamW, warm-up + cosine, clipping, a
weight-decay mask, label smoothing and mixup."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def schedule(lr: float, total_steps: int, warmup_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 to ``lr`` over ``warmup_steps``, then cosine decay to
  0 at ``total_steps`` (``warmup_steps=0``: cosine from the first step)."""
  total_steps, warmup_steps = int(total_steps), int(warmup_steps)
  if warmup_steps < 0 or total_steps < 1:
    raise ValueError(f"total_steps must be >= 1 and warmup_steps >= 0; got "
                     f"{total_steps} and {warmup_steps}")
  decay = optax.cosine_decay_schedule(lr, max(total_steps - warmup_steps, 1))
  if warmup_steps == 0:
    return decay
  warmup = optax.linear_schedule(0.0, lr, warmup_steps)
  return optax.join_schedules([warmup, decay], [warmup_steps])


def decay_mask(params):
  """True for the leaves weight decay applies to: the matmul and conv
  ``kernel`` s. Norm scales, biases, position embeddings, the class token and
  the MAP probe are left alone (decaying them pulls the model towards
  meaningless zeros: big_vision's and timm's rule)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def optimizer(*, lr: float, total_steps: int, warmup_steps: int, wd: float,
              grad_clip: float = 1.0):
  """``(tx, schedule)``: global-norm clipping (``grad_clip`` > 0), then AdamW
  with :func:`schedule` and decoupled weight decay ``wd`` on :func:`decay_mask`."""
  sched = schedule(lr, total_steps, warmup_steps)
  parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip and grad_clip > 0 else []
  parts.append(optax.adamw(sched, weight_decay=wd, mask=decay_mask))
  return optax.chain(*parts), sched


def soft_targets(labels, num_classes: int, smoothing: float = 0.0):
  """``(B,)`` integer labels -> ``(B, C)`` smoothed one-hot targets."""
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  return optax.smooth_labels(onehot, smoothing) if smoothing else onehot


def mixup(rng, images, targets, alpha: float):
  """Mixup (Zhang et al. 2018): each batch blends with itself reversed by one
  ``lam ~ Beta(alpha, alpha)`` (big_vision's form). ``images (B, H, W, 3)``,
  ``targets (B, C)``; ``alpha <= 0`` returns them unchanged."""
  if alpha <= 0:
    return images, targets
  lam = jax.random.beta(rng, alpha, alpha)
  mix = lambda a: lam * a + (1.0 - lam) * jnp.flip(a, axis=0)
  return mix(images), mix(targets)


def loss_fn(logits, targets):
  """Mean softmax cross-entropy of ``logits (B, C)`` against soft ``targets``."""
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()
