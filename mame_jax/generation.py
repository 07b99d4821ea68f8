"""MaMe + MaRe around a token mixer, for generation (eqs. 17-18).

In a generative model every block must hand on as many tokens as it got, so
the merge wraps the token mixer and is undone right after it::

    x' = x + MaRe(MSA(MaMe(LN(x))))    (17)
    x  = x' + MLP(LN(x'))              (18)

:func:`mame_mare` is the bracket ``MaRe(attend(MaMe(.)))`` for any ``attend``;
``mame_jax.models.dit_blocks`` builds the block stack on it. ``restore="copy"``
swaps MaRe for ToMe-SD's copy-back (``mame_jax.restore.copy_back``), so the two
restorations can be compared on the same merge; ToMe-SD's own merge is
``mame_jax.tome_sd``.

Static shapes (docs/design.md, §3): ``capacity=None`` is the exact, eager call;
under ``jit`` pass a static capacity. In a block stack every merge layer sees
the same length ``L`` (restoration keeps it), so each layer's capacities are
buckets of the same ``N = ceil((L - s) / 2)``. Exact mode for a stack:
:func:`run_exact` starts from :func:`initial_capacities`, runs, and while a
layer overflowed grows it with :func:`grow_capacities` (``buckets.bucket_for``
of what it needed) and runs again; the caller caches one program per
capacity schedule.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax.numpy as jnp
import numpy as np

from mame_jax.buckets import bucket_for
from mame_jax.merge import check_tokens, is_traced, mame, num_sources
from mame_jax.models.merging import MergeConfig, merge_counts
from mame_jax.restore import RESTORES, restore as restore_stack


def mame_mare(attend: Callable, x, tau, *, capacity: Optional[int] = None,
              restore: str = "mare", token_mask=None, return_info: bool = False,
              **mame_options):
  """``restore(attend(mame(x)))``: a token mixer run on merged tokens, its output
  put back at full length.

  Args:
    attend: ``attend(tokens (B, L', D), token_mask (B, L') bool) -> (B, L', D')``,
      any token mixer that ignores the masked (padded) tokens as keys.
    x: (B, L, D) tokens.
    tau: the similarity threshold of eq. (3), a float or a traced scalar.
    capacity: ``None`` (eager only: the exact length) or a static int (under
      ``jit``; see ``mame_jax.buckets``).
    restore: "mare" (eqs. 11-13: shares that conserve mass) or "copy" (ToMe-SD's
      unmerge: every token receives a whole output).
    token_mask: (B, L) bool, the real tokens; padded positions return zeros.
    return_info: also return the merge record (``overflow``, ``num_preserved``).
    **mame_options: ``num_special``, ``partition``, ``key``, ``similarity``,
      ``causal``, ``eps``, ``metric``, as in :func:`mame_jax.mame`.

  Returns:
    (B, L, D') in ``attend``'s dtype; with ``return_info`` ``(out, info)``, where
    ``info`` is ``None`` when nothing could merge (see below).

  With cosine similarity and a concrete ``tau >= 1`` nothing can merge, so the
  merge is skipped and the result is ``attend(x, token_mask)`` bit for bit (the
  merge would only have reordered the tokens, which changes float rounding).
  """
  if restore not in RESTORES:
    raise ValueError(f"restore must be one of {RESTORES}; got {restore!r}")
  if not callable(attend):
    raise TypeError(f"attend must be a callable (tokens, token_mask) -> tokens; "
                    f"got {type(attend).__name__}")
  b, l, _ = check_tokens(x)
  if not merges_anything(tau, mame_options.get("similarity", "cosine")):
    mask = jnp.ones((b, l), bool) if token_mask is None else jnp.asarray(token_mask)
    out = _check_output(attend(x, mask), (b, l))
    if token_mask is not None:
      out = jnp.where(mask[..., None], out, 0)
    return (out, None) if return_info else out
  y, info = mame(x, tau, capacity=capacity, token_mask=token_mask, **mame_options)
  out = _check_output(attend(y, info.token_mask), y.shape[:2])
  out = restore_stack(out, [info], restore)
  return (out, info) if return_info else out


def merges_anything(tau, similarity="cosine") -> bool:
  """False when the merge is known to do nothing: cosine similarity is at most
  1, so a concrete ``tau >= 1`` merges no token (a traced tau is unknown)."""
  return similarity != "cosine" or is_traced(tau) or float(tau) < 1


def _check_output(out, bl):
  if not hasattr(out, "shape") or out.ndim != 3 or tuple(out.shape[:2]) != tuple(bl):
    raise ValueError(f"attend must return (B, L', D') with (B, L') = {tuple(bl)} "
                     f"(the tokens it was given); got "
                     f"{tuple(getattr(out, 'shape', ())) or type(out).__name__}")
  return out


# ----------------------------------------------------------------------------
# Exact mode for a stack of generation blocks.


# What exact mode reads from a block stack's ``aux`` (return it from a jitted step
# rather than the whole records): the one definition, shared with the ViT runner.
summary = merge_counts


def layer_buckets(cfg: MergeConfig, length: int, num_special: int = 0) -> tuple:
  """The capacity buckets every merge layer of a generation stack draws from:
  ``cfg.buckets(N)`` (all layers see ``length`` tokens)."""
  return cfg.buckets(num_sources(length, num_special))


def initial_capacities(cfg: MergeConfig, length: int, num_special: int = 0,
                       fraction: float = 0.5) -> tuple:
  """A first schedule: the bucket holding ``fraction`` of N, in every merge layer."""
  buckets = layer_buckets(cfg, length, num_special)
  return (bucket_for(int(buckets[-1] * fraction), buckets),) * len(cfg.layers)


def grow_capacities(cfg: MergeConfig, capacities: tuple, stats: dict, length: int,
                    num_special: int = 0) -> Optional[tuple]:
  """The next schedule after a run with ``capacities`` whose :func:`summary` is
  ``stats``: every overflowing layer grows to the bucket holding its
  ``num_preserved``. ``None`` when nothing overflowed (the run was exact)."""
  over = np.asarray(stats["overflow"], bool)
  if not over.any():
    return None
  need = np.asarray(stats["num_preserved"])
  buckets = layer_buckets(cfg, length, num_special)
  return tuple(bucket_for(min(int(n), buckets[-1]), buckets) if o else int(c)
               for c, o, n in zip(capacities, over, need))


def run_exact(step: Callable, cfg: MergeConfig, length: int, num_special: int = 0,
              capacities: Optional[tuple] = None):
  """Exact mode: ``step(capacities) -> (out, stats)`` (``stats`` from
  :func:`summary`; ``step`` typically looks up a jitted program per schedule)
  runs until no layer overflows. Returns ``(out, stats, capacities)``: the
  result equals the run at full capacity. A dropped token changed what later
  layers saw, so they may overflow anew after a rerun; capacities only grow, so
  the loop ends (at worst at full capacity)."""
  caps = capacities or initial_capacities(cfg, length, num_special)
  while True:
    out, stats = step(caps)
    grown = grow_capacities(cfg, caps, stats, length, num_special)
    if grown is None:
      return out, stats, caps
    if grown == tuple(caps):  # cannot happen: the last bucket is N, which never overflows
      raise RuntimeError(f"exact mode could not grow the overflowing layers of {caps}")
    caps = grown
