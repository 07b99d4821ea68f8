"""Devices and hosts: the data mesh, a host's rows of a sharded batch, sums over hosts."""

from __future__ import annotations

from typing import Optional

import jax
import numpy as np
from jax.sharding import Mesh


def make_mesh(num_devices: Optional[int] = None) -> Mesh:
  """A 1-D ``"data"`` mesh over all devices (every host's), or the first
  ``num_devices`` local ones."""
  devices = jax.devices() if num_devices is None else jax.local_devices()[:num_devices]
  if num_devices is not None and len(devices) < num_devices:
    raise ValueError(f"asked for {num_devices} devices; only {len(devices)} available")
  return Mesh(np.array(devices), ("data",))


def local_rows(x) -> np.ndarray:
  """This process's rows of a batch-sharded array, in batch order."""
  if x.is_fully_addressable:
    return np.asarray(x)
  seen, parts = set(), []
  for shard in sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0):
    start = shard.index[0].start or 0
    if start not in seen:
      seen.add(start)
      parts.append(np.asarray(shard.data))
  return np.concatenate(parts)


def sum_over_hosts(values: np.ndarray) -> np.ndarray:
  if jax.process_count() == 1:
    return values
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return np.asarray(multihost_utils.process_allgather(values)).sum(axis=0)

