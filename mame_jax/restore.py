"""MaRe: matrix-based token restoration (Algorithm 2, eqs. 11-13).

MaRe maps a merged sequence (typically after attention) back to the length and
order of the sequence that went into ``mame``, using the merge record:

    R_i = 1 + sum_j W^F_ij
    destination i:      x_i = y_i / R_i                          (12)
    merged source j:    x_j = sum_i (W^F_ij / R_i) y_i           (11)
    preserved source j, special tokens: copied back              (13)

Restoration conserves mass: per sample, the restored tokens sum to the merged
tokens' sum, because each fused destination's value is split into shares
1/R_i and W^F_ij/R_i that add up to one. With nothing merged it is the identity.
Preserved sources dropped by a too-small capacity have nothing to be restored
from and come back as zeros (``info.dropped`` counts them).

:func:`copy_back` is the other way to restore, ToMe-SD's "unmerge": no shares,
every token receives a whole output (for comparisons with ToMe-SD).

:func:`restore` undoes a *stack* of merges -- every merge block of a ViT, last
first -- with either method; it reads MaMe's records and ToMe's, so a dense head
(saliency, segmentation) gets its full token grid back whichever merge ran.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mame_jax.merge import MergeInfo, check_tokens, compute_dtype
from mame_jax.tome import ToMeRecord, unmerge

# How a merged sequence is put back: MaRe's shares (eqs. 11-13), or copy-back.
RESTORES = ("mare", "copy")


def mare(y, info: MergeInfo) -> jax.Array:
  """Restores ``y`` (B, L_out, D) merged by ``mame`` to (B, L, D).

  Args:
    y: (B, L_out, D) tokens laid out as ``mame`` returned them (any features:
      ``D`` need not match the merged input's, e.g. attention outputs).
    info: the :class:`~mame_jax.merge.MergeInfo` of that ``mame`` call.

  Returns:
    (B, L, D) in ``y.dtype``, every token back at its original position;
    padded input positions are zero.
  """
  _check_args(y, info)
  return _restore(y, info, False)


def copy_back(y, info: MergeInfo) -> jax.Array:
  """Restores ToMe-SD's way (its ``unmerge``): ``y`` (B, L_out, D) -> (B, L, D).

  No mass is split: a destination gets its own output ``y_i`` (not ``y_i / R_i``),
  preserved sources and special tokens get their own, and a merged source ``j``
  receives its destination's output: an exact copy when eq. (7) left it one
  destination, and when it went into several, the mix
  ``sum_i W^F_ij y_i / sum_i W^F_ij`` of their outputs (its own fusion weights,
  normalised to sum to one). Same arguments, checks and padding rules as
  :func:`mare`.
  """
  _check_args(y, info)
  return _restore(y, info, True)


def restore(y, records, method: str = "mare") -> jax.Array:
  """Undoes a stack of merges: ``y`` (B, L_k, D) -> (B, L_0, D).

  Args:
    y: the tokens after the last merge of the stack (any features ``D``).
    records: the merge records in the order the merges ran, each a
      :class:`~mame_jax.merge.MergeInfo` (MaMe) or a
      :class:`~mame_jax.tome.ToMeRecord` (ToMe); ``None`` entries (blocks that
      did not merge) are skipped. ``merging.merge_records`` reads them from a
      ViT's ``aux``.
    method: "mare" or "copy", applied to every record, last first:

      * MaMe: :func:`mare` (eqs. 11-13) or :func:`copy_back`;
      * ToMe: its own unmerge (every input token gets a copy of the token it was
        merged into) for "copy"; for "mare" the same, divided by the number of
        input tokens that output token absorbed -- MaRe's split with the unit
        weights of ToMe's matching, so the mass is conserved as well.

  Returns:
    (B, L_0, D) in ``y.dtype``: every token of the first merge's input at its
    position. With MaRe the per-sample sum of the tokens is conserved; copy-back
    gives a token that was never merged exactly its own output.
  """
  if method not in RESTORES:
    raise ValueError(f"method must be one of {RESTORES}; got {method!r}")
  for k, record in reversed(list(enumerate(records))):
    if record is None:
      continue
    if isinstance(record, MergeInfo):
      y = (mare if method == "mare" else copy_back)(y, record)
    elif isinstance(record, ToMeRecord):
      y = _tome_restore(y, record, method == "mare")
    else:
      raise TypeError(f"records[{k}] must be a MergeInfo, a ToMeRecord or None; "
                      f"got {type(record).__name__}")
  return y


def _tome_restore(y, record, split):
  if split:  # each output's share: 1 / (input tokens it holds)
    count = jax.vmap(lambda s: jnp.zeros((record.num_out,), jnp.float32).at[s].add(1.0))(
        record.source)
    y = (y.astype(compute_dtype(y.dtype)) / count[..., None]).astype(y.dtype)
  return unmerge(record, y)


def _check_args(y, info):
  check_tokens(y, "y")
  if not isinstance(info, MergeInfo):
    raise TypeError(f"info must be the MergeInfo returned by mame; got {type(info).__name__}")
  if tuple(y.shape[:2]) != tuple(info.token_mask.shape):
    raise ValueError(f"y must have shape (B, L_out, D) with (B, L_out) = "
                     f"{tuple(info.token_mask.shape)} from info; got {tuple(y.shape)}")


@functools.partial(jax.jit, static_argnums=2)
def _restore(y, info, copy):
  ns, m = info.num_special, info.num_dst
  dtype = compute_dtype(y.dtype)
  yc = y.astype(dtype)
  fusion = info.fusion.astype(dtype)

  # Read every pool entry [special | destinations | sources] from its output slot.
  present = info.position >= 0
  pool_y = jnp.take_along_axis(yc, jnp.maximum(info.position, 0)[..., None], axis=1)
  pool_y = jnp.where(present[..., None], pool_y, 0)
  y_dst, y_src = pool_y[:, ns:ns + m], pool_y[:, ns + m:]

  if copy:
    # Column-normalised weights: a merged source's column sums to 1 - O(eps) after
    # eq. (8); dividing by the exact sum makes a single destination an exact copy.
    col = fusion.sum(1, keepdims=True)
    share = fusion / jnp.where(col > 0, col, 1)
    x_dst = y_dst
  else:
    share = fusion / (1 + fusion.sum(-1, keepdims=True))    # W^F_ij / R_i
    x_dst = y_dst / (1 + fusion.sum(-1, keepdims=True))     # (12)
  x_src = jnp.einsum("bmn,bmd->bnd", share, y_dst)          # (11)
  x_src = jnp.where(present[:, ns + m:, None], y_src, x_src)  # preserved: copied

  pool = jnp.concatenate([pool_y[:, :ns], x_dst, x_src], axis=1)
  x = jnp.take_along_axis(pool, info.origin[..., None], axis=1)   # (13) original order
  return jnp.where(info.input_mask[..., None], x, 0).astype(y.dtype)
