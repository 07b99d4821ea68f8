"""Static capacities for ``jit``: buckets, and counting compilations.

Under ``jit`` the number of preserved tokens ``r`` is data-dependent but the
output length must be static, so ``mame`` takes a capacity ``c >= r`` drawn
from a small fixed set of *buckets*. A handful of buckets bounds the number of
compiled programs; the price is at most one bucket step of padding.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence


def linear_buckets(max_capacity: int, step: int = 16) -> tuple[int, ...]:
  """``(0, step, 2*step, ..., max_capacity)``: the last bucket is always the max."""
  _check_positive(max_capacity, "max_capacity", allow_zero=True)
  _check_positive(step, "step")
  return tuple(sorted(set(range(0, max_capacity, step)) | {max_capacity}))


def even_buckets(max_capacity: int, count: int) -> tuple[int, ...]:
  """``count`` equal steps up to ``max_capacity``, and 0: the step
  ``ceil(max_capacity / count)`` scales with the capacity, so every size gets
  at most ``count + 1`` buckets and wastes at most ``1 / count`` of it."""
  _check_positive(count, "count")
  return linear_buckets(max_capacity, max(1, -(-max_capacity // count)))


def geometric_buckets(max_capacity: int, first: int = 8, growth: float = 2.0) -> tuple[int, ...]:
  """``(0, first, first*growth, ...)`` rounded up to multiples of 8, capped at
  ``max_capacity`` (which is always the last bucket). Few buckets, more padding
  for large ``r``."""
  _check_positive(max_capacity, "max_capacity", allow_zero=True)
  _check_positive(first, "first")
  if not growth > 1:
    raise ValueError(f"growth must be > 1; got {growth}")
  out, b = {0, max_capacity}, float(first)
  while b < max_capacity:
    out.add(min(max_capacity, 8 * math.ceil(b / 8)))
    b *= growth
  return tuple(sorted(out))


def bucket_for(r: int, buckets: Sequence[int]) -> int:
  """The smallest bucket that holds ``r`` preserved tokens."""
  r = int(r)
  if r < 0:
    raise ValueError(f"r must be >= 0; got {r}")
  for b in sorted(buckets):
    if b >= r:
      return int(b)
  raise ValueError(f"r = {r} exceeds the largest bucket {max(buckets)}; "
                   f"the buckets must end at the full capacity N")


class TraceCounter:
  """Counts how often a function is traced, i.e. how many programs ``jit``
  compiles for it (one per distinct static arguments and input shapes).

      counter = TraceCounter()
      f = jax.jit(counter(step), static_argnames="capacity")
      ...; counter.count
  """

  def __init__(self):
    self.count = 0
    self.keys: list = []

  def __call__(self, fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
      self.count += 1  # runs once per trace, never inside the compiled program
      self.keys.append(tuple(sorted((k, v) for k, v in kwargs.items()
                                    if isinstance(v, (int, str, tuple, type(None))))))
      return fn(*args, **kwargs)
    return wrapped


def _check_positive(value, name, allow_zero=False):
  if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
    raise ValueError(f"{name} must be an int {'>= 0' if allow_zero else '>= 1'}; got {value!r}")
