"""ToMe, the baseline: bipartite soft matching (Bolya et al., "Token Merging: Your
ViT but Faster", ICLR 2023), as pure JAX functions.

One ToMe step removes exactly ``r`` tokens:

1. Split the sequence by position: even positions 0, 2, 4, ... form set A (the
   sources), odd positions 1, 3, 5, ... form set B (the destinations). The split runs
   over the whole sequence, so the class token (position 0) lands in A.
2. Score every A-B pair by the cosine similarity of a metric (in ToMe: the attention
   keys averaged over heads). The class token's row is set to ``-inf`` so it never
   merges.
3. Each A token keeps its best B match; the ``r`` A tokens whose best match scores
   highest merge into that match, the other A tokens stay.
4. Output order: the unmerged A tokens, then every B token in its original order.
   Length ``L - r``. The unmerged A tokens come as ToMe leaves them: with a class
   token, in their original order (ToMe re-sorts them so that the class token stays
   first); without one, in decreasing order of their best match score, as ToMe's
   ``argsort`` left them (``order="tome"``, the default). ``order="sorted"`` always
   keeps the original order instead.

Merging is a size-weighted average (``merge_wavg``): a token's size counts the
input patches it stands for, and proportional attention (``prop_attn_bias``) adds
``log(size)`` to the attention logits so that a merged token weighs as much as the
tokens it replaced.

The matching is a discrete choice and carries no gradient (ToMe runs it under
``no_grad``); ``merge_wavg`` is differentiable in ``x`` and ``size``. ``r`` is a
static Python int, so every shape is known at trace time and everything here jits.

Choices where the reference leaves room, each tested:

- ``r`` is clipped as in ToMe to ``(L - class_token) // 2`` ("at most 50%"), which
  equals ``|A| - 1`` with a class token and ``|B|`` without one.
- ``r == 0`` (after clipping) is the identity: same order, same values, same sizes.
- ``order="tome"`` (default) reproduces ToMe's token order exactly, so a model with
  no class token (SigLIP) sees the same sequence as under the reference code, and
  later blocks (whose A/B split is by position) make the same merges.
  ``order="sorted"`` re-sorts the unmerged A tokens by position in every case (this
  library's behaviour before it matched ToMe): their order then no longer depends
  on how their scores rank, so near-ties that rank differently on another backend
  change which tokens merge but not where the kept ones sit. It is not ToMe: after
  one block the sequences differ and later merges diverge. With a class token the
  two orders are the same.
- A token whose metric has zero norm has similarity 0 to every token (never NaN).
- Ties are broken towards the lower index: the first best destination, and among
  equal scores the earlier A token merges first (and, unmerged, comes first).
  PyTorch's descending ``argsort`` promises no order among ties; this is where the
  two may differ.
"""

from __future__ import annotations

import functools
import operator

import flax.struct
import jax
import jax.numpy as jnp

# How the unmerged A tokens are ordered in the output (see the module docstring).
ORDERS = ("tome", "sorted")


@flax.struct.dataclass
class ToMeRecord:
  """What one bipartite soft matching decided, enough to apply it and undo it.

  All positions are indices into the *input* sequence of length ``L``; ``U`` is the
  number of unmerged A tokens, ``r`` the number of merges, ``L_out = L - r``.

  Attributes:
    unm_idx: ``(B, U)`` int32, input positions of the A tokens that stay, in their
      output order: ascending with a class token (which so comes first) or with
      ``order="sorted"``, else in decreasing order of their match score (ToMe's).
      With ``r == 0`` this is every A position, ascending.
    src_idx: ``(B, r)`` int32, input positions of the A tokens that merge, in
      decreasing order of their match score.
    dst_idx: ``(B, r)`` int32, input position of the B token that ``src_idx[:, k]``
      merges into. Several sources may share a destination.
    source: ``(B, L)`` int32, for every input token the output token it ends up in,
      in ``[0, L_out)``. When ``r > 0`` the output is
      ``[x[unm_idx], x[1::2]]`` with sources folded into their destinations; when
      ``r == 0`` it is the input itself and ``source`` is ``arange(L)``.
  """

  unm_idx: jax.Array
  src_idx: jax.Array
  dst_idx: jax.Array
  source: jax.Array

  @property
  def r(self) -> int:
    """Number of tokens removed (static)."""
    return self.src_idx.shape[-1]

  @property
  def num_out(self) -> int:
    """Output length ``L_out = L - r`` (static)."""
    return self.source.shape[-1] - self.r


def _check_rank3(a: jax.Array, name: str, what: str) -> None:
  if a.ndim != 3:
    raise ValueError(f"{name} must have shape {what} (rank 3), got shape {a.shape}")


def _check_r(r) -> int:
  # r decides the output shape, so it has to be a concrete Python int at trace
  # time; a float (even 2.0), a bool or a traced value is a caller's mistake.
  if isinstance(r, bool):
    raise ValueError(f"r must be a non-negative int, got bool {r!r}")
  try:
    r = operator.index(r)
  except TypeError as e:
    raise ValueError(
        f"r must be a static non-negative int (mark it static under jit), "
        f"got {type(r).__name__} {r!r}") from e
  if r < 0:
    raise ValueError(f"r must be a non-negative int, got {r}")
  return r


def _compute_dtype(dtype) -> jnp.dtype:
  # At least float32 for the arithmetic whatever the activation dtype (bf16 sums of
  # many tokens lose digits); float64 stays float64.
  return jnp.promote_types(dtype, jnp.float32)


def _check_order(order) -> str:
  if order not in ORDERS:
    raise ValueError(f"order must be one of {ORDERS}; got {order!r}")
  return order


def bipartite_soft_matching(
    metric: jax.Array, r: int, *, class_token: bool = True, order: str = "tome",
) -> ToMeRecord:
  """ToMe's bipartite soft matching on ``metric``; removes ``r`` tokens.

  Args:
    metric: ``(B, L, C)`` features to match on; ToMe uses the attention keys averaged
      over heads. Only their direction matters (cosine similarity).
    r: static non-negative int, tokens to remove. Clipped to
      ``(L - class_token) // 2``; 0 means no change.
    class_token: whether position 0 is a class token that must never merge.
    order: "tome" (ToMe's output order: unmerged A tokens by position with a class
      token, by decreasing match score without one) or "sorted" (by position
      always); see the module docstring.

  Returns:
    A ``ToMeRecord`` (index arrays only); apply it with ``merge_wavg``.

  Raises:
    ValueError: if ``metric`` is not rank 3, ``r`` is not a non-negative int or
      ``order`` is unknown.
  """
  metric = jnp.asarray(metric)
  _check_rank3(metric, "metric", "(B, L, C)")
  r = _check_r(r)
  _check_order(order)
  # ToMe caps one step at half of the mergeable tokens.
  r = max(0, min(r, (metric.shape[1] - int(class_token)) // 2))
  # ToMe re-sorts only to put the class token back in front.
  resort = bool(class_token) or order == "sorted"
  return _match(metric, r, bool(class_token), resort)


# Jitted cores: the public functions check their arguments in Python and call
# these, so eager calls run one compiled program instead of dozens of small ops;
# under an outer jit they are simply inlined.
@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _match(metric: jax.Array, r: int, class_token: bool, resort: bool) -> ToMeRecord:
  """``bipartite_soft_matching`` after validation; ``r`` is already clipped;
  ``resort``: put the unmerged A tokens back in their original order."""
  batch, length, _ = metric.shape
  n_a, n_b = (length + 1) // 2, length // 2
  a_pos = jnp.arange(0, length, 2, dtype=jnp.int32)

  if r == 0:
    # ToMe's do_nothing: the identity, in the input order.
    empty = jnp.zeros((batch, 0), jnp.int32)
    return ToMeRecord(
        unm_idx=jnp.broadcast_to(a_pos, (batch, n_a)),
        src_idx=empty,
        dst_idx=empty,
        source=jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32),
                                (batch, length)))

  # The matching is a discrete decision; no gradient flows through it.
  m = jax.lax.stop_gradient(metric).astype(_compute_dtype(metric.dtype))
  norm = jnp.linalg.norm(m, axis=-1, keepdims=True)
  m = m / jnp.where(norm > 0, norm, 1)  # zero-norm tokens: similarity 0, not NaN
  # HIGHEST precision: TF32 on GPUs could reorder close scores and change which
  # tokens merge; the baseline should not depend on the backend.
  scores = jnp.einsum("bic,bjc->bij", m[:, 0::2], m[:, 1::2],
                      precision=jax.lax.Precision.HIGHEST)  # (B, |A|, |B|)
  if class_token:
    scores = scores.at[:, 0, :].set(-jnp.inf)

  best = scores.max(axis=-1)                                # (B, |A|)
  best_dst = scores.argmax(axis=-1).astype(jnp.int32)       # (B, |A|) index in B
  # Descending by score; stable so that ties go to the earlier token.
  order = jnp.argsort(-best, axis=-1, stable=True).astype(jnp.int32)
  src_a = order[:, :r]                                      # (B, r) index in A
  unm_a = order[:, r:]                                      # (B, U) index in A
  if resort:
    unm_a = jnp.sort(unm_a, axis=-1)
  dst_b = jnp.take_along_axis(best_dst, src_a, axis=1)      # (B, r) index in B

  # source: unmerged A token unm_a[k] goes to output slot k, a merged A token to the
  # output slot of its destination, B token j to slot U + j.
  n_unm = n_a - r
  rows = jnp.arange(batch)[:, None]
  merged = jnp.zeros((batch, n_a), bool).at[rows, src_a].set(True)  # (B, |A|)
  kept_slot = jnp.zeros((batch, n_a), jnp.int32).at[rows, unm_a].set(
      jnp.arange(n_unm, dtype=jnp.int32))
  src_of_a = jnp.where(merged, n_unm + best_dst, kept_slot)
  src_of_b = jnp.broadcast_to(n_unm + jnp.arange(n_b, dtype=jnp.int32),
                              (batch, n_b))
  # Interleave back to input order: A at even positions, B at odd ones.
  if n_b < n_a:
    src_of_b = jnp.pad(src_of_b, ((0, 0), (0, 1)))
  source = jnp.stack([src_of_a, src_of_b], axis=-1).reshape(batch, -1)[:, :length]

  return ToMeRecord(unm_idx=2 * unm_a, src_idx=2 * src_a, dst_idx=2 * dst_b + 1,
                    source=source)


def _apply_sum(record: ToMeRecord, v: jax.Array) -> jax.Array:
  """``(B, L, K) -> (B, L_out, K)``: reorder to ``[unmerged A, B]`` and add every
  merged source into its destination (ToMe's ``merge(..., mode="sum")``)."""
  batch, length = record.source.shape
  rows = jnp.arange(batch)[:, None]
  b_pos = jnp.broadcast_to(jnp.arange(1, length, 2, dtype=jnp.int32),
                           (batch, length // 2))
  out = v[rows, jnp.concatenate([record.unm_idx, b_pos], axis=1)]
  dst_out = record.unm_idx.shape[1] + (record.dst_idx - 1) // 2
  return out.at[rows, dst_out].add(v[rows, record.src_idx])


def merge_wavg(
    record: ToMeRecord, x: jax.Array, size: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Apply a matching as a size-weighted average (ToMe's ``merge_wavg``).

  ``x_out[k] = sum_{i -> k} size[i] x[i] / sum_{i -> k} size[i]`` and
  ``size_out[k] = sum_{i -> k} size[i]``, where ``i -> k`` means
  ``record.source[i] == k``.

  Args:
    record: from ``bipartite_soft_matching`` on a sequence of length ``L``.
    x: ``(B, L, D)`` any per-token features (tokens, keys, values, ...).
    size: ``(B, L)`` float, tokens' sizes; ``None`` means all ones.

  Returns:
    ``x_out (B, L_out, D)`` in ``x.dtype`` and ``size_out (B, L_out)`` in float32
    (float64 for float64 inputs). The sums run in that dtype too.

  Raises:
    ValueError: if ``x`` or ``size`` does not match the record's ``(B, L)``.
  """
  x = jnp.asarray(x)
  _check_rank3(x, "x", "(B, L, D)")
  batch_length = record.source.shape
  if x.shape[:2] != batch_length:
    raise ValueError(f"x has (B, L) = {x.shape[:2]} but the record was built for "
                     f"{batch_length}")
  if size is not None:
    size = jnp.asarray(size)
    if size.shape != batch_length:
      raise ValueError(f"size must have shape (B, L) = {batch_length}, got "
                       f"{size.shape}")
  return _merge_wavg(record, x, size)


@jax.jit
def _merge_wavg(record: ToMeRecord, x: jax.Array, size: jax.Array | None
                ) -> tuple[jax.Array, jax.Array]:
  """``merge_wavg`` after validation."""
  dtype = _compute_dtype(x.dtype)
  size = jnp.ones(x.shape[:2], dtype) if size is None else size.astype(dtype)
  if record.r == 0:
    return x, size  # exact identity, not x * size / size
  # Size rides along as one more feature, so one gather and one scatter do both.
  summed = _apply_sum(record, jnp.concatenate(
      [x.astype(dtype) * size[..., None], size[..., None]], axis=-1))
  x_sum, size_out = summed[..., :-1], summed[..., -1]
  return (x_sum / size_out[..., None]).astype(x.dtype), size_out


def tome(
    x: jax.Array, r: int, *, metric: jax.Array | None = None,
    size: jax.Array | None = None, class_token: bool = True, order: str = "tome",
) -> tuple[jax.Array, jax.Array, ToMeRecord]:
  """One ToMe step: match on ``metric`` (default ``x``), merge ``x`` by size.

  Args:
    x: ``(B, L, D)`` tokens.
    r: static non-negative int, tokens to remove (clipped, see
      ``bipartite_soft_matching``).
    metric: ``(B, L, C)`` matching features, e.g. the keys averaged over heads;
      ``None`` uses ``x``.
    size: ``(B, L)`` token sizes; ``None`` means all ones.
    class_token: whether position 0 is a class token that never merges.
    order: "tome" or "sorted", the output order of the unmerged tokens (see
      ``bipartite_soft_matching``).

  Returns:
    ``(x_out (B, L - r, D), size_out (B, L - r), record)``.
  """
  x = jnp.asarray(x)
  _check_rank3(x, "x", "(B, L, D)")
  if metric is None:
    metric = x
  else:
    metric = jnp.asarray(metric)
    _check_rank3(metric, "metric", "(B, L, C)")
    if metric.shape[:2] != x.shape[:2]:
      raise ValueError(f"metric has (B, L) = {metric.shape[:2]} but x has "
                       f"{x.shape[:2]}")
  record = bipartite_soft_matching(metric, r, class_token=class_token, order=order)
  x_out, size_out = merge_wavg(record, x, size)
  return x_out, size_out, record


def tome_holding(
    x: jax.Array, r: int, held: int, *, metric: jax.Array | None = None,
    size: jax.Array | None = None, order: str = "tome",
) -> tuple[jax.Array, jax.Array, ToMeRecord]:
  """One ToMe step on ``[cls | held tokens | the rest]`` where the ``held`` tokens
  (DINOv2's registers) take no part: the step runs on ``[cls | the rest]`` exactly
  as :func:`tome` with a class token does on a model without them, and the held
  tokens go back after the class token, unchanged, with their sizes.

  Returns ``(x_out (B, L - r, D), size_out, record)``. The record describes the
  whole sequence (its positions and output slots count the held tokens, which
  stay in place: ``source`` maps them to slots ``1 .. held``), so source maps read
  it like any other; apply it to other features through this function, not
  :func:`merge_wavg`, whose A/B layout it no longer follows.
  """
  x = jnp.asarray(x)
  _check_rank3(x, "x", "(B, L, D)")
  held = int(held)
  metric = x if metric is None else jnp.asarray(metric)

  def without(a):
    return jnp.concatenate([a[:, :1], a[:, 1 + held:]], axis=1)

  y, size_out, record = tome(without(x), r, metric=without(metric),
                             size=None if size is None else without(size),
                             class_token=True, order=order)
  kept = (jnp.ones(x.shape[:2], size_out.dtype) if size is None
          else jnp.asarray(size, size_out.dtype))[:, 1:1 + held]
  y = jnp.concatenate([y[:, :1], x[:, 1:1 + held], y[:, 1:]], axis=1)
  size_out = jnp.concatenate([size_out[:, :1], kept, size_out[:, 1:]], axis=1)
  return y, size_out, _with_held(record, held)


def _with_held(record: ToMeRecord, held: int) -> ToMeRecord:
  """``record`` of ``[cls | rest]`` re-indexed for ``[cls | held | rest]``."""
  def shift(p):
    return jnp.where(p >= 1, p + held, p).astype(jnp.int32)

  ids = jnp.broadcast_to(jnp.arange(1, 1 + held, dtype=jnp.int32),
                         (record.source.shape[0], held))

  def insert(p):  # position / slot 0 is the class token in both
    p = shift(p)
    return jnp.concatenate([p[:, :1], ids, p[:, 1:]], axis=1)
  return ToMeRecord(unm_idx=insert(record.unm_idx), src_idx=shift(record.src_idx),
                    dst_idx=shift(record.dst_idx), source=insert(record.source))


def prop_attn_bias(size: jax.Array) -> jax.Array:
  """Proportional attention: ``log(size)``, ``(B, L)``, to add to the attention
  logits of every query over key ``j`` (broadcast as ``[:, None, None, :]`` for
  ``(B, heads, L_q, L_k)`` logits). A key standing for ``s`` tokens then gets
  ``s`` times the softmax weight, as if its copies were all still there."""
  size = jnp.asarray(size)
  if size.ndim != 2:
    raise ValueError(f"size must have shape (B, L) (rank 2), got shape {size.shape}")
  return jnp.log(size.astype(_compute_dtype(size.dtype)))


def unmerge(record: ToMeRecord, y: jax.Array) -> jax.Array:
  """ToMe-SD's unmerge: ``(B, L_out, D) -> (B, L, D)``, every input position gets a
  copy of the output token it was merged into (``y[b, record.source[b, i]]``)."""
  y = jnp.asarray(y)
  _check_rank3(y, "y", "(B, L_out, D)")
  if y.shape[:2] != (record.source.shape[0], record.num_out):
    raise ValueError(f"y has (B, L_out) = {y.shape[:2]} but the record produces "
                     f"{(record.source.shape[0], record.num_out)}")
  return jnp.take_along_axis(y, record.source[..., None], axis=1)


def track_source(record: ToMeRecord, source: jax.Array | None = None) -> jax.Array:
  """Compose source maps across layers, for drawing token clusters.

  Args:
    record: the current layer's matching.
    source: ``(B, L0)`` int, for each token of the original sequence the index of the
      token that holds it at the current layer's input; ``None`` at the first merge.

  Returns:
    ``(B, L0)`` int32, the same map at the current layer's output.
  """
  if source is None:
    return record.source
  return jnp.take_along_axis(record.source, jnp.asarray(source, jnp.int32), axis=1)
