"""Training checkpoints with orbax: ``workdir/checkpoints/<step>/``.

One ``ocp.CheckpointManager`` writes, every ``ckpt_steps`` and at the end, two
items per step: ``state`` (params, optimiser state, step, RNG key data; saved
and restored with their shardings) and ``meta`` (JSON: the step, the data
position -- the next batch index, which with the seed fixes every later batch
-- and the seed). Writes are asynchronous (the step loop goes on while orbax
writes; ``wait`` before reading) and atomic (orbax finalises a step by a
rename, so a run killed while writing leaves the previous checkpoint as the
newest); the newest ``keep`` are kept.

A run killed (SIGKILL) while orbax writes leaves the step's unfinished
``<step>.orbax-checkpoint-tmp`` folder (its items half written, no ``<step>``
folder). orbax never lists it as a step, so ``latest`` ignores it, and opening
the manager again removes it (``cleanup_tmp_directories``): a leftover of a
step the next run does not save again does not stay behind
(``tests/test_train.py`` kills ``train.py`` mid-write and checks both).
"""

from __future__ import annotations

import os
from typing import Optional

import jax
import orbax.checkpoint as ocp


class Checkpoints:
  """``Checkpoints(workdir, keep=3)``: ``save(step, state, meta)``,
  ``latest()``, ``restore(step, like) -> (state, meta)``, ``wait()``, ``close()``."""

  def __init__(self, workdir, *, keep: int = 3, asynchronous: bool = True):
    self.directory = os.path.join(os.path.abspath(os.fspath(workdir)), "checkpoints")
    options = ocp.CheckpointManagerOptions(max_to_keep=max(int(keep), 1), create=True,
                                           enable_async_checkpointing=asynchronous,
                                           cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "meta"))

  def latest(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state, meta: dict) -> None:
    self.manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, like):
    """``like``: a pytree of arrays or ``jax.ShapeDtypeStruct`` s with the
    shardings to restore onto."""
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        like)
    out = self.manager.restore(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
