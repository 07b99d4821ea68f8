"""MaMe: matrix-based token merging (Sec. 3 of the paper, eqs. 1-10).

Everything here is a pure function of arrays, so it works under ``jax.jit``,
``jax.vmap`` and ``jax.grad``. Shapes use these letters:

    B  batch            L   tokens in        D   features
    M  destinations     N   sources          c   capacity (preserved slots kept)

With ``L' = L - num_special`` mergeable tokens, ``M = floor(L'/2)`` and
``N = ceil(L'/2)`` (every partition has these sizes). The output has
``num_special + M + c`` tokens: the special tokens, the fused destinations, then
the preserved sources in their original order, then padding. ``info.token_mask``
marks the real ones; padding is always zero and always last.

Padding is invisible: with ``token_mask`` the partition is made over the real
tokens only (the k-th real token plays the role the k-th token would play in an
unpadded sequence), padded tokens have zero similarity to everything, and they
never become sources, destinations or preserved tokens. Special tokens are
always treated as real.

The record (:class:`MergeInfo`) keeps everything restoration (``mare``) and
source tracking need. Its *pool* is the list ``[special | destinations |
sources]`` (``L`` entries): ``origin`` says which pool entry each input token
is, ``source`` which pool entry each output token comes from.
"""

from __future__ import annotations

import functools
import math
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

PARTITIONS = ("alternating", "sequential", "random")
# Whose preserved sources a sample keeps: "batch", the paper's rule (a source
# preserved in any sample is preserved in every sample, jnp.any over the batch),
# or "sample" (each sample its own, eqs. 1-10 applied to it alone).
PRESERVE = ("batch", "sample")
# What happens to a sample's preserved sources beyond the capacity: "drop" them
# (counted in info.dropped) or "merge" them (the static budget: the least unique
# -- highest best similarity -- go into their most similar destination, counted
# in info.forced).
SURPLUS = ("drop", "merge")
SIMILARITIES = ("cosine", "dot")


@flax.struct.dataclass
class MergeInfo:
  """The merge record of one ``mame`` call (a pytree; ``num_special`` is static).

  Attributes:
    fusion: (B, M, N) the final fusion weights W^F (eq. 8) after the causal
      mask and the preservation correction ``W^F *= 1 - m``.
    preserved: the preservation mask m: (N,) bool with ``preserve="batch"`` (OR
      over the samples), (B, N) with ``preserve="sample"`` (each sample's own).
    num_preserved: () int32, r: the most preserved sources any sample has (the
      capacity needed to drop nothing). Equals ``preserved.sum()`` without padding.
    overflow: () bool, ``num_preserved > capacity``: preserved tokens were dropped.
    dropped: (B,) int32, preserved tokens dropped per sample (0 unless overflow).
    forced: (B,) int32, preserved sources merged into their most similar
      destination because the sample had more than the capacity
      (``surplus="merge"``, the static budget; 0 otherwise).
    token_mask: (B, L_out) bool, the real output tokens (a prefix of each row).
    input_mask: (B, L) bool, the real input tokens.
    source: (B, L_out) int32, pool index each output token comes from (0 for
      padding; read it together with ``token_mask``).
    origin: (B, L) int32, pool index of each input token.
    position: (B, L) int32, output position of each pool entry, -1 where the
      entry is not in the output (merged or dropped sources, padding).
    num_special: number of leading special tokens (static).
  """

  fusion: jax.Array
  preserved: jax.Array
  num_preserved: jax.Array
  overflow: jax.Array
  dropped: jax.Array
  forced: jax.Array
  token_mask: jax.Array
  input_mask: jax.Array
  source: jax.Array
  origin: jax.Array
  position: jax.Array
  num_special: int = flax.struct.field(pytree_node=False, default=0)

  @property
  def num_dst(self) -> int:
    return self.fusion.shape[-2]

  @property
  def num_src(self) -> int:
    return self.fusion.shape[-1]


def compute_dtype(dtype) -> jnp.dtype:
  """The merge arithmetic runs in float64 for float64 inputs, else float32."""
  return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def is_traced(*values) -> bool:
  return any(isinstance(v, jax.core.Tracer) for v in values)


# ----------------------------------------------------------------------------
# Argument checks: bad input fails here with a message naming the argument,
# never deep inside jax.


def check_tokens(x, name="x") -> tuple[int, int, int]:
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"{name} must be an array of shape (B, L, D); got {type(x).__name__}")
  if x.ndim != 3:
    raise ValueError(f"{name} must have shape (B, L, D) (rank 3); got shape {tuple(x.shape)}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} must have a floating-point dtype; got {x.dtype}")
  return tuple(int(s) for s in x.shape)


def _check_tau(tau):
  if isinstance(tau, bool) or not (isinstance(tau, (int, float, np.floating, np.integer))
                                   or hasattr(tau, "dtype")):
    raise TypeError(f"tau must be a real number; got {type(tau).__name__}")
  if hasattr(tau, "dtype"):
    if jnp.ndim(tau) != 0:
      raise ValueError(f"tau must be a scalar; got shape {tuple(jnp.shape(tau))}")
    if not (jnp.issubdtype(tau.dtype, jnp.floating) or jnp.issubdtype(tau.dtype, jnp.integer)):
      raise TypeError(f"tau must be a real number; got dtype {tau.dtype}")
  if not is_traced(tau) and not math.isfinite(float(tau)):
    raise ValueError(f"tau must be finite; got {float(tau)} (tau >= 1 means nothing merges)")


def _check_int(value, name, low, high=None, what=""):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name} must be a Python int; got {type(value).__name__}")
  if value < low or (high is not None and value > high):
    bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
    raise ValueError(f"{name} must be {bounds}{what}; got {value}")


def _check_mask(token_mask, b, l):
  if token_mask is None:
    return None
  shape = tuple(getattr(token_mask, "shape", ()))
  if shape != (b, l):
    raise ValueError(f"token_mask must have shape (B, L) = {(b, l)}; got {shape}")
  if jnp.asarray(token_mask).dtype != jnp.bool_:
    raise TypeError(f"token_mask must be boolean; got dtype {jnp.asarray(token_mask).dtype}")
  return jnp.asarray(token_mask)


def check_merge_args(x, tau, num_special, eps, capacity, token_mask, partition,
                     similarity, key, metric, preserve="batch", surplus="drop"):
  """Validates ``mame``'s arguments; returns ``(B, L, D)``."""
  b, l, _ = check_tokens(x)
  _check_tau(tau)
  _check_int(num_special, "num_special", 0, max(l - 2, 0),
             f" (at least two mergeable tokens must remain of L = {l})")
  if l - num_special < 2:
    raise ValueError(f"x needs at least two mergeable tokens after num_special={num_special}; "
                     f"got L = {l}")
  if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 < eps < math.inf):
    raise ValueError(f"eps must be a positive finite float; got {eps!r}")
  if capacity is not None:
    _check_int(capacity, "capacity", 0)
  _check_mask(token_mask, b, l)
  if partition not in PARTITIONS:
    raise ValueError(f"partition must be one of {PARTITIONS}; got {partition!r}")
  if partition == "random" and key is None:
    raise ValueError("partition='random' needs a PRNG key: pass key=jax.random.key(seed)")
  if similarity not in SIMILARITIES:
    raise ValueError(f"similarity must be one of {SIMILARITIES}; got {similarity!r}")
  if preserve not in PRESERVE:
    raise ValueError(f"preserve must be one of {PRESERVE}; got {preserve!r}")
  if surplus not in SURPLUS:
    raise ValueError(f"surplus must be one of {SURPLUS}; got {surplus!r}")
  if surplus == "merge" and (capacity is None or preserve != "sample"):
    raise ValueError("surplus='merge' (the static budget) needs a capacity and "
                     "preserve='sample': each sample keeps at most `capacity` of its own "
                     "preserved sources")
  if metric is not None:
    mb, ml, _ = check_tokens(metric, "metric")
    if (mb, ml) != (b, l):
      raise ValueError(f"metric must have shape (B, L, Dm) with (B, L) = {(b, l)}; "
                       f"got {tuple(metric.shape)}")
  return b, l


# ----------------------------------------------------------------------------
# Partition (eq. 1)


def _priorities(key, n):
  """One uniform number per token rank, drawn so that a shorter sequence sees a
  prefix of a longer one's numbers (``fold_in`` per rank): a padded sequence and
  its unpadded twin get the same random partition."""
  return jax.vmap(lambda t: jax.random.uniform(jax.random.fold_in(key, t)))(jnp.arange(n))


def partition_roles(real, partition="alternating", key=None):
  """Marks each mergeable token as a source or a destination (eq. 1).

  Args:
    real: (B, L') bool, the real mergeable tokens.
    partition: "alternating" (ranks 0, 2, 4, ... are sources, 1, 3, 5, ...
      destinations: the paper's default), "sequential" (the first ceil(n/2) real
      tokens are sources, the rest destinations), or "random" (a random half,
      ceil(n/2) tokens, are sources; needs ``key``; the same draw for every sample).
    key: PRNG key for "random".

  Returns:
    is_src: (B, L') bool; the destinations are ``real & ~is_src``.
  """
  rank = jnp.cumsum(real, axis=-1) - 1
  n_real = real.sum(-1, keepdims=True)
  n_src = (n_real + 1) // 2
  if partition == "alternating":
    is_src = rank % 2 == 0
  elif partition == "sequential":
    is_src = rank < n_src
  else:
    u = _priorities(key, real.shape[-1])[jnp.clip(rank, 0)]
    u = jnp.where(real, u, jnp.inf)
    order = jnp.argsort(jnp.argsort(u, axis=-1), axis=-1)
    is_src = order < n_src
  return is_src & real


def _slot_index(member, size):
  """(B, size) position of the k-th True entry of ``member`` (B, L'); entries
  past the count point at position 0 and are masked by the caller."""
  count = jnp.cumsum(member, axis=-1)
  idx = jax.vmap(lambda c: jnp.searchsorted(c, jnp.arange(1, size + 1), side="left"))(count)
  valid = jnp.arange(size) < count[:, -1:]
  return jnp.where(valid, idx, 0).astype(jnp.int32), valid


def _take(x, idx):
  """Gathers tokens: x (B, L, D), idx (B, K) -> (B, K, D)."""
  return jnp.take_along_axis(x, idx[..., None], axis=1)


# ----------------------------------------------------------------------------
# Fusion weights (eqs. 2-8)


def similarity_matrix(x_dst, x_src, kind="cosine"):
  """Eq. (2): S (B, M, N) between destinations (B, M, D) and sources (B, N, D).

  Cosine similarity is clipped to [-1, 1] so that ``tau = 1`` merges nothing
  even when rounding nudges a duplicate's similarity past 1. A zero-norm token
  has similarity 0 to everything, with finite gradients.
  """
  if kind == "cosine":
    x_dst, x_src = _unit(x_dst), _unit(x_src)
  s = jnp.einsum("bmd,bnd->bmn", x_dst, x_src)
  return jnp.clip(s, -1.0, 1.0) if kind == "cosine" else s


def _unit(v):
  sq = jnp.sum(v * v, axis=-1, keepdims=True)
  positive = sq > 0
  # The double `where` keeps the gradient finite at zero vectors.
  inv = jnp.where(positive, jax.lax.rsqrt(jnp.where(positive, sq, 1.0)), 0.0)
  return v * inv


def fusion_weights(s, tau, eps=1e-6, pair_mask=None):
  """Eqs. (3)-(8): from similarities S (B, M, N) to fusion weights W^F (B, M, N).

  Every normalisation runs over the destination axis (a column per source).
  ``pair_mask`` (B, M, N) zeroes pairs that may not merge (padding, causality
  applied elsewhere) before any normalisation, so they take no part in it.

  By (5)-(7) a source whose positive weights are all equal -- in particular a
  source with a single similar destination -- has ``W_ij <= zeta_j`` everywhere,
  loses every connection and ends up preserved rather than merged.
  """
  s_t = jax.nn.relu(s - tau)                                   # (3)
  if pair_mask is not None:
    s_t = s_t * pair_mask
  w = s_t / (s_t.sum(axis=1, keepdims=True) + eps)             # (4)
  # (5)-(7), evaluated so that the sign of W_ij - zeta_j survives float32.
  # For a source with k equal positive weights, W_ij - zeta_j is negative by only
  # ~eps^2 (about 1e-12 of W), far below float32's resolution, so the literal
  # `w - sum(w) / (C + eps)` rounds either way depending on how XLA orders the
  # arithmetic. With K_j the number of positive weights and
  # D_j = sum_{W_ij>0} eps / (W_ij + eps), eq. (6) is exactly C_j = K_j - D_j
  # (since W / (W + eps) = 1 - eps / (W + eps)), and
  #   (W_ij - zeta_j) (C_j + eps) = (K_j W_ij - sum_i W_ij) + W_ij (eps - D_j),
  # whose first term is exactly 0 for equal weights and whose second carries the
  # tiny difference with full relative precision. Same values and gradients.
  positive = w > 0
  k = positive.sum(axis=1, keepdims=True).astype(w.dtype)
  d = jnp.where(positive, eps / (w + eps), 0).sum(axis=1, keepdims=True)
  count = k - d                                                # (6) C_j
  total = w.sum(axis=1, keepdims=True)
  excess = (k * w - total) + w * (eps - d)                     # (W - zeta) (C + eps)
  w_t = jax.nn.relu(excess / (count + eps))                    # (5), (7)
  return w_t / (w_t.sum(axis=1, keepdims=True) + eps)          # (8)


# ----------------------------------------------------------------------------
# MaMe


def mame(x, tau, *, num_special=0, eps=1e-6, capacity=None, token_mask=None,
         partition="alternating", similarity="cosine", causal=False, key=None,
         metric=None, preserve="batch", surplus="drop") -> tuple[jax.Array, MergeInfo]:
  """Matrix-based token merging (Algorithm 1, eqs. 1-10).

  Args:
    x: (B, L, D) float tokens. The first ``num_special`` pass through untouched.
    tau: similarity threshold (eq. 3), a Python float or a traced scalar
      (differentiable). ``tau >= 1`` merges nothing for cosine similarity.
    num_special: leading special tokens (e.g. 1 for a class token).
    eps: the epsilon of eqs. (4)-(8).
    capacity: ``None`` for the exact result -- eager only: the output has
      ``num_special + M + r`` tokens, no preserved token lost. A Python int ``c``
      gives the static length ``num_special + M + c`` for ``jit``: real tokens
      first, padding last; preserved sources beyond ``c`` are dropped and counted
      in ``info.dropped`` / ``info.overflow``.
    token_mask: (B, L) bool, the real tokens (None: all real).
    partition: "alternating" (default), "sequential" or "random" (needs ``key``).
    similarity: "cosine" (eq. 2) or "dot" (the raw inner product).
    causal: a destination only absorbs sources that come before it in the
      sequence. As in the paper's discussion the mask is applied to the final
      fusion weights W^F (after eq. 8); a source left with no earlier
      destination is preserved.
    key: PRNG key for ``partition="random"``.
    metric: (B, L, Dm) features the similarity is computed on (e.g. attention
      keys); None uses ``x`` itself. Tokens are always fused with ``x``.
    preserve: "batch" (default, the paper's batch-wide rule, Sec. 3.3: a source
      is preserved if it is preserved in any sample, so without padding every
      sample keeps the same number ``r`` of preserved tokens) or "sample" (each
      sample keeps its own preserved sources: its real outputs are those of the
      batch of one holding it, whatever its batch mates, and the rows are padded
      to the batch's largest count).
    surplus: what becomes of a sample's preserved sources beyond ``capacity``:
      "drop" (default; counted in ``info.dropped``) or "merge" (a static budget
      that drops nothing; needs ``preserve="sample"``): the sample keeps the
      ``capacity`` most unique of them (lowest best similarity to a destination)
      and each other one goes whole into its most similar destination (a fusion
      weight of 1 in eq. 9), counted in ``info.forced``. A sample within its
      capacity gets exactly eqs. 1-10.

  Returns:
    ``(y, info)``: ``y`` (B, num_special + M + c, D) in ``x.dtype`` and the
    :class:`MergeInfo` record.
  """
  check_merge_args(x, tau, num_special, eps, capacity, token_mask, partition,
                   similarity, key, metric, preserve, surplus)
  n_src = (x.shape[1] - num_special + 1) // 2
  if capacity is not None:
    return _mame(x, tau, num_special, eps, capacity, token_mask, partition,
                 similarity, causal, key, metric, preserve, surplus)
  if is_traced(x, tau, token_mask, metric, key):
    raise ValueError(
        "mame(capacity=None) computes the exact, data-dependent output length and "
        "cannot run under jit/vmap/grad tracing: pass a static capacity=c (see "
        "mame_jax.buckets) and read info.token_mask / info.overflow")
  y, info = _mame(x, tau, num_special, eps, n_src, token_mask, partition,
                  similarity, causal, key, metric, preserve, surplus)
  length = num_special + info.num_dst + int(info.num_preserved)
  info = info.replace(token_mask=info.token_mask[:, :length], source=info.source[:, :length])
  return y[:, :length], info


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 6, 7, 8, 11, 12))
def _mame(x, tau, num_special, eps, capacity, token_mask, partition, similarity,
          causal, key, metric, preserve, surplus):
  # One compiled program per shape and option set, also for eager calls; inside
  # an outer jit this is simply inlined.
  b, l, _ = x.shape
  ns = num_special
  m_dst, n_src = (l - ns) // 2, (l - ns + 1) // 2
  dtype = compute_dtype(x.dtype)
  metric = x if metric is None else metric

  # (1) partition among the real mergeable tokens.
  input_mask = (jnp.ones((b, l), bool) if token_mask is None
                else jnp.asarray(token_mask).at[:, :ns].set(True))
  real = input_mask[:, ns:]
  is_src = partition_roles(real, partition, key)
  src_idx, src_real = _slot_index(is_src, n_src)          # (B, N) positions in x[:, ns:]
  dst_idx, dst_real = _slot_index(real & ~is_src, m_dst)  # (B, M)

  body = x[:, ns:].astype(dtype)
  x_src, x_dst = _take(body, src_idx), _take(body, dst_idx)
  mbody = metric[:, ns:].astype(dtype)

  # (2)-(8) fusion weights; padded pairs take no part in any normalisation.
  s = similarity_matrix(_take(mbody, dst_idx), _take(mbody, src_idx), similarity)
  pair = (dst_real[:, :, None] & src_real[:, None, :]).astype(dtype)
  fusion = fusion_weights(s, jnp.asarray(tau, dtype), eps, pair)
  if causal:
    fusion = fusion * (src_idx[:, None, :] < dst_idx[:, :, None]).astype(dtype)

  # Preservation: a source with no connection left -- OR-ed over the batch
  # (the paper's rule), or each sample's own.
  preserved_b = (fusion.sum(axis=1) == 0) & src_real       # (B, N)
  if preserve == "batch":
    preserved = jnp.any(preserved_b, axis=0)                # (N,)
    fusion = fusion * (1 - preserved.astype(dtype))
    keep = preserved[None, :] & src_real                    # (B, N)
  else:
    preserved = keep = preserved_b                          # (B, N); W^F already 0 there
  forced = jnp.zeros_like(keep)
  need = keep.sum(-1).astype(jnp.int32)                     # (B,) preserved per sample
  if surplus == "merge":
    # The static budget: keep the `capacity` most unique preserved sources (the
    # lowest best similarity to a real destination); each other one goes whole
    # into its most similar destination.
    s_real = jnp.where(dst_real[:, :, None], s, -jnp.inf)   # (B, M, N)
    best = jnp.max(s_real, axis=1)                          # (B, N)
    order = jnp.argsort(jnp.where(keep, best, jnp.inf), axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1)
    # (a sample with no real destination has nowhere to put them: dropped then)
    forced = keep & (rank >= capacity) & dst_real.any(-1, keepdims=True)
    keep = keep & ~forced
    to = jax.nn.one_hot(jnp.argmax(s_real, axis=1), m_dst, axis=1, dtype=dtype)  # (B, M, N)
    fusion = fusion + to * forced[:, None, :].astype(dtype)

  # (9) fuse the sources into the destinations.
  fused = (x_dst + fusion @ x_src) / (1 + fusion.sum(-1, keepdims=True))

  # (10) assemble [special | destinations | preserved sources | padding].
  num_kept = keep.sum(-1).astype(jnp.int32)                 # (B,)
  pres_slot, _ = _slot_index(keep, capacity)                # (B, c)
  n_dst = dst_real.sum(-1, keepdims=True).astype(jnp.int32)  # (B, 1)
  out_len = ns + m_dst + capacity
  p = jnp.arange(out_len)[None, :]
  k = p - ns - n_dst                                        # preserved rank at p
  is_dst_out = (p >= ns) & (k < 0)
  is_pres_out = (k >= 0) & (k < jnp.minimum(num_kept, capacity)[:, None])
  pres_pool = ns + m_dst + jnp.take_along_axis(pres_slot, jnp.clip(k, 0, max(capacity - 1, 0)),
                                               axis=1) if capacity else jnp.zeros_like(p)
  source = jnp.where(p < ns, p, jnp.where(is_dst_out, p, jnp.where(is_pres_out, pres_pool, 0)))
  out_mask = (p < ns) | is_dst_out | is_pres_out

  pool = jnp.concatenate([x[:, :ns].astype(dtype), fused, x_src], axis=1)
  y = jnp.where(out_mask[..., None], _take(pool, source.astype(jnp.int32)), 0)

  # Inverse maps for restoration and source tracking.
  dst_rank = jnp.cumsum(real & ~is_src, axis=-1) - 1
  src_rank = jnp.cumsum(is_src, axis=-1) - 1
  body_origin = jnp.where(is_src, ns + m_dst + src_rank, ns + dst_rank)
  origin = jnp.concatenate([jnp.broadcast_to(jnp.arange(ns), (b, ns)),
                            jnp.where(real, body_origin, 0)], axis=1).astype(jnp.int32)
  kept_rank = jnp.cumsum(keep, axis=-1) - 1
  src_position = jnp.where(keep & (kept_rank < capacity), ns + n_dst + kept_rank, -1)
  dst_position = jnp.where(dst_real, ns + jnp.arange(m_dst)[None, :], -1)
  position = jnp.concatenate([jnp.broadcast_to(jnp.arange(ns), (b, ns)), dst_position,
                              src_position], axis=1).astype(jnp.int32)

  num_preserved = jnp.max(need).astype(jnp.int32)
  info = MergeInfo(
      fusion=fusion, preserved=preserved, num_preserved=num_preserved,
      overflow=jnp.max(num_kept) > capacity,
      dropped=jnp.maximum(num_kept - capacity, 0).astype(jnp.int32),
      forced=forced.sum(-1).astype(jnp.int32),
      token_mask=out_mask, input_mask=input_mask, source=source.astype(jnp.int32),
      origin=origin, position=position, num_special=ns)
  return y.astype(x.dtype), info


def merged_length(length: int, num_special: int, capacity: int) -> int:
  """Static output length of ``mame(..., capacity=capacity)`` for ``length`` tokens."""
  return num_special + (length - num_special) // 2 + capacity


def num_sources(length: int, num_special: int = 0) -> int:
  """N = ceil(L'/2): the most tokens one merge can preserve (the full capacity)."""
  return (length - num_special + 1) // 2

