"""Source tracking: which original patches every token holds after every block.

A merge layer is a linear map from the tokens that enter it to the tokens that
leave it. This module writes that map down as a *transition* matrix
``T (B, L_in, L_out)`` -- row ``k``: where input token ``k`` goes -- and
chains the transitions from the patches to every block's output.

MaMe (eq. 9): fused destination ``i`` is
``(x_dst_i + sum_j WF_ij x_src_j) / (1 + sum_j WF_ij)``. Its transition has

    T[dst_i -> slot(i)] = 1,          T[src_j -> slot(i)] = WF_ij   (merged j)
    T[k -> slot(k)] = 1               (special tokens, preserved sources)

and zero rows for padded inputs and for preserved sources dropped by a too-small
capacity (``mode="fixed"``). ToMe: ``T[k -> record.source[k]] = 1``.

From the transitions come two maps, both built by matrix products:

* **membership** ``soft (B, P, L)``: the share of patch ``p`` held by token
  ``t``. Every patch starts as one unit of mass in its own token; a
  destination, a preserved source or a special token hands on all of its mass;
  a merged source ``j`` splits its mass over the destinations in proportion to
  ``WF_ij``, normalised to add up to one, ``WF_ij / sum_i' WF_i'j`` (eq. 8
  normalises the same column up to ``eps``, so the shares are ``WF_ij`` but
  for terms of order ``eps``). With that normalisation every row of
  ``T`` adds up to one, and therefore so does every patch's row of ``soft``, at
  every layer: ``soft_l = soft_{l-1} @ rownorm(T_l)``. The one exception is
  fixed capacities (``mode="fixed"``): a patch loses whatever share a dropped
  token held, so its row adds up to less than one, and to zero (``hard`` -1)
  when every token holding it was dropped.
* **mixing** ``(B, L, P)``: the share of token ``t``'s value that comes from
  patch ``p``, following the merge's own averaging. For MaMe that is eq. (9)'s
  weights, the columns of ``T`` normalised (``1 / (1 + sum_j WF_ij)`` and
  ``WF_ij / (1 + sum_j WF_ij)``): ``mixing_l = colnorm(T_l)^T @ mixing_{l-1}``.
  For ToMe the average is size-weighted (``merge_wavg``), which makes a merged
  token the plain mean of its patches. Every real non-special token's row adds
  up to one; special tokens and padding have zero rows. If the blocks were only
  the merges (no attention, no MLP), token ``t`` would *be*
  ``mixing[t] @ patches`` -- the test suite checks exactly that.

The two differ because MaMe's average is not size-weighted: a destination that
absorbs a big merged token gives each of that token's patches a small weight in
``mixing`` while each of them still counts fully in ``soft``.

**hard** ``(B, P)`` int32: the token holding the largest share of each patch
(``argmax_t soft``; ties go to the lower index), an index into the block's
output sequence (class token included, so the first patch token is
``num_special``), or -1 for a dropped patch. Every real token holds at least
one patch outright (a destination keeps its own input token's patches with
share exactly 1), so the number of distinct hard labels equals the number of
real non-special tokens: ``aux["tokens_per_block"] - num_special``. Groups need
not nest from one layer to the next: a patch split 0.6 / 0.4 may change its
largest holder later.

Everything is a pure function of arrays with static shapes: it runs under
``jax.jit`` and on batches, and padded output slots hold no patch.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from mame_jax.merge import MergeInfo
from mame_jax.models.merging import (DiffRateConfig, EViTConfig, MergeConfig, ToMeConfig,
                                     merge_records)
from mame_jax.tome import ToMeRecord

_HIGHEST = jax.lax.Precision.HIGHEST  # no TF32: shares must add up to one


@flax.struct.dataclass
class SourceMap:
  """Where the patches are after one block.

  Attributes:
    soft: (B, P, L) float32, membership: share of patch ``p`` held by token
      ``t``; each patch's row adds up to 1 (less when dropped tokens held part
      of it, fixed capacities only).
    hard: (B, P) int32, the token holding the largest share of each patch, an
      index into the block's output tokens; -1 for a dropped patch.
    mixing: (B, L, P) float32, share of token ``t``'s value that comes from
      patch ``p`` (eq. 9 for MaMe, ToMe's size-weighted mean for ToMe); each
      real non-special token's row adds up to 1.
    token_mask: (B, L) bool, the block's real output tokens.
    num_special: leading tokens that hold no patch (the class token); static.
    grid: ``(h, w)`` patch grid of the image, row-major like the patch
      sequence -- ``(t, h, w)`` tubelets of a video (VideoMAE: time slowest) --
      or ``None`` when unknown; static.
  """

  soft: jax.Array
  hard: jax.Array
  mixing: jax.Array
  token_mask: jax.Array
  num_special: int = flax.struct.field(pytree_node=False, default=0)
  grid: Optional[tuple] = flax.struct.field(pytree_node=False, default=None)

  @property
  def num_groups(self) -> jax.Array:
    """(B,) int32: tokens that are the largest holder of at least one patch."""
    held = jax.nn.one_hot(self.hard, self.token_mask.shape[1], dtype=jnp.bool_).any(axis=1)
    return held.sum(-1).astype(jnp.int32)

  @property
  def num_tokens(self) -> jax.Array:
    """(B,) int32: real output tokens, special ones included (what the model
    reports in ``aux["tokens_per_block"]``)."""
    return self.token_mask.sum(-1).astype(jnp.int32)


def identity_map(batch: int, num_patches: int, num_special: int = 0,
                 grid: Optional[tuple] = None) -> SourceMap:
  """The map before any block: patch ``p`` is token ``num_special + p``."""
  length = num_special + num_patches
  eye = jnp.eye(num_patches, length, k=num_special, dtype=jnp.float32)
  eye = jnp.broadcast_to(eye, (batch, num_patches, length))
  hard = jnp.broadcast_to(num_special + jnp.arange(num_patches, dtype=jnp.int32),
                          (batch, num_patches))
  return SourceMap(soft=eye, hard=hard, mixing=jnp.swapaxes(eye, 1, 2),
                   token_mask=jnp.ones((batch, length), bool), num_special=num_special,
                   grid=None if grid is None else tuple(int(g) for g in grid))


def mame_transition(info: MergeInfo) -> jax.Array:
  """``T (B, L_in, L_out)`` of one ``mame`` call (see the module docstring):
  one for a token handed on whole, ``WF_ij`` from merged source ``j`` to
  destination ``i``'s slot, zero rows for padding and dropped tokens."""
  ns, m = info.num_special, info.num_dst
  out_len = info.token_mask.shape[1]
  dtype = info.fusion.dtype
  # Pool entries [special | destinations | sources] that reach the output.
  slots = jnp.arange(out_len)
  whole = ((info.position[..., None] == slots) & (info.position[..., None] >= 0)).astype(dtype)
  # A merged source lands where its destinations land. Preserved sources have
  # zero fusion columns, so they only keep their `whole` row, and vice versa.
  merged = jnp.einsum("bmn,bmo->bno", info.fusion, whole[:, ns:ns + m], precision=_HIGHEST)
  pool = whole.at[:, ns + m:].add(merged)
  t = jnp.take_along_axis(pool, info.origin[..., None], axis=1)
  return t * info.input_mask[..., None].astype(dtype)


def tome_transition(record: ToMeRecord) -> jax.Array:
  """``T (B, L_in, L_out)`` of one ToMe step: one-hot rows of ``record.source``.
  Also EViT's and DiffRate's records (``mame_jax.evit``, ``mame_jax.diffrate``):
  ``source = -1`` (a pruned token) gives a zero row, and an EViT ``weight``
  (the class attention a fused token carries) scales its row."""
  t = jax.nn.one_hot(record.source, record.num_out, dtype=jnp.float32)
  weight = getattr(record, "weight", None)
  return t if weight is None else t * weight[..., None].astype(jnp.float32)


def _normalise_by(a, total):
  return jnp.where(total > 0, a / jnp.where(total > 0, total, 1), 0)


def _normalise(a, axis):
  return _normalise_by(a, a.sum(axis=axis, keepdims=True))


def advance(smap: SourceMap, transition: jax.Array, token_mask: jax.Array, *,
            size_weighted: bool = False) -> SourceMap:
  """The map after a merge with ``transition (B, L_in, L_out)``.

  Args:
    smap: the map at the merge's input (its ``L`` is ``L_in``).
    transition: from :func:`mame_transition` or :func:`tome_transition`.
    token_mask: (B, L_out) bool, the merge's real output tokens.
    size_weighted: the merge averages tokens weighted by their sizes, as ToMe's
      ``merge_wavg`` does, so every token is the plain mean of its patches and
      ``mixing`` is ``soft``'s columns normalised (exact for transitions whose
      rows are one-hot, like ToMe's). MaMe's eq. (9) is not size-weighted.
  """
  t = transition.astype(jnp.float32)
  soft = jnp.einsum("bpk,bko->bpo", smap.soft, _normalise(t, -1), precision=_HIGHEST)
  if size_weighted:
    mixing = _normalise(jnp.swapaxes(soft, 1, 2), -1)
  else:
    # Eq. (9) averages with T's columns normalised. Dividing after the product
    # gives the same numbers and compiles much faster on CPU than before it.
    mixing = jnp.einsum("bko,bkp->bop", t, smap.mixing, precision=_HIGHEST)
    mixing = _normalise_by(mixing, t.sum(1)[..., None])
  return smap.replace(soft=soft, hard=_largest_holder(soft), mixing=mixing,
                      token_mask=jnp.asarray(token_mask, bool))


def _largest_holder(soft):
  return jnp.where(soft.max(-1) > 0, jnp.argmax(soft, axis=-1), -1).astype(jnp.int32)


def track(smap: SourceMap, merge_aux: dict) -> SourceMap:
  """Advances ``smap`` through one block, given the block's merge aux
  (``{"info": MergeInfo}``, ``{"record": ToMeRecord}`` or ``{}`` for none)."""
  if "info" in merge_aux:
    info = merge_aux["info"]
    return advance(smap, mame_transition(info), info.token_mask)
  if "record" in merge_aux:
    record = merge_aux["record"]
    mask = jnp.ones(record.source.shape[:1] + (record.num_out,), bool)
    return advance(smap, tome_transition(record), mask,
                   size_weighted=getattr(record, "size_weighted", True))
  return smap


def source_maps(aux: dict, merge=None) -> list[SourceMap]:
  """One :class:`SourceMap` per block, read from a ViT's ``aux``.

  Args:
    aux: the ``aux`` a ``mame_jax.models.vit`` model (or :class:`mame_jax.Runner`)
      returned: it needs ``stem`` (B, h, w, D), ``block00`` ... with their
      ``merge`` entries, and ``block00/+sa`` for the sequence length. A VideoMAE
      (``mame_jax.models.videomae``) ``aux`` works too: its ``stem`` is
      ``(B, t, h, w, D)``, patch ``p`` is tubelet ``p`` in ``(t, y, x)`` order and
      ``grid`` is ``(t, h, w)``.
    merge: optionally the model's merge config (``MergeConfig`` /
      ``ToMeConfig``): then a block that should have merged but left no record
      in ``aux`` is an error rather than a block that merged nothing.

  Returns:
    ``maps[i]`` describes the tokens leaving block ``i`` (``len(maps)`` is the
    depth). Works under ``jax.jit``.
  """
  blocks = sorted(k for k in aux if k.startswith("block") and k[5:].isdigit())
  if not blocks or "stem" not in aux:
    raise ValueError("aux must come from a mame_jax.models.vit model: it needs 'stem' and "
                     f"'block00', ...; got keys {sorted(aux)[:8]}")
  batch, *grid, _ = aux["stem"].shape  # (B, h, w, D), or (B, t, h, w, D) for video
  length = aux[blocks[0]]["+sa"].shape[1]
  _check_records(aux, blocks, merge)
  records = merge_records(aux)
  return _track_blocks(records, batch, tuple(grid), length - math.prod(grid))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _track_blocks(records, batch, grid, num_special):
  # One compiled program for all blocks: eagerly, every small op would compile
  # on its own. Under an outer jit this is simply inlined.
  smap = identity_map(batch, math.prod(grid), num_special, grid=grid)
  maps = []
  for merge_aux in records:
    smap = track(smap, merge_aux)
    maps.append(smap)
  return maps


def _check_records(aux, blocks, merge):
  if merge is None:
    return
  depth = len(blocks)
  if isinstance(merge, MergeConfig):
    want, key = ([l for l in merge.layers if l < depth] if merge.active else []), "info"
  elif isinstance(merge, ToMeConfig):
    layers = range(depth) if merge.layers is None else merge.layers
    want, key = ([l for l in layers if l < depth] if merge.r else []), "record"
  elif isinstance(merge, (EViTConfig, DiffRateConfig)):
    # A block whose kept count is everything leaves no record: nothing to demand.
    want, key = [], "record"
  else:
    raise TypeError(f"merge must be a MergeConfig, ToMeConfig, EViTConfig or DiffRateConfig; "
                    f"got {type(merge).__name__}")
  for layer in want:
    if key not in merge_records(aux)[layer]:
      raise ValueError(f"block {layer} should merge under {merge} but aux holds no "
                       f"'{key}' record for it: was aux made by a model with this config?")


def grid_shape(num_patches: int) -> tuple[int, int]:
  """``(side, side)`` for a square number of patches."""
  side = math.isqrt(num_patches)
  if side * side != num_patches:
    raise ValueError(f"{num_patches} patches do not form a square grid; pass grid=(h, w)")
  return side, side
