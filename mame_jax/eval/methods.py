"""The rows of an evaluation: the baseline, MaMe at each tau, ToMe at each r."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from mame_jax.models.merging import (DEFAULT_TAU, DiffRateConfig, EViTConfig, MergeConfig,
                                     ToMeConfig, default_layers, parse_layers)


@dataclasses.dataclass
class Method:
  """One row of the table: a name and the ``merge`` config the model gets
  (``None`` for the baseline)."""

  name: str
  kind: str  # "baseline", "mame", "tome", "evit" or "diffrate"
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
  if isinstance(merge, EViTConfig):
    rate = merge.keep_rate
    shown = ",".join(f"{k:g}" for k in rate) if isinstance(rate, tuple) else f"{rate:g}"
    return Method(f"EViT(keep={shown})", "evit", merge)
  if isinstance(merge, DiffRateConfig):
    return Method(f"DiffRate({merge.label or 'schedule'})", "diffrate", merge)
  raise TypeError(f"Unknown merge config {type(merge).__name__}")


def tome_rows(tome_r=(), recipe: str = "timm") -> list:
  """ToMe ``r`` values -> one ``ToMeConfig`` each (every block), with ToMe's own
  settings for the model family (``ToMeConfig.recipe``: "timm" -- proportional
  attention, plain mean pool -- or "mae" -- no proportional attention,
  size-weighted pool). Entries that already are ``ToMeConfig`` pass as they are."""
  return [r if isinstance(r, ToMeConfig) else ToMeConfig.recipe(recipe, r=int(r))
          for r in tome_r]


def baseline_rows(merge_part) -> list:
  """The EViT and DiffRate rows a config's ``merge`` part asks for: one
  ``EViTConfig`` per ``merge.evit`` keep rate (in ``merge.evit_layers``, else
  EViT's own blocks) and one ``DiffRateConfig.from_spec`` per ``merge.diffrate``
  entry (``"deit_small@2.3"``). Fields the part lacks count as empty."""
  get = merge_part.get if hasattr(merge_part, "get") else lambda k, d=None: d
  layers = parse_layers(get("evit_layers"))
  evit = [EViTConfig(keep_rate=float(k), **({} if layers is None else {"layers": layers}))
          for k in (get("evit") or ())]
  return evit + [DiffRateConfig.from_spec(s) for s in (get("diffrate") or ())]


def build_methods(model, taus=(DEFAULT_TAU,), tome_r=(), merge_layers=None, extra=(),
                  tome_recipe: str = "timm", mame_fields=None) -> list:
  """Baseline, then ``MergeConfig(tau, merge_layers, **mame_fields)`` per tau
  (``mame_fields``: e.g. ``{"preserve": "sample", "execution": "packed"}``), then
  one ToMe row per ``r`` in ``tome_r`` (every block, ``tome_recipe``'s settings:
  see :func:`tome_rows`), then ``extra`` merge configs."""
  layers = default_layers(model.depth) if merge_layers is None else tuple(merge_layers)
  merges = ([None] + [MergeConfig(tau=float(t), layers=layers, **(mame_fields or {}))
                      for t in taus]
            + tome_rows(tome_r, tome_recipe) + list(extra))
  return [describe_merge(m) for m in merges]
