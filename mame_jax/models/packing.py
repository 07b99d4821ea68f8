"""Packed execution: the token-wise layers of a block run on the real tokens only.

After a merge, a batch is padded: each row holds its real tokens first, then
zeros up to the longest row (``token_mask (B, L)`` marks the real ones). The
LayerNorms, the QKV and output projections and the MLP work token by token, so
nothing forces them onto the padding: with ``MergeConfig(execution="packed")``
each block gathers the batch's real tokens into one flat buffer ``(T, D)`` of a
static size ``T`` (a bucketed total of the real tokens, ``MergeConfig.
packed_sizes``), runs those layers on it, and scatters the results back.
Attention alone keeps the padded ``(B, L, ...)`` layout (each image attends
within its own row, and the fused kernel takes the row lengths), so the program
pays for ``T`` tokens in the matmuls instead of ``B * L``.

A buffer smaller than the batch's real tokens would lose tokens: the runner's
exact mode counts the real tokens after every merge layer
(``aux["tokens_per_block"]``) and re-runs a batch whose total exceeded its
buffer with a larger one (``eval.runner``), as it does for capacities. Slots of
the buffer beyond the real tokens point past the end: gathers read zeros there
and scatters drop them.
"""

from __future__ import annotations

import jax.numpy as jnp


def index(token_mask, size: int):
  """``(size,)`` int32: the row-major flat positions ``b * L + l`` of the real
  tokens of ``token_mask (B, L)``, first to last, then ``B * L`` (past the end)
  in the unused slots. Real tokens beyond ``size`` are not listed."""
  flat = token_mask.reshape(-1)
  (idx,) = jnp.nonzero(flat, size=size, fill_value=flat.shape[0])
  return idx.astype(jnp.int32)


def pack(x, token_mask, size):
  """``x (B, L, D)`` -> ``(flat (T, D), where)``: the real tokens of ``token_mask``
  in a buffer of ``size`` slots, and ``where = (idx, (B, L))`` to put results
  back with :func:`unpack`. ``size`` or ``token_mask`` ``None``: ``(x, None)``,
  nothing packed."""
  if size is None or token_mask is None:
    return x, None
  idx = index(token_mask, size)
  return gather(x, idx), (idx, x.shape[:2])


def unpack(values, where):
  """:func:`pack`'s inverse for any per-token ``values (T, ...)``: ``(B, L, ...)``
  with zeros at the padding; ``where=None`` returns ``values`` as they are."""
  return values if where is None else scatter(values, *where)


def gather(x, idx):
  """``x (B, L, ...)`` -> ``(T, ...)``: the tokens at ``idx``; zeros past the end."""
  flat = x.reshape((-1,) + x.shape[2:])
  return jnp.take(flat, idx, axis=0, mode="fill", fill_value=0)


def scatter(values, idx, batch_length):
  """``values (T, ...)`` -> ``(B, L, ...)`` with ``batch_length = (B, L)``: each row
  back at its position ``idx``, zeros elsewhere (slots past the end are dropped)."""
  b, l = batch_length
  out = jnp.zeros((b * l,) + values.shape[1:], values.dtype)
  return out.at[idx].set(values, mode="drop").reshape((b, l) + values.shape[1:])
