"""ToMe-SD, the generation baseline (Bolya & Hoffman, "Token Merging for Fast
Stable Diffusion", 2023), as pure JAX functions.

ToMe-SD merges the tokens of an ``h x w`` grid before a block's attention and
copies the outputs back after it (its ``unmerge``), so the block keeps its
length. The rules of its ``bipartite_soft_matching_random2d``:

1. Destinations: the grid is cut into ``sy x sx`` windows (rows of height
   ``sy``, columns of width ``sx``), ``(h // sy) * (w // sx)`` of them; one token
   per window is a destination -- at a random place in the window (one draw per
   window, shared by the batch) or, without randomness, its top-left corner.
   Every other token is a source, also those in the leftover rows and columns
   when ``sy`` or ``sx`` does not divide the grid.
2. Each source scores every destination by cosine similarity of the metric
   (ToMe-SD: the normed hidden states themselves) and keeps its best one.
3. The ``r`` sources with the highest best score merge (``r`` is clipped to the
   number of sources; ToMe-SD sets ``r = int(L * ratio)``); each destination
   becomes the plain mean of itself and the sources merged into it (its
   ``scatter_reduce(..., "mean")``, no size weighting).
4. Output: ``[unmerged sources | destinations]``, length ``L - r``. Unmerge:
   a destination and an unmerged source get their own output, a merged source a
   copy of its destination's output.

Choices where the reference leaves room, each tested: unmerged sources keep
their raster order (ToMe-SD orders them by score; attention does not care), and
destinations come in raster order; ties go to the earlier token (the first best
destination, and among equal scores the earlier source merges first); a
zero-norm metric has similarity 0 to everything, never NaN. The matching carries
no gradient (ToMe-SD runs it under ``no_grad``); the merge and unmerge do.
``r``, the grid and the window are static, so every shape is known when tracing.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from typing import Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp

from mame_jax import tome as tome_lib
from mame_jax.merge import check_tokens


@flax.struct.dataclass
class ToMeSDRecord:
  """One matching, enough to merge and to unmerge (``tome.unmerge`` reads it).

  Positions index the input sequence of length ``L = h * w`` (raster order).

  Attributes:
    dst_pos: (M,) int32, the destinations, in raster order (shared by the batch).
    unm_idx: (B, U) int32, the sources that stay, ascending.
    src_idx: (B, r) int32, the sources that merge, by decreasing score.
    dst_idx: (B, r) int32, the destination each of them merges into.
    source: (B, L) int32, the output slot every input token ends in:
      ``[unmerged sources (U) | destinations (M)]``, ``L_out = U + M = L - r``.
  """

  dst_pos: jax.Array
  unm_idx: jax.Array
  src_idx: jax.Array
  dst_idx: jax.Array
  source: jax.Array

  @property
  def r(self) -> int:
    """Tokens removed (static)."""
    return self.src_idx.shape[-1]

  @property
  def num_out(self) -> int:
    """Output length ``L - r`` (static)."""
    return self.source.shape[-1] - self.r


def _static_int(value, name, low):
  if isinstance(value, bool):
    raise ValueError(f"{name} must be a static int >= {low}; got {value!r}")
  try:
    value = operator.index(value)
  except TypeError as e:
    raise ValueError(f"{name} must be a static int >= {low} (mark it static under jit); "
                     f"got {type(value).__name__} {value!r}") from e
  if value < low:
    raise ValueError(f"{name} must be a static int >= {low}; got {value}")
  return value


def num_to_merge(length: int, ratio: float) -> int:
  """ToMe-SD's ``r = int(L * ratio)`` (clipped to the sources by the matching)."""
  if not 0 <= ratio <= 1:
    raise ValueError(f"ratio must be in [0, 1]; got {ratio!r}")
  return int(length * ratio)


def window_choice(key, h, w, sx=2, sy=2) -> jax.Array:
  """(h // sy, w // sx) int32: the place of each window's destination,
  ``dy * sx + dx`` in ``[0, sx * sy)``: random with ``key``, else 0 (top left)."""
  shape = (h // sy, w // sx)
  if key is None:
    return jnp.zeros(shape, jnp.int32)
  return jax.random.randint(key, shape, 0, sx * sy, dtype=jnp.int32)


def destination_mask(choice, h, w, sx=2, sy=2) -> jax.Array:
  """(h * w,) bool, the destinations of rule 1 given :func:`window_choice`."""
  hs, ws = h // sy, w // sx
  rows = jnp.arange(hs)[:, None] * sy + choice // sx
  cols = jnp.arange(ws)[None, :] * sx + choice % sx
  return jnp.zeros((h, w), bool).at[rows, cols].set(True).reshape(-1)


def bipartite_soft_matching_random2d(metric, h: int, w: int, *, r: int, sx: int = 2,
                                     sy: int = 2, key=None) -> ToMeSDRecord:
  """ToMe-SD's matching on ``metric`` (B, h * w, C); removes ``r`` tokens.

  Args:
    metric: (B, L, C) features to match on, ``L = h * w`` in raster order.
    h, w: the token grid (static).
    r: static int >= 0, tokens to remove; clipped to the number of sources.
    sx, sy: window width and height (static, >= 1; ``sx * sy >= 2``).
    key: PRNG key for random destinations; ``None`` uses every window's top left.
  """
  b, l, _ = check_tokens(metric, "metric")
  h, w = _static_int(h, "h", 1), _static_int(w, "w", 1)
  sx, sy = _static_int(sx, "sx", 1), _static_int(sy, "sy", 1)
  r = _static_int(r, "r", 0)
  if h * w != l:
    raise ValueError(f"metric must hold h * w = {h} * {w} = {h * w} tokens; got L = {l}")
  if sx > w or sy > h or sx * sy < 2:
    raise ValueError(f"the window sx x sy = {sx} x {sy} must fit the grid h x w = {h} x {w} "
                     f"and hold at least two tokens")
  num_dst = (h // sy) * (w // sx)
  return _match(metric, h, w, sx, sy, min(r, l - num_dst), key)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _match(metric, h, w, sx, sy, r, key):
  b, l, _ = metric.shape
  is_dst = destination_mask(window_choice(key, h, w, sx, sy), h, w, sx, sy)
  num_dst = (h // sy) * (w // sx)
  order = jnp.argsort(~is_dst, stable=True).astype(jnp.int32)  # [dst | src], raster
  dst_pos, src_pos = order[:num_dst], order[num_dst:]

  m = jax.lax.stop_gradient(metric).astype(jnp.promote_types(metric.dtype, jnp.float32))
  norm = jnp.linalg.norm(m, axis=-1, keepdims=True)
  m = m / jnp.where(norm > 0, norm, 1)  # zero norm: similarity 0, not NaN
  scores = jnp.einsum("bnc,bmc->bnm", m[:, src_pos], m[:, dst_pos],
                      precision=jax.lax.Precision.HIGHEST)   # (B, N, M)
  best = scores.max(-1)
  best_dst = scores.argmax(-1).astype(jnp.int32)             # first best on ties
  rank = jnp.argsort(-best, axis=-1, stable=True).astype(jnp.int32)
  merged, kept = rank[:, :r], jnp.sort(rank[:, r:], axis=-1)
  n_unm = kept.shape[1]

  rows = jnp.arange(b)[:, None]
  dst_of = jnp.take_along_axis(best_dst, merged, axis=1)    # (B, r) index in dst
  source = jnp.zeros((b, l), jnp.int32)
  source = source.at[rows, src_pos[kept]].set(jnp.arange(n_unm, dtype=jnp.int32))
  source = source.at[:, dst_pos].set(n_unm + jnp.arange(num_dst, dtype=jnp.int32))
  source = source.at[rows, src_pos[merged]].set(n_unm + dst_of)
  return ToMeSDRecord(dst_pos=dst_pos, unm_idx=src_pos[kept], src_idx=src_pos[merged],
                      dst_idx=dst_pos[dst_of], source=source)


def merge(record: ToMeSDRecord, x) -> jax.Array:
  """Rule 3: (B, L, D) -> (B, L - r, D), every output the plain mean of the
  tokens that end in it (a destination and its merged sources)."""
  b, l, _ = check_tokens(x)
  if (b, l) != tuple(record.source.shape):
    raise ValueError(f"x has (B, L) = {(b, l)} but the record was built for "
                     f"{tuple(record.source.shape)}")
  return _merge(record, x)


@jax.jit
def _merge(record, x):
  b = x.shape[0]
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  rows = jnp.arange(b)[:, None]
  total = jnp.zeros((b, record.num_out, x.shape[-1]), dtype).at[rows, record.source].add(
      x.astype(dtype))
  count = jnp.zeros((b, record.num_out), dtype).at[rows, record.source].add(1)
  return (total / count[..., None]).astype(x.dtype)


def unmerge(record: ToMeSDRecord, y) -> jax.Array:
  """Rule 4: (B, L - r, D) -> (B, L, D), a copy of the output each token ended in
  (``mame_jax.tome.unmerge``, which reads only ``source`` and ``num_out``)."""
  return tome_lib.unmerge(record, y)


def tome_sd(attend: Callable, x, h: int, w: int, *, ratio: float = 0.5, sx: int = 2,
            sy: int = 2, key=None, metric=None, return_record: bool = False):
  """``unmerge(attend(merge(x)))``: ToMe-SD around a token mixer.

  Args:
    attend: ``attend(tokens (B, L', D), token_mask (B, L') bool) -> (B, L', D')``
      (the mask is all True: ToMe-SD never pads).
    x: (B, h * w, D) tokens in raster order.
    h, w: the token grid.
    ratio: fraction of all tokens merged away, ``r = int(L * ratio)``.
    sx, sy, key: the destination windows (see the module docstring).
    metric: (B, L, C) features to match on; ``None`` uses ``x``.

  Returns:
    (B, L, D'); with ``return_record`` ``(out, record)``.
  """
  b, l, _ = check_tokens(x)
  record = bipartite_soft_matching_random2d(x if metric is None else metric, h, w,
                                            r=num_to_merge(l, ratio), sx=sx, sy=sy, key=key)
  if record.r == 0:
    out = attend(x, jnp.ones((b, l), bool))
  else:
    y = merge(record, x)
    out = unmerge(record, attend(y, jnp.ones(y.shape[:2], bool)))
  return (out, record) if return_record else out


@dataclasses.dataclass(frozen=True)
class ToMeSDConfig:
  """ToMe-SD in a generation block stack (``mame_jax.models.dit_blocks``).

  Attributes:
    ratio: fraction of the tokens merged away in each merging block.
    layers: the merging blocks; ``None`` means every block.
    sx, sy: destination window (ToMe-SD's default 2 x 2).
    grid: the token grid ``(h, w)``; ``None``: square, ``h = w = sqrt(L)``.
    random: random destinations (a fresh draw per block, from ``seed`` folded
      with the block index) or top-left ones.
    seed: seeds the random destinations.
  """

  ratio: float = 0.5
  layers: Optional[tuple] = None
  sx: int = 2
  sy: int = 2
  grid: Optional[tuple] = None
  random: bool = True
  seed: int = 0

  def __post_init__(self):
    num_to_merge(1, self.ratio)
    if self.layers is not None:
      object.__setattr__(self, "layers", tuple(int(v) for v in self.layers))
    if self.grid is not None:
      object.__setattr__(self, "grid", tuple(int(v) for v in self.grid))

  def grid_of(self, length: int) -> tuple:
    if self.grid is not None:
      return self.grid
    side = math.isqrt(length)
    if side * side != length:
      raise ValueError(f"ToMeSDConfig.grid is needed for a sequence of {length} tokens "
                       f"(not a square grid): pass grid=(h, w)")
    return side, side

  def merges(self, layer: int) -> bool:
    return self.ratio > 0 and (self.layers is None or layer in self.layers)

  def __call__(self, attend, x, *, layer):
    """``tome_sd(attend, x)`` in merging blocks, ``attend(x)`` elsewhere."""
    if not self.merges(layer):
      return attend(x, jnp.ones(x.shape[:2], bool)), {}
    h, w = self.grid_of(x.shape[1])
    key = jax.random.fold_in(jax.random.key(self.seed), layer) if self.random else None
    out, record = tome_sd(attend, x, h, w, ratio=self.ratio, sx=self.sx, sy=self.sy,
                          key=key, return_record=True)
    return out, {"record": record}
