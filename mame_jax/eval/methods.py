"""The rows of an evaluation: the baseline, MaMe at each tau, ToMe at each r."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from mame_jax.models.merging import DEFAULT_TAU, MergeConfig, ToMeConfig, default_layers


@dataclasses.dataclass
class Method:
  """One row of the table: a name and the ``merge`` config the model gets
  (``None`` for the baseline)."""

  name: str
  kind: str  # "baseline", "mame" or "tome"
  merge: Any = None
  tau: Any = None
  r: Optional[int] = None


def describe_merge(merge) -> Method:
  """``None`` / ``MergeConfig`` / ``ToMeConfig`` -> :class:`Method`. A
  ``MergeConfig`` with one tau per layer gets ``tau`` as a list (JSON) and the
  name ``MaMe(tau=0.5,0.7)``."""
  if merge is None:
    return Method("baseline", "baseline")
  if isinstance(merge, MergeConfig):
    tau = [float(t) for t in merge.tau] if merge.per_layer else float(merge.tau)
    shown = ",".join(f"{t:g}" for t in tau) if isinstance(tau, list) else f"{tau:g}"
    return Method(f"MaMe(tau={shown})", "mame", merge, tau=tau)
  if isinstance(merge, ToMeConfig):
    return Method(f"ToMe(r={merge.r})", "tome", merge, r=merge.r)
  raise TypeError(f"Unknown merge config {type(merge).__name__}")


def tome_rows(tome_r=(), recipe: str = "timm") -> list:
  """ToMe ``r`` values -> one ``ToMeConfig`` each (every block), with ToMe's own
  settings for the model family (``ToMeConfig.recipe``: "timm" -- proportional
  attention, plain mean pool -- or "mae" -- no proportional attention,
  size-weighted pool). Entries that already are ``ToMeConfig`` pass as they are."""
  return [r if isinstance(r, ToMeConfig) else ToMeConfig.recipe(recipe, r=int(r))
          for r in tome_r]


def build_methods(model, taus=(DEFAULT_TAU,), tome_r=(), merge_layers=None, extra=(),
                  tome_recipe: str = "timm") -> list:
  """Baseline, then ``MergeConfig(tau, merge_layers)`` per tau, then one ToMe row
  per ``r`` in ``tome_r`` (every block, ``tome_recipe``'s settings: see
  :func:`tome_rows`), then ``extra`` merge configs."""
  layers = default_layers(model.depth) if merge_layers is None else tuple(merge_layers)
  merges = ([None] + [MergeConfig(tau=float(t), layers=layers) for t in taus]
            + tome_rows(tome_r, tome_recipe) + list(extra))
  return [describe_merge(m) for m in merges]
