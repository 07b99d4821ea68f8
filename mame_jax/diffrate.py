"""DiffRate, a baseline: prune by class attention, then merge, to a given schedule
of token counts (Chen et al., "DiffRate: Differentiable Compression Rate for
Efficient Vision Transformers", ICCV 2023), inference only, as pure JAX functions.

A schedule gives every block two counts, both counting the class token (DiffRate's
own convention: 197 is every token of a ViT-*/16 at 224 px): ``prune[i] >=
merge[i]``, and ``merge[i] >= prune[i + 1]``. In block ``i``, after attention (on
``x + MSA(LN(x))``, before the MLP), for a sequence ``[cls, t_1, ..., t_n]``:

1. **Sort** every token after the class token by the class token's attention to
   it (its softmax row averaged over heads), largest first; sizes move with
   their tokens.
2. **Prune**: keep the first ``p = prune[i]`` tokens (class token included).
3. **Merge** to ``m = merge[i]`` tokens: the first ``m`` are the destinations, the
   other ``p - m`` the sources. Each source goes to its most similar destination
   by the cosine similarity of the tokens themselves (never to the class token).
   A destination becomes the plain mean of itself and the sources it receives
   (PyTorch's ``scatter_reduce(..., "mean")``, which counts the destination
   once: it is not size-weighted), and its size grows by each source's size
   times that source's best similarity -- DiffRate's own rule, so a poorly
   matched source adds less than its patches. Destinations keep their order.

Sizes feed proportional attention (``log(size)`` added to the logits) in every
block, as DiffRate's attention always does. The similarity-scaled sizes can in
principle fall to zero or below (a negative best similarity); this follows the
reference, which does not clamp them at inference.

A block whose counts remove nothing (``p`` and ``m`` both at least the current
length) is the identity: DiffRate still sorts there, but the sort changes no value
(attention does not depend on token order, and the next compressing block sorts
again), so it is skipped and an identity schedule gives exactly the plain model.

Counts are static Python ints, so every shape is known at trace time: one compiled
program. The selection and the matching are discrete (no gradient through them,
as in DiffRate's ``no_grad``); the merged values and sizes are differentiable.
Ties (equal attention, equal similarity) go to the earlier token.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


@flax.struct.dataclass
class DiffRateRecord:
  """What one DiffRate step decided.

  Attributes:
    order: ``(B, L)`` int32, the input positions in sorted order (class token first).
    source: ``(B, L)`` int32, for every input token the output token it ends up
      in, ``-1`` when pruned.
    num_out: the output length ``merge`` count (static).
  """

  order: jax.Array
  source: jax.Array
  num_out: int = flax.struct.field(pytree_node=False)

  # A destination is the plain mean of itself and its sources, not size-weighted
  # (mame_jax.vis.sources reads this).
  size_weighted = False


def _check(x, cls_attn, size):
  if x.ndim != 3:
    raise ValueError(f"x must be (B, L, D); got shape {x.shape}")
  if cls_attn.shape != x.shape[:2]:
    raise ValueError(f"cls_attn must be (B, L) = {x.shape[:2]} (the class token's "
                     f"attention row over all tokens); got {cls_attn.shape}")
  if size is not None and size.shape != x.shape[:2]:
    raise ValueError(f"size must be (B, L) = {x.shape[:2]}; got {size.shape}")


def diffrate(x: jax.Array, cls_attn: jax.Array, size: jax.Array | None, prune: int,
             merge: int, *, num_special: int = 1
             ) -> tuple[jax.Array, jax.Array, DiffRateRecord | None]:
  """One DiffRate step (see the module docstring).

  Args:
    x: ``(B, L, D)``, class token first.
    cls_attn: ``(B, L)``, the class token's attention row averaged over heads.
    size: ``(B, L)`` token sizes (``None``: all ones).
    prune, merge: the block's counts, class token included (static ints,
      ``1 <= merge <= prune``). Counts above ``L`` mean "no change" for that step.
    num_special: the leading tokens never sorted, pruned or merged into: the class
      token, then any registers (DINOv2-reg). The counts include them, so
      ``merge >= num_special``.

  Returns:
    ``(y (B, m, D), size (B, m), record)`` with ``m = min(L, prune, merge)``;
    ``(x, size, None)`` when nothing is removed.
  """
  _check(x, cls_attn, size)
  b, length, _ = x.shape
  ns = int(num_special)
  if not max(1, ns) <= int(merge) <= int(prune):
    raise ValueError(f"DiffRate counts need {max(1, ns)} <= merge <= prune (the special "
                     f"tokens stay); got prune={prune}, merge={merge}")
  p = min(length, int(prune))
  m = min(p, int(merge))
  if size is None:
    size = jnp.ones((b, length), jnp.float32)
  if m == length:
    return x, size, None
  # 1. Sort by the class token's attention (the special tokens stay first).
  rank = jnp.argsort(-jax.lax.stop_gradient(cls_attn[:, ns:]).astype(jnp.float32),
                     axis=1, stable=True) + ns
  order = jnp.concatenate([jnp.broadcast_to(jnp.arange(ns, dtype=rank.dtype), (b, ns)),
                           rank], axis=1).astype(jnp.int32)
  xs = jnp.take_along_axis(x, order[..., None], axis=1)
  ss = jnp.take_along_axis(size, order, axis=1)
  # 2. Prune.
  xs, ss = xs[:, :p], ss[:, :p]
  # 3. Merge the last p - m into the first m.
  slot = jnp.where(jnp.arange(length) < m, jnp.arange(length), -1)
  slot = jnp.broadcast_to(slot, (b, length)).astype(jnp.int32)   # sorted position -> output
  if m < p:
    metric = jax.lax.stop_gradient(xs).astype(jnp.float32)
    norm = jnp.linalg.norm(metric, axis=-1, keepdims=True)
    metric = metric / jnp.where(norm > 0, norm, 1)
    sim = jnp.einsum("bsd,btd->bst", metric[:, m:], metric[:, :m], precision=_HIGHEST)
    sim = sim.at[:, :, :ns].set(-jnp.inf)   # never into the class token or a register
    best = jnp.argmax(sim, axis=-1)        # (B, p - m), the first best on ties
    best_sim = jnp.max(sim, axis=-1)
    onehot = jax.nn.one_hot(best, m, dtype=jnp.float32)            # (B, p - m, m)
    count = 1.0 + onehot.sum(1)                                    # (B, m)
    total = xs[:, :m].astype(jnp.float32) + jnp.einsum(
        "bsm,bsd->bmd", onehot, xs[:, m:].astype(jnp.float32), precision=_HIGHEST)
    ys = (total / count[..., None]).astype(x.dtype)
    ss = ss[:, :m] + jnp.einsum("bsm,bs->bm", onehot, ss[:, m:] * best_sim,
                                precision=_HIGHEST)
    slot = slot.at[:, m:p].set(best.astype(jnp.int32))
  else:
    ys = xs
  # Back from sorted positions to input positions.
  source = jnp.zeros((b, length), jnp.int32).at[jnp.arange(b)[:, None], order].set(slot)
  return ys, ss, DiffRateRecord(order=order, source=source, num_out=m)
