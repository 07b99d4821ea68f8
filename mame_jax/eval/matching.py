"""FLOP-matched baselines: ToMe, EViT and DiffRate set to the GFLOPs of a MaMe tau.

Table 1 compares methods at equal FLOPs. MaMe's token counts depend on the data,
the others' do not, so the comparison is set up in two steps:

1. **The target.** MaMe at ``tau`` (exact mode: nothing dropped) runs on the
   first batch of the evaluation data; its tokens after every block give its
   analytic GFLOPs per image (:func:`mame_jax.eval.calibrate.vit_gflops`: the
   matmuls, 2 per multiply-add, attention at the block's input length and the
   MLP at its output length, MaMe's own ``4 M N D`` included), averaged over the
   images.
2. **The matches**, from the same analytic count of their static token
   schedules (:func:`planned_tokens`), no model run needed:

   * ToMe (every block): the ``r`` whose GFLOPs are nearest the target
     (:func:`tome_r_matching`, every ``r`` tried);
   * EViT (its blocks, static): the keep rate found by bisection on the GFLOPs,
     which grow with the keep rate (:func:`evit_keep_matching`);
   * DiffRate: its schedules are *published at fixed FLOPs* (the search ran per
     target and is not redone here), so of the schedules published for the
     model (DeiT-T/S/B, MAE-B/L/H, told by width and depth) the one whose
     GFLOPs on it are nearest the target is taken (:func:`diffrate_matching`).

The analytic count leaves out element-wise work and the methods' own
selection (ToMe's similarities ``2 M N head_dim`` per block, EViT's and
DiffRate's sorting); ``mame-jax eval``'s table reports XLA's count of every
compiled program beside it, and the target in XLA's units (scaled by the
baseline's XLA / analytic ratio). MaMe's own XLA figure also includes the
padding of its capacity buckets (docs/design.md, §3 Static shapes), so it sits
a little above the target.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mame_jax import evit as evit_lib
from mame_jax.eval import timing
from mame_jax.eval.calibrate import vit_gflops
from mame_jax.eval.methods import describe_merge
from mame_jax.eval.runner import sequence_lengths
from mame_jax.models.inputs import check_images
from mame_jax.models.merging import (DIFFRATE_MODELS, EVIT_LAYERS, DiffRateConfig, EViTConfig,
                                     MergeConfig, ToMeConfig, default_layers, published_schedules)

# ----------------------------------------------------------------------------
# Static token schedules and their analytic GFLOPs


def planned_tokens(model, merge, length: int) -> list:
  """Tokens after each block (``model.depth`` counts, class token included) of a
  config with a static schedule, for ``length`` tokens entering block 0:

  * ``None``: ``length`` everywhere;
  * ``ToMeConfig``: a merging block removes ``min(r, (n - s) // 2)`` of its ``n``
    (ToMe's clip; ``s`` the class token);
  * ``EViTConfig``: in its blocks ``1 + k + 1`` with ``k = ceil(keep_rate * n)``
    of the ``n`` patch tokens kept (the fused token only when ``k < n``, and not
    when ``fuse=False``), as ``mame_jax.evit``;
  * ``DiffRateConfig``: its merge counts (capped by the tokens there are).

  A ``MergeConfig`` has no static schedule (MaMe's counts depend on the data):
  a ``TypeError``."""
  ns = model.num_special
  n, out = int(length), []
  for layer in range(model.depth):
    if isinstance(merge, ToMeConfig):
      if merge.layers is None or layer in merge.layers:
        n -= max(0, min(merge.r, (n - ns) // 2))
    elif isinstance(merge, EViTConfig):
      if merge.needs_cls_attention(layer):
        patches = n - 1
        keep = evit_lib.keep_count(patches, merge.rate_of(layer))
        n = n if keep == patches else 1 + keep + int(merge.fuse)
    elif isinstance(merge, DiffRateConfig):
      n = min(n, merge.prune[layer], merge.merge[layer])
    elif merge is not None:
      raise TypeError(f"planned_tokens: {type(merge).__name__} has no static token schedule "
                      "(MaMe's counts depend on the data: run it)")
    out.append(n)
  return out


def schedule_gflops(model, merge, image_hw) -> float:
  """Analytic GFLOPs per image (:func:`~mame_jax.eval.calibrate.vit_gflops`) of a
  static schedule (:func:`planned_tokens`) on ``image_hw = (H, W)`` images."""
  length, _ = sequence_lengths(model, image_hw)
  return float(vit_gflops(model, np.array([planned_tokens(model, merge, length)]), image_hw)[0])


def tokens_gflops(model, merge, tokens, image_hw) -> float:
  """Mean analytic GFLOPs per image of measured ``tokens (n, depth)`` (e.g.
  ``aux["tokens_per_block"]`` or an eval row's ``tokens_per_layer``); a
  ``MergeConfig`` also pays for its merges."""
  layers = merge.layers if isinstance(merge, MergeConfig) and merge.active else ()
  return float(np.mean(vit_gflops(model, tokens, image_hw, layers)))


# ----------------------------------------------------------------------------
# The matchers


def block_flops(length, width, mlp_dim) -> float:
  """Analytic FLOPs (2 per multiply-add) of one pre-LN block run entirely at
  ``length`` tokens: qkv and output projections, attention logits and values, MLP."""
  return 2 * length * (4 * width * width + 2 * width * mlp_dim) + 4 * length * length * width


def schedule_ratio(model, merge, length: int) -> float:
  """The blocks' analytic cost of a static schedule (:func:`planned_tokens`)
  over the plain model's, each block counted at the tokens entering it
  (:func:`block_flops`); ``length`` tokens enter block 0. Needs no image size, so
  it serves image and video models alike."""
  mlp = model.mlp_dim or 4 * model.width
  entering = [int(length)] + planned_tokens(model, merge, length)[:-1]
  cost = sum(block_flops(n, model.width, mlp) for n in entering)
  return cost / (model.depth * block_flops(length, model.width, mlp))


def _nearest_tome(model, length: int, cost, target: float, fields: dict) -> ToMeConfig:
  """The ``ToMeConfig(r, **fields)`` (every block) whose ``cost(config)`` is
  nearest ``target``; ties: the smaller ``r``. Every ``r`` from 0 to half the
  patches is tried (beyond, ToMe's clip changes nothing)."""
  ns = model.num_special
  best = min(range((int(length) - ns) // 2 + 1),
             key=lambda r: (abs(cost(ToMeConfig(r=r, **fields)) - target), r))
  return ToMeConfig(r=best, **fields)


def tome_r_matching(model, image_hw, target_gflops: float, **fields) -> ToMeConfig:
  """The ``ToMeConfig`` (every block; ``fields`` such as ``prop_attn`` pass on,
  e.g. a recipe's) whose analytic GFLOPs per image (:func:`schedule_gflops`) are
  nearest ``target_gflops``."""
  length, _ = sequence_lengths(model, image_hw)
  return _nearest_tome(model, length, lambda c: schedule_gflops(model, c, image_hw),
                       target_gflops, fields)


def tome_r_for_ratio(model, length: int, ratio: float) -> int:
  """The ToMe ``r`` (every block) whose cost ratio against the plain model
  (:func:`schedule_ratio`) is nearest ``ratio``, e.g. a MaMe row's measured
  GFLOPs over the baseline's; the benchmarks' matcher."""
  return _nearest_tome(model, length, lambda c: schedule_ratio(model, c, length), ratio, {}).r


def evit_keep_matching(model, image_hw, target_gflops: float, layers: Sequence[int] = EVIT_LAYERS,
                       *, fuse: bool = True, tol: float = 1e-4) -> EViTConfig:
  """The ``EViTConfig`` in ``layers`` (one keep rate for all) whose analytic
  GFLOPs are nearest ``target_gflops``: the GFLOPs grow with the keep rate, so a
  bisection on ``(0, 1]`` brackets the target to ``tol``, and the end of the
  bracket nearer the target wins (rounded to 4 decimals when that keeps its
  schedule). A target below what the smallest keep rate costs gets that rate;
  one above the plain model, ``keep_rate = 1``."""
  layers = tuple(int(l) for l in layers)
  EViTConfig(layers=layers).check_depth(model.depth)
  cost = lambda k: schedule_gflops(model, EViTConfig(keep_rate=k, layers=layers, fuse=fuse),
                                   image_hw)
  lo, hi = tol, 1.0
  if cost(hi) <= target_gflops:
    return EViTConfig(keep_rate=1.0, layers=layers, fuse=fuse)
  if cost(lo) < target_gflops:
    while hi - lo > tol:  # invariant: cost(lo) < target <= cost(hi)
      mid = 0.5 * (lo + hi)
      lo, hi = (mid, hi) if cost(mid) < target_gflops else (lo, mid)
  keep = min((lo, hi), key=lambda k: abs(cost(k) - target_gflops))
  rounded = round(keep, 4)
  keep = rounded if 0 < rounded <= 1 and cost(rounded) == cost(keep) else keep
  return EViTConfig(keep_rate=keep, layers=layers, fuse=fuse)


def fitting_schedules(model, image_hw, models: Optional[Sequence[str]] = None) -> list:
  """DiffRate's published schedules (``DiffRateConfig.published``) that fit the
  model: one count per block, none above the tokens entering block 0. ``models``:
  only these ``DIFFRATE_MODELS`` names (default: all)."""
  length, _ = sequence_lengths(model, image_hw)
  names = tuple(DIFFRATE_MODELS) if models is None else tuple(models)
  for name in names:
    if name not in DIFFRATE_MODELS:
      raise ValueError(f"DiffRate model must be one of {tuple(DIFFRATE_MODELS)}; got {name!r}")
  out = []
  for name in names:
    for g in published_schedules()[DIFFRATE_MODELS[name]]:
      cfg = DiffRateConfig.published(name, float(g))
      if len(cfg.prune) == model.depth and max(cfg.prune) <= length:
        out.append(cfg)
  return out


# DiffRate's models by (width, depth); a width-768 ViT is MAE's when it pools by
# the mean of its tokens (MAE fine-tuning), DeiT's when by the class token.
_DIFFRATE_ARCH = {(192, 12): "deit_tiny", (384, 12): "deit_small", (1024, 24): "mae_large",
                  (1280, 32): "mae_huge"}


def diffrate_model_of(model) -> Optional[str]:
  """The ``DIFFRATE_MODELS`` name of a ViT's architecture (DeiT-T/S/B, MAE-B/L/H),
  or ``None`` for one DiffRate publishes nothing for."""
  if (model.width, model.depth) == (768, 12):
    return "mae_base" if model.pool_type == "gap" else "deit_base"
  return _DIFFRATE_ARCH.get((model.width, model.depth))


def diffrate_matching(model, image_hw, target_gflops: float,
                      models: Optional[Sequence[str]] = None) -> Optional[DiffRateConfig]:
  """The published DiffRate schedule (:func:`fitting_schedules`) of ``models``
  (default: the model's own, :func:`diffrate_model_of`) whose analytic GFLOPs
  on this model are nearest ``target_gflops``, or ``None`` when none fits
  (DiffRate publishes schedules for DeiT-T/S/B and MAE-B/L/H at 224 px only).
  DiffRate's schedules come at fixed FLOPs, so the match is only as close as
  the nearest one."""
  if models is None:
    own = diffrate_model_of(model)
    if own is None:
      return None
    models = (own,)
  cands = fitting_schedules(model, image_hw, models)
  if not cands:
    return None
  return min(cands, key=lambda c: abs(schedule_gflops(model, c, image_hw) - target_gflops))


# ----------------------------------------------------------------------------
# One call: MaMe's target and every match


@dataclasses.dataclass
class FlopMatch:
  """What :func:`match_to_mame` measured and chose.

  Attributes:
    tau: MaMe's threshold; ``mame``: its ``MergeConfig``.
    target_gflops: MaMe's mean analytic GFLOPs per image on the measured images.
    baseline_gflops: the plain model's, the same count.
    tokens_per_layer: MaMe's mean tokens after each block there.
    num_images: the images measured (the first batch of the data).
    configs: the matched configs (ToMe, EViT, then DiffRate if one fits).
    gflops: each matched config's analytic GFLOPs (same order).
    notes: what the reader should know (e.g. no DiffRate schedule fits).
  """

  tau: float
  mame: MergeConfig
  target_gflops: float
  baseline_gflops: float
  tokens_per_layer: list
  num_images: int
  image_hw: tuple
  configs: list
  gflops: list
  notes: list = dataclasses.field(default_factory=list)

  def to_json(self) -> dict:
    return dict(tau=self.tau, merge_layers=list(self.mame.layers),
                target_gflops=self.target_gflops, baseline_gflops=self.baseline_gflops,
                tokens_per_layer=self.tokens_per_layer, num_images=self.num_images,
                matched=[dict(name=describe_merge(c).name, gflops=g)
                         for c, g in zip(self.configs, self.gflops)],
                notes=list(self.notes), units="analytic (matmuls, 2 per multiply-add)")


def check_tau(tau) -> float:
  """``tau`` as a float in [-1, 1), else a ``ValueError`` saying why."""
  try:
    tau = float(tau)
  except (TypeError, ValueError):
    raise ValueError(f"match tau must be a number in [-1, 1); got {tau!r}") from None
  if not -1 <= tau < 1:
    raise ValueError(f"match tau must be in [-1, 1) (cosine similarity; at tau >= 1 MaMe "
                     f"merges nothing, so there is nothing to match); got {tau:g}")
  return tau


def match_to_mame(model, params, images, tau: float, *, merge_layers=None, valid=None,
                  evit_layers: Optional[Sequence[int]] = None, tome_fields: Optional[dict] = None,
                  diffrate_models: Optional[Sequence[str]] = None,
                  mame_fields: Optional[dict] = None) -> FlopMatch:
  """MaMe at ``tau`` on ``images (B, H, W, 3)`` (rows where ``valid`` only), then
  ToMe, EViT and DiffRate set to its GFLOPs (see the module docstring).

  Args:
    merge_layers: MaMe's blocks (default the first 8).
    evit_layers: EViT's blocks (default EViT's own, ``(3, 6, 9)``).
    tome_fields: ``ToMeConfig`` fields of the ToMe row (e.g. a recipe's).
    diffrate_models: DiffRate models whose published schedules may be picked
      (default: the model's own architecture, :func:`diffrate_model_of`).
    mame_fields: further ``MergeConfig`` fields of the MaMe row (``preserve``,
      ...), so that the target is the row the evaluation runs.
  """
  tau = check_tau(tau)
  if not model.has_class_token:
    raise ValueError("FLOP matching needs a class token: EViT and DiffRate rank tokens by "
                     "the class token's attention")
  layers = default_layers(model.depth) if merge_layers is None else tuple(merge_layers)
  evit_layers = EVIT_LAYERS if evit_layers is None else tuple(evit_layers)
  beyond = [l for l in evit_layers if l >= model.depth]
  if beyond:
    raise ValueError(f"EViT blocks {evit_layers} (merge.evit_layers): block(s) {beyond} are "
                     f"beyond the model's depth {model.depth}")
  mame = MergeConfig(tau=tau, layers=layers, **(mame_fields or {}))
  check_images(model, params, images)
  images = jnp.asarray(images)
  # Full capacities (capacities=None): exact, nothing dropped, one compiled program --
  # the counts exact mode would give, without its bucket search.
  counting = model.clone(merge=mame.replace(capacities=None, mode="exact"))
  tokens = jax.jit(lambda p, x: counting.apply({"params": p}, x)[1]["tokens_per_block"])(
      params, images)
  tokens = np.asarray(tokens, np.float64)
  if valid is not None:
    tokens = tokens[np.asarray(valid, bool)]
  image_hw = tuple(images.shape[1:3])
  # At the mean tokens per block, as the evaluation's row reports them (with
  # preserve="sample" the images' counts differ, and the mean of their quadratic
  # attention costs would not be the cost of the mean).
  target = tokens_gflops(model, mame, tokens.mean(0, keepdims=True), image_hw)
  configs = [tome_r_matching(model, image_hw, target, **(tome_fields or {})),
             evit_keep_matching(model, image_hw, target, evit_layers)]
  notes = []
  dr = diffrate_matching(model, image_hw, target, diffrate_models)
  if dr is None:
    length, _ = sequence_lengths(model, image_hw)
    notes.append(f"no DiffRate row: DiffRate publishes no schedule for this model "
                 f"(width {model.width}, {model.depth} blocks, {length} tokens)"
                 + (f" among {tuple(diffrate_models)}" if diffrate_models else ""))
  else:
    configs.append(dr)
    notes.append(f"DiffRate publishes schedules at fixed FLOPs: {dr.label} is the nearest "
                 "to the target, not re-searched")
  return FlopMatch(tau=tau, mame=mame, target_gflops=target,
                   baseline_gflops=schedule_gflops(model, None, image_hw),
                   tokens_per_layer=tokens.mean(0).tolist(), num_images=len(tokens),
                   image_hw=image_hw, configs=configs,
                   gflops=[schedule_gflops(model, c, image_hw) for c in configs], notes=notes)


def match_rows(match: FlopMatch, model, rows: Sequence[dict]) -> list:
  """Per row of an evaluation (``result["rows"]`` of ``mame_jax.eval.loop``):
  ``name``, ``gflops_per_image`` (XLA's, from the row), ``matched_gflops`` (the
  analytic count at the tokens the row kept over the whole evaluation),
  ``target_gflops`` and ``off_target_pct``. Analytic figures are given in XLA's
  units -- times the baseline row's XLA / analytic ratio -- so that all compare."""
  base = next(r for r in rows if r["method"] == "baseline")
  scale = base["gflops_per_image"] / match.baseline_gflops
  out = []
  for r in rows:
    merge = match.mame if r["method"] == "mame" else None
    g = tokens_gflops(model, merge, np.array([r["tokens_per_layer"]]), match.image_hw) * scale
    out.append(dict(name=r["name"], gflops_per_image=r["gflops_per_image"], matched_gflops=g,
                    target_gflops=match.target_gflops * scale,
                    off_target_pct=round(100.0 * (g / (match.target_gflops * scale) - 1), 3),
                    xla_per_analytic=scale))
  return out


def match_json(match: FlopMatch, model, rows: Sequence[dict]) -> dict:
  """:meth:`FlopMatch.to_json` and :func:`match_rows`, for the result file."""
  return {**match.to_json(), "rows": match_rows(match, model, rows)}


def format_match(match: FlopMatch, model, rows: Sequence[dict]) -> str:
  """The lines under ``mame-jax eval``'s table: the target, then every row's XLA
  GFLOPs, its analytic ("matched") GFLOPs and how far that is from the target
  (:func:`match_rows`), then the notes."""
  per_row = match_rows(match, model, rows)
  shown = [{"method": r["name"], "GFLOPs/img": r["gflops_per_image"],
            "matched GFLOPs/img": r["matched_gflops"], "target": r["target_gflops"],
            "off target %": r["off_target_pct"]} for r in per_row]
  head = (f"FLOP-matched to MaMe(tau={match.tau:g}), measured on the first "
          f"{match.num_images} images: target {per_row[0]['target_gflops']:.4g} GFLOPs/img "
          "(analytic count of its tokens, in XLA's units); ToMe's r and EViT's keep rate are "
          "solved for it. 'matched' = the analytic count at each row's tokens over the whole "
          "evaluation; 'GFLOPs/img' = XLA's count (MaMe's includes bucket padding).")
  return "\n".join([head, timing.format_table(shown, list(shown[0]))] +
                   [f"note: {n}" for n in match.notes])
