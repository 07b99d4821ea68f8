"""EViT, a baseline: keep the patch tokens the class token attends to most and fuse
the rest into one (Liang et al., "Not All Patches are What You Need", ICLR 2022),
training-free, as pure JAX functions.

One EViT step, in a block after attention (on ``x + MSA(LN(x))``, before the MLP),
for a sequence ``[cls, t_1, ..., t_n]`` of length ``L = n + 1``:

1. ``a_j``: the class token's attention to ``t_j``, the softmax row of the class
   query over all ``L`` keys, averaged over heads (the class token's own column
   is left out, so the ``a_j`` sum to less than one).
2. Keep the ``k = ceil(keep_rate * n)`` tokens with the largest ``a_j``, in
   decreasing order of ``a_j`` (EViT's ``topk(..., sorted=True)``).
3. With ``fuse=True`` the other ``n - k`` tokens become one token
   ``sum_j a_j t_j`` -- EViT weighs by the attention itself and does not
   renormalise, so this is not a mean -- appended after the kept ones.
4. Output ``[cls, kept (k), fused]``: length ``k + 2`` (``k + 1`` without
   fusing). In a later EViT block the fused token is a patch token like the
   others: it may be kept, or fused again.

When ``k == n`` nothing changes (EViT returns the block's input unchanged).
``k`` is a static Python int, so every shape is known at trace time: one compiled
program. The selection is a discrete choice (no gradient through the ranking);
the kept tokens and the fused token are differentiable in ``x`` and in ``a``.

Choices where the reference leaves room, each tested:

- Ties in ``a_j`` keep the earlier token first (``jax.lax.top_k``); PyTorch's
  ``topk`` promises no order among ties.
- The fused token sums its sources in position order (EViT's ``complement_idx``
  sorts them); the order only changes float rounding.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class EViTRecord:
  """What one EViT step decided, enough to apply it again and to track sources.

  Attributes:
    keep_idx: ``(B, k)`` int32, input positions of the kept patch tokens in their
      output order (decreasing class attention); output slot ``s + i`` holds
      input token ``keep_idx[:, i]`` (``s`` special tokens: the class token and
      any registers, which stay first and unchanged).
    source: ``(B, L)`` int32, for every input token the output token it ends up
      in: its own slot for a special token, ``s + i`` for kept tokens, ``s + k``
      for fused ones (``-1`` when they are discarded, ``fuse=False``).
    weight: ``(B, L)`` float32, the weight each input token has in its output
      token: 1 for the special and kept tokens, ``a_j`` for fused ones, 0 for
      discarded ones.
    num_out: the output length (static).
  """

  keep_idx: jax.Array
  source: jax.Array
  weight: jax.Array
  num_out: int = flax.struct.field(pytree_node=False)

  # A fused token is an attention-weighted sum, not a size-weighted mean
  # (mame_jax.vis.sources reads this).
  size_weighted = False


def keep_count(num_tokens: int, keep_rate: float) -> int:
  """EViT's kept count ``ceil(keep_rate * n)`` for ``n`` patch tokens (the
  class token not counted; a fused token from an earlier block counted)."""
  if not 0 < keep_rate <= 1:
    raise ValueError(f"keep_rate must be in (0, 1]; got {keep_rate!r}")
  return min(int(num_tokens), math.ceil(keep_rate * int(num_tokens)))


def _check(x, cls_attn, num_special=1):
  if x.ndim != 3:
    raise ValueError(f"x must be (B, L, D); got shape {x.shape}")
  if num_special < 1:
    raise ValueError(f"EViT needs a class token first: num_special >= 1; got {num_special}")
  if x.shape[1] < num_special + 1:
    raise ValueError(f"EViT needs the {num_special} special token(s) and at least one patch "
                     f"token; got L={x.shape[1]}")
  if cls_attn.shape != x.shape[:2]:
    raise ValueError(f"cls_attn must be (B, L) = {x.shape[:2]} (the class token's "
                     f"attention row over all tokens); got {cls_attn.shape}")


def evit(x: jax.Array, cls_attn: jax.Array, keep: int, *, fuse: bool = True,
         num_special: int = 1) -> tuple[jax.Array, EViTRecord | None]:
  """One EViT step.

  Args:
    x: ``(B, L, D)``, class token first.
    cls_attn: ``(B, L)``, the class token's attention row averaged over heads
      (its attention to the special tokens is not used).
    keep: patch tokens kept (static), ``1 <= keep <= L - num_special``; see
      :func:`keep_count`.
    fuse: fuse the others into one token (EViT's ``--fuse_token``), else drop them.
    num_special: the leading tokens that are never ranked, dropped or fused: the
      class token, then any registers (DINOv2-reg), kept first and unchanged.

  Returns:
    ``(y (B, num_special + keep + fuse, D), record)``; ``(x, None)`` unchanged when
    ``keep == L - num_special``.
  """
  _check(x, cls_attn, num_special)
  ns = int(num_special)
  n = x.shape[1] - ns
  keep = int(keep)
  if not 1 <= keep <= n:
    raise ValueError(f"keep must be in [1, {n}] for {n} patch tokens; got {keep}")
  if keep == n:
    return x, None
  a = cls_attn[:, ns:].astype(jnp.float32)                      # (B, n)
  _, top = jax.lax.top_k(jax.lax.stop_gradient(a), keep)        # (B, k), largest first
  patches = x[:, ns:]
  kept = jnp.take_along_axis(patches, top[..., None], axis=1)   # (B, k, D)
  is_kept = jnp.zeros(a.shape, bool).at[jnp.arange(a.shape[0])[:, None], top].set(True)
  slot = jnp.zeros(a.shape, jnp.int32).at[jnp.arange(a.shape[0])[:, None], top].set(
      jnp.arange(ns, ns + keep, dtype=jnp.int32))
  parts = [x[:, :ns], kept]
  if fuse:
    w = jnp.where(is_kept, 0.0, a)
    fused = jnp.einsum("bn,bnd->bd", w, patches.astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
    parts.append(fused[:, None].astype(x.dtype))
    rest, rest_w = ns + keep, a
  else:
    rest, rest_w = -1, jnp.zeros_like(a)
  source = jnp.where(is_kept, slot, rest)
  weight = jnp.where(is_kept, 1.0, rest_w)
  b = x.shape[0]
  record = EViTRecord(
      keep_idx=top.astype(jnp.int32) + ns,
      source=jnp.concatenate([jnp.broadcast_to(jnp.arange(ns, dtype=jnp.int32), (b, ns)),
                              source], axis=1),
      weight=jnp.concatenate([jnp.ones((b, ns), jnp.float32), weight], axis=1),
      num_out=ns + keep + int(fuse))
  return jnp.concatenate(parts, axis=1), record
