"""The one benchmark timer and FLOP counter (docs/design.md, §6 Measuring speed).

Every benchmark, and ``mame-jax eval``, measures speed with these functions so
that all reported figures follow the same rules:

* the first call compiles and is reported on its own (``compile_s``), never
  mixed into the timings;
* warm-up calls follow, then timed calls, each ending in
  ``jax.block_until_ready`` so that asynchronous dispatch is not mistaken for
  speed;
* the reported figure is the **median** of the timed calls;
* FLOPs come from XLA's cost analysis of the compiled program, not from a
  hand count;
* methods compared with each other are timed *interleaved*
  (:func:`time_interleaved`: rounds of A B C A B C ...), so that a drift of the
  machine -- clocks, thermal throttling, a neighbour's load -- falls on every
  method alike instead of on whichever ran last.

Nothing here asserts on wall-clock values; tests only check the bookkeeping.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import statistics
import time
import warnings
from typing import Any, Callable, Mapping, Sequence

import jax


@dataclasses.dataclass(frozen=True)
class Timing:
  """Wall-clock timings of one function, in seconds.

  Attributes:
    median_s: median of the timed calls: the figure to report.
    min_s: fastest timed call.
    runs_s: every timed call, in order.
    compile_s: the first call (trace + compile + one run), not in ``runs_s``.
    warmup: number of untimed calls between the first call and the timed ones.
  """

  median_s: float
  min_s: float
  runs_s: tuple[float, ...]
  compile_s: float
  warmup: int = 0

  @property
  def median_ms(self) -> float:
    return 1e3 * self.median_s

  @property
  def max_s(self) -> float:
    """Slowest timed call."""
    return max(self.runs_s)

  @property
  def iqr_s(self) -> float:
    """Interquartile range of the timed calls (0 with fewer than 2): the spread
    to report beside the median, insensitive to one odd call."""
    if len(self.runs_s) < 2:
      return 0.0
    q1, _, q3 = statistics.quantiles(self.runs_s, n=4, method="inclusive")
    return q3 - q1

  def per_item(self, n: int) -> float:
    """Median seconds per item when one call processes ``n`` items (e.g. images)."""
    return self.median_s / n

  def throughput(self, n: int) -> float:
    """Items per second (median) when one call processes ``n`` items."""
    return n / self.median_s if self.median_s > 0 else math.inf

  def to_dict(self) -> dict:
    return dataclasses.asdict(self) | {"runs_s": list(self.runs_s), "max_s": self.max_s,
                                       "iqr_s": self.iqr_s}


def time_fn(fn: Callable, *args, warmup: int = 2, runs: int = 7,
            min_time: float | None = None) -> Timing:
  """Times ``fn(*args)``: one compiling call, ``warmup`` untimed calls, then
  ``runs`` timed calls, each ending in ``jax.block_until_ready``.

  ``fn`` should be jitted (or call jitted code); whatever it returns -- an array
  or any pytree of arrays -- is waited on. Calls in total: ``1 + warmup + runs``
  (more with ``min_time``).

  Args:
    fn: the function to time.
    *args: its arguments, the same for every call.
    warmup: untimed calls after the compiling one (caches, allocator, clocks).
    runs: timed calls (at least 1).
    min_time: if given, keep adding timed calls past ``runs`` until the timed
      calls add up to at least ``min_time`` seconds (for functions so fast that
      a handful of calls is mostly timer noise).

  Returns:
    a :class:`Timing`; ``median_s`` is the figure to report.
  """
  if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
    raise ValueError(f"runs must be an int >= 1; got {runs!r}")
  if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
    raise ValueError(f"warmup must be an int >= 0; got {warmup!r}")
  if min_time is not None and not min_time >= 0:
    raise ValueError(f"min_time must be >= 0 seconds; got {min_time!r}")

  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  compile_s = time.perf_counter() - start
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))

  times = []
  while len(times) < runs or (min_time is not None and sum(times) < min_time):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return Timing(median_s=statistics.median(times), min_s=min(times), runs_s=tuple(times),
                compile_s=compile_s, warmup=warmup)


def time_interleaved(fns: Mapping[str, tuple], *, rounds: int = 7, warmup: int = 2,
                     clock: Callable[[], float] = time.perf_counter) -> dict:
  """Times several functions against each other, interleaved.

  ``fns = {name: (fn, args)}`` with ``args`` a tuple. Each ``fn(*args)`` is first
  called once on its own (compiling; ``compile_s``), in the order given; then
  ``warmup`` untimed rounds and ``rounds`` timed rounds, each round calling every
  function once in the same order (A B C A B C ...), each call ending in
  ``jax.block_until_ready``. A slow drift of the machine thus lands on every
  method, and the medians compare like with like.

  Args:
    fns: name -> ``(fn, args)``; ``fn`` jitted (or calling jitted code).
    rounds: timed calls per function (at least 1).
    warmup: untimed rounds after the compiling calls.
    clock: seconds as a float (``time.perf_counter``); injectable for tests.

  Returns:
    name -> :class:`Timing` (``median_s``, ``min_s``, ``max_s``, ``iqr_s``,
    ``runs_s``, ``compile_s``), in the order of ``fns``.
  """
  if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
    raise ValueError(f"rounds must be an int >= 1; got {rounds!r}")
  if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
    raise ValueError(f"warmup must be an int >= 0; got {warmup!r}")
  calls = {}
  for name, entry in fns.items():
    fn, args = entry
    calls[name] = (fn, tuple(args))

  def timed(name):
    fn, args = calls[name]
    start = clock()
    jax.block_until_ready(fn(*args))
    return clock() - start

  compile_s = {name: timed(name) for name in calls}
  for _ in range(warmup):
    for name in calls:
      timed(name)
  runs = {name: [] for name in calls}
  for _ in range(rounds):
    for name in calls:
      runs[name].append(timed(name))
  return {name: Timing(median_s=statistics.median(r), min_s=min(r), runs_s=tuple(r),
                       compile_s=compile_s[name], warmup=warmup)
          for name, r in runs.items()}


def gflops(fn: Callable, *args) -> float:
  """GFLOPs of one call ``fn(*args)``, from XLA's cost analysis of the compiled
  program (``jax.jit(fn).lower(*args).compile().cost_analysis()``).

  XLA counts every floating-point operation of the optimised program,
  element-wise ones included (a matmul (m, k) @ (k, n) is ``2 m k n``). Static
  arguments must be bound beforehand (``functools.partial``). An already jitted
  ``fn`` is lowered as it is, so the program it has compiled is reused rather
  than compiled again. Returns ``nan``, with a warning, when the backend gives
  no cost analysis.
  """
  jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
  try:
    cost = jitted.lower(*args).compile().cost_analysis()
  except Exception as e:  # pylint: disable=broad-except  # some backends raise instead
    return _no_flops(f"cost_analysis() raised {type(e).__name__}: {e}")
  # Newer jax returns one dict; older versions a list with one dict per program.
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost:
    return _no_flops("cost_analysis() returned nothing")
  if "flops" not in cost:
    return _no_flops(f"cost_analysis() has no 'flops' entry (keys: {sorted(cost)[:8]})")
  return float(cost["flops"]) / 1e9


def _no_flops(reason: str) -> float:
  warnings.warn(f"gflops: no FLOP count on backend {jax.default_backend()!r} ({reason}); "
                "reporting nan", RuntimeWarning, stacklevel=3)
  return math.nan


def device_description() -> str:
  """E.g. ``"gpu: NVIDIA H100 80GB HBM3 x1, jax 0.5.0"`` or
  ``"cpu: cpu x1 (2 cores), jax 0.4.38"``: what to print beside a timing."""
  devices = jax.devices()
  d = devices[0]
  cores = f" ({os.cpu_count()} cores)" if d.platform == "cpu" else ""
  return f"{d.platform}: {d.device_kind} x{len(devices)}{cores}, jax {jax.__version__}"


def today() -> str:
  """Today's date, ISO format (``2025-01-31``)."""
  return datetime.date.today().isoformat()


def format_table(rows: Sequence[dict], columns: Sequence[str], *, markdown: bool = True,
                 digits: int = 3) -> str:
  """Formats ``rows`` as a table with aligned columns.

  Args:
    rows: one dict per row; a missing key gives an empty cell.
    columns: the keys to show, in order; they are also the headers.
    markdown: a markdown pipe table (which also reads aligned as plain text);
      ``False`` gives space-separated columns under a dashed rule.
    digits: significant digits for floats (never scientific notation between
      1e-3 and 1e6; integers are shown in full).

  Numbers are right-aligned, everything else left-aligned.
  """
  cells = [[_cell(row.get(c), digits) for c in columns] for row in rows]
  numeric = [all(_is_number(row.get(c)) for row in rows if row.get(c) is not None)
             and any(row.get(c) is not None for row in rows) for c in columns]
  widths = [max([len(str(c))] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
  if markdown:
    widths = [max(w, 3) for w in widths]

  def line(values):
    padded = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
    return "| " + " | ".join(padded) + " |" if markdown else "  ".join(padded).rstrip()

  head = line([str(c) for c in columns])
  if markdown:
    rule = "|" + "|".join("-" * (w + 1) + ":" if num else ":" + "-" * (w + 1)
                          for w, num in zip(widths, numeric)) + "|"
  else:
    rule = "  ".join("-" * w for w in widths)
  return "\n".join([head, rule] + [line(r) for r in cells])


def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) or hasattr(v, "dtype")


def _cell(v: Any, digits: int) -> str:
  if v is None:
    return ""
  if isinstance(v, bool):
    return str(v)
  if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:  # numpy / jax scalars
    v = v.item()
  if isinstance(v, float):
    if not math.isfinite(v):
      return str(v)
    if v == 0:
      return "0"
    if 1e-3 <= abs(v) < 1e6:
      decimals = max(0, digits - 1 - math.floor(math.log10(abs(v))))
      return f"{v:.{decimals}f}"
    return f"{v:.{max(digits - 1, 0)}e}"
  return str(v)
