"""The benchmark timer and FLOP counter (docs/design.md, §6 Measuring speed).

No assertion on wall-clock values."""

import math
import statistics
import warnings

import jax
import jax.numpy as jnp
import pytest

from mame_jax.eval import timing
from mame_jax.eval.timing import Timing, format_table, gflops, time_fn


def _counted(fn):
  calls = []

  def wrapper(*args):
    calls.append(1)
    return fn(*args)
  return wrapper, calls


def test_time_fn_calls_fn_once_to_compile_then_warmup_then_runs():
  fn, calls = _counted(jax.jit(lambda x: x @ x.T))
  t = time_fn(fn, jnp.ones((16, 8)), warmup=3, runs=5)
  assert len(calls) == 1 + 3 + 5
  assert len(t.runs_s) == 5 and t.warmup == 3
  assert t.compile_s > 0 and all(s > 0 for s in t.runs_s)


def test_time_fn_reports_the_median_and_min_of_the_timed_runs():
  t = time_fn(jax.jit(jnp.sin), jnp.ones(8), warmup=0, runs=6)
  assert t.median_s == statistics.median(t.runs_s)
  assert t.min_s == min(t.runs_s)
  assert t.per_item(4) == t.median_s / 4
  assert t.throughput(4) == pytest.approx(4 / t.median_s)


def test_time_fn_min_time_adds_runs_until_the_total_is_reached():
  fn, calls = _counted(jax.jit(jnp.cos))
  t = time_fn(fn, jnp.ones(8), warmup=0, runs=2, min_time=0.02)
  assert len(t.runs_s) >= 2 and sum(t.runs_s) >= 0.02
  assert len(calls) == 1 + len(t.runs_s)


def test_time_fn_waits_for_every_leaf_of_a_pytree_output():
  t = time_fn(jax.jit(lambda x: {"a": x + 1, "b": (x * 2, x.sum())}), jnp.ones(4), runs=2)
  assert isinstance(t, Timing) and len(t.runs_s) == 2


def test_time_fn_rejects_bad_counts():
  with pytest.raises(ValueError, match="runs"):
    time_fn(jnp.sin, jnp.ones(2), runs=0)
  with pytest.raises(ValueError, match="warmup"):
    time_fn(jnp.sin, jnp.ones(2), warmup=-1)


def test_gflops_of_a_matmul_is_2mkn():
  a, b = jnp.ones((64, 128)), jnp.ones((128, 32))
  assert gflops(lambda a, b: a @ b, a, b) == pytest.approx(2 * 64 * 128 * 32 / 1e9, rel=0.03)


def test_gflops_accepts_an_already_jitted_function():
  a = jnp.ones((32, 32))
  assert gflops(jax.jit(lambda a: a @ a), a) == pytest.approx(2 * 32 ** 3 / 1e9, rel=0.03)


@pytest.mark.parametrize("cost", [None, [], [{}], {"bytes accessed": 1.0}])
def test_gflops_is_nan_with_a_warning_without_a_cost_analysis(monkeypatch, cost):
  class Compiled:
    def cost_analysis(self):
      return cost

  class Lowered:
    def compile(self):
      return Compiled()

  class Jitted:
    def lower(self, *args):
      return Lowered()

  monkeypatch.setattr(timing.jax, "jit", lambda fn: Jitted())
  with pytest.warns(RuntimeWarning, match="nan"):
    assert math.isnan(gflops(lambda a: a, jnp.ones(2)))


def test_gflops_reads_the_first_program_of_an_old_style_list(monkeypatch):
  class Compiled:
    def cost_analysis(self):
      return [{"flops": 2e9}]

  monkeypatch.setattr(timing.jax, "jit", lambda fn: type(
      "J", (), {"lower": lambda self, *a: type("L", (), {"compile": lambda s: Compiled()})()})())
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert gflops(lambda a: a, jnp.ones(2)) == 2.0


def test_format_table_aligns_columns():
  rows = [{"name": "mame", "ms": 1.23456, "n": 7}, {"name": "attention", "ms": 123.4, "n": 1024}]
  lines = format_table(rows, ["name", "ms", "n"]).splitlines()
  assert len(lines) == 4 and len({len(l) for l in lines}) == 1
  bars = [[i for i, ch in enumerate(l) if ch == "|"] for l in lines]
  assert all(b == bars[0] for b in bars)  # every column boundary lines up
  assert lines == ["| name      |   ms |    n |",
                   "|:----------|-----:|-----:|",  # numbers right-aligned, text left
                   "| mame      | 1.23 |    7 |",
                   "| attention |  123 | 1024 |"]


def test_format_table_plain_style_and_missing_cells():
  rows = [{"a": 1, "b": "x"}, {"a": 22}]
  lines = format_table(rows, ["a", "b"], markdown=False).splitlines()
  assert lines == [" a  b", "--  -", " 1  x", "22"]


def test_device_description_and_today():
  assert jax.__version__ in timing.device_description()
  assert jax.devices()[0].platform in timing.device_description()
  assert len(timing.today()) == 10 and timing.today()[4] == "-"


class FakeClock:
  """A clock that advances only when a fake method runs: ``fn(name)`` returns a
  function taking its (programmed) durations in turn, and logs the call order."""

  def __init__(self):
    self.now, self.log = 0.0, []

  def __call__(self):
    return self.now

  def fn(self, name, durations):
    durations = iter(durations)

    def run(x):
      self.log.append(name)
      self.now += next(durations)
      return x
    return run


def test_time_interleaved_compiles_each_first_then_runs_rounds_in_turn():
  clock = FakeClock()
  # First value: the compiling call; then 1 warm-up; then 5 timed rounds.
  a = clock.fn("A", [10.0, 9.0, 1.0, 5.0, 2.0, 4.0, 3.0])
  b = clock.fn("B", [20.0, 9.0, 7.0, 6.0, 8.0, 6.5, 100.0])
  c = clock.fn("C", [30.0, 9.0, 0.5, 0.5, 0.5, 0.5, 0.5])
  x = jnp.ones(2)
  t = timing.time_interleaved({"A": (a, (x,)), "B": (b, (x,)), "C": (c, [x])},
                              rounds=5, warmup=1, clock=clock)
  assert clock.log == ["A", "B", "C"] + ["A", "B", "C"] * 6
  assert list(t) == ["A", "B", "C"]
  assert [t[n].compile_s for n in "ABC"] == [10.0, 20.0, 30.0]
  assert t["A"].runs_s == (1.0, 5.0, 2.0, 4.0, 3.0)
  assert t["A"].median_s == 3.0 and t["A"].min_s == 1.0 and t["A"].max_s == 5.0
  assert t["A"].iqr_s == 2.0  # quartiles 2 and 4
  assert t["B"].median_s == 7.0 and t["B"].max_s == 100.0  # one odd call moves no median
  assert t["C"].median_s == 0.5 and t["C"].iqr_s == 0.0
  assert t["A"].warmup == 1 and t["A"].to_dict()["iqr_s"] == 2.0


def test_time_interleaved_checks_its_arguments_and_times_real_calls():
  f = jax.jit(jnp.sin)
  with pytest.raises(ValueError, match="rounds"):
    timing.time_interleaved({"f": (f, (jnp.ones(2),))}, rounds=0)
  with pytest.raises(ValueError, match="warmup"):
    timing.time_interleaved({"f": (f, (jnp.ones(2),))}, warmup=-1)
  t = timing.time_interleaved({"f": (f, (jnp.ones(2),)), "g": (jax.jit(jnp.cos), (jnp.ones(2),))},
                              rounds=3, warmup=0)
  assert len(t["f"].runs_s) == len(t["g"].runs_s) == 3
  assert all(s >= 0 for s in t["g"].runs_s)
