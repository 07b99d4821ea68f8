"""Buckets and compilation counting (docs/design.md, §3 Static shapes)."""

import jax
import jax.numpy as jnp
import pytest

from mame_jax import mame
from mame_jax.buckets import TraceCounter, bucket_for, geometric_buckets, linear_buckets


def test_linear_and_geometric_buckets_end_at_the_full_capacity():
  assert linear_buckets(98, 16) == (0, 16, 32, 48, 64, 80, 96, 98)
  g = geometric_buckets(98, first=8)
  assert g[0] == 0 and g[-1] == 98 and list(g) == sorted(set(g))
  assert all(b % 8 == 0 for b in g[:-1])


def test_bucket_for_is_the_smallest_bucket_that_fits():
  buckets = (0, 16, 32, 40)
  assert [bucket_for(r, buckets) for r in (0, 1, 16, 17, 40)] == [0, 16, 16, 32, 40]
  with pytest.raises(ValueError, match="exceeds the largest bucket"):
    bucket_for(41, buckets)


def test_bucketing_bounds_the_number_of_compilations():
  counter = TraceCounter()
  f = jax.jit(counter(lambda x, capacity: mame(x, 0.5, capacity=capacity)[0]),
              static_argnames="capacity")
  x = jnp.ones((1, 64, 4))
  buckets = linear_buckets(32, 16)
  for r in range(0, 33, 3):
    f(x, capacity=bucket_for(r, buckets))
  assert counter.count == len({bucket_for(r, buckets) for r in range(0, 33, 3)}) == 3
  for r in range(0, 33, 3):
    f(x, capacity=r)
  assert counter.count == 3 + len({r for r in range(0, 33, 3)} - {0, 16, 32})


def test_bad_bucket_arguments():
  with pytest.raises(ValueError, match="step"):
    linear_buckets(10, 0)
  with pytest.raises(ValueError, match="growth"):
    geometric_buckets(10, growth=1.0)
  with pytest.raises(ValueError, match="r must be >= 0"):
    bucket_for(-1, (0, 8))
