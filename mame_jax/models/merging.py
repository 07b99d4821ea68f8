"""What a ViT block calls between attention and MLP: MaMe or ToMe, by config.

A model gets one hashable config in its ``merge=`` slot and calls it in every
block (``x, token_mask, size, aux = merge(x, token_mask, size, keys, layer=i,
num_special=1)``); the config decides whether that block merges and how. The
model knows nothing about the merge, the merge nothing about the model.

* :class:`MergeConfig` -- MaMe (eqs. 14-16): ``x = x + MSA(LN(x)); x = MaMe(x);
  x = x + MLP(LN(x))`` in ``layers``. The training-free default is the paper's:
  the first 8 blocks, ``tau = 0.8``.
* :class:`ToMeConfig` -- ToMe's bipartite soft matching, ``r`` tokens per block,
  on the attention keys, size-weighted, with optional proportional attention.

Capacities. Inside a compiled model every merge layer needs a static capacity
(docs/design.md, §3 Static shapes). ``capacities=None`` keeps every preserved
token (capacity = N, the most a layer can preserve) -- exact but with padding,
so slow;
:class:`mame_jax.eval.runner.Runner` picks bucketed capacities, re-running a batch
whose layers overflowed ("exact" mode), or runs the capacities you give and
counts the dropped tokens ("fixed" mode: the paper's training setting, where
preserved tokens beyond the capacity are discarded).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from importlib import resources
from typing import Optional, Union

import jax
import jax.numpy as jnp

from mame_jax import diffrate as diffrate_lib
from mame_jax.buckets import even_buckets, linear_buckets
from mame_jax import evit as evit_lib
from mame_jax import tome as tome_lib
from mame_jax.merge import (PARTITIONS, PRESERVE, SIMILARITIES, MergeInfo, is_traced, mame,
                            merged_length, num_sources)
from mame_jax.restore import RESTORES, restore as restore_stack

DEFAULT_TAU = 0.8        # the paper's training-free threshold
DEFAULT_NUM_LAYERS = 8   # ... in the first 8 blocks
MODES = ("exact", "fixed", "budget")
# How the blocks after a merge run: on the padded (B, L) layout, or with their
# token-wise layers on the real tokens only (mame_jax.models.packing).
EXECUTIONS = ("padded", "packed")
METRICS = ("tokens", "keys")
# Where a model whose head needs every patch gets its token grid back: after the
# last block, or in every merge block right after attention (eq. 17).
RESTORE_AT = ("end", "attention")
# Exact mode's capacity buckets per layer (bucket_step=None): equal steps up to N.
BUCKETS_PER_LAYER = 8


class _Restoring:
  """What MergeConfig and ToMeConfig share about giving a dense head its grid back
  (their ``restore``, ``restore_at`` and ``restore_before_norm`` fields)."""

  @property
  def keeps_length(self) -> bool:
    """True when every block hands on as many tokens as it got: the merge is
    undone right after attention (``restore_at="attention"``, eq. 17)."""
    return self.restore is not None and self.restore_at == "attention"

  def restore_end(self, x, token_mask, size, aux, *, normed: bool):
    """After the last block: the grid back (see :func:`restore_end`)."""
    return restore_end(self, x, token_mask, size, aux, normed=normed)


@dataclasses.dataclass(frozen=True)
class MergeConfig(_Restoring):
  """MaMe inside a model's blocks.

  Attributes:
    tau: similarity threshold (eq. 3): one float for every merge layer, or a
      tuple with one tau per entry of ``layers`` (``tau[i]`` is the threshold of
      block ``layers[i]``; calibration picks these). Inside a jitted function
      the entries (or the single tau) may be traced scalars, so that one
      compiled program serves every candidate threshold. Read it with
      :meth:`tau_of`.
    layers: indices of the blocks that merge.
    capacities: one static capacity per entry of ``layers`` (``None`` entries or
      ``None`` overall: the full capacity N of that layer, nothing ever dropped).
    mode: "exact" (the runner grows a layer's bucket and re-runs the batch when
      it overflows: no preserved token is ever dropped) or "fixed" (the given
      capacities; overflowing preserved tokens are dropped and counted). With
      ``mode="fixed"`` and no capacities every layer gets capacity 0: each merge
      halves the tokens (2:1), the paper's from-scratch training setting. Or
      "budget": a static budget that drops nothing -- one program, the given
      ``capacities`` (required), ``preserve="sample"`` (required: batch
      invariant); an image with more preserved sources than its layer's capacity
      merges the least unique of the surplus (highest best similarity) into
      their most similar destinations (``info.forced`` counts them), an image
      within it gets exactly eqs. 1-10.
    metric: merge on the "tokens" themselves (default) or the attention "keys"
      (averaged over heads).
    partition, similarity, causal, eps: as in :func:`mame_jax.mame`.
    seed: seeds ``partition="random"`` (folded with the layer index).
    bucket_step: the capacities exact mode picks in a layer of ``N`` sources:
      ``None`` (default) :data:`BUCKETS_PER_LAYER` equal steps up to ``N``
      (``ceil(N / 8)``: 16 for DINOv2-S's first layer, N = 128), so the padding
      and the number of programs stay in proportion at every size; an int: its
      multiples, and ``N`` (:meth:`buckets`).
    preserve: "batch" (the paper's batch-wide preservation mask, the default) or
      "sample" (every image keeps its own preserved sources: its tokens, logits
      and token counts are those of the batch of one holding it; rows are padded
      to the batch's longest, and padded tokens are masked everywhere).
    execution: "padded" (every block runs on the padded ``(B, L)`` layout) or
      "packed" (after each merge layer, the LayerNorms, projections and MLP run
      on the batch's real tokens only, gathered into a flat buffer;
      :mod:`mame_jax.models.packing`). Same values either way.
    packed_sizes: with "packed", the flat buffer's static size after each merge
      layer (one entry per layer; ``None`` entries or ``None`` overall: every
      slot, ``B * L``). The runner's exact mode picks and grows them; a buffer
      smaller than the real tokens would lose tokens, so give them by hand only
      with care.
    restore: ``None`` (default: the sequence stays merged, as classification
      wants), "mare" (eqs. 11-13, MaRe's shares) or "copy" (copy-back: every
      token gets a whole output) -- for models whose head needs every patch
      back, such as a saliency or segmentation decoder.
    restore_at: "end" (after the last block, every merge undone last first by
      ``mame_jax.restore``) or "attention" (eq. 17 in every merge block: merge
      the normed tokens, attend, restore, so every block keeps its length; the
      merge then measures similarity on those tokens, ``metric="tokens"``, and
      ``execution`` has no effect).
    restore_before_norm: with "end", restore before the final LayerNorm (the
      default: MaRe divides a fused token by ``R_i``, which suits the summed
      residual stream and which the norm then rescales) or after it.
  """

  tau: Union[float, tuple] = DEFAULT_TAU
  layers: tuple = tuple(range(DEFAULT_NUM_LAYERS))
  capacities: Optional[tuple] = None
  mode: str = "exact"
  metric: str = "tokens"
  partition: str = "alternating"
  similarity: str = "cosine"
  causal: bool = False
  eps: float = 1e-6
  seed: int = 0
  bucket_step: Optional[int] = None
  preserve: str = "batch"
  execution: str = "padded"
  packed_sizes: Optional[tuple] = None
  restore: Optional[str] = None
  restore_at: str = "end"
  restore_before_norm: bool = True

  def __post_init__(self):
    object.__setattr__(self, "layers", _int_tuple(self.layers, "layers"))
    object.__setattr__(self, "tau", _check_tau(self.tau, self.layers))
    _check_restore(self)
    if self.restore_at == "attention" and self.restore and self.metric == "keys":
      raise ValueError("MergeConfig(restore_at='attention') merges before attention, where "
                       "there are no keys yet: use metric='tokens'")
    if self.capacities is not None:
      caps = tuple(None if c is None else int(c) for c in self.capacities)
      if len(caps) != len(self.layers):
        raise ValueError(f"MergeConfig.capacities needs one entry per merge layer "
                         f"({len(self.layers)}); got {len(caps)}")
      if any(c is not None and c < 0 for c in caps):
        raise ValueError(f"MergeConfig.capacities must be >= 0; got {caps}")
      object.__setattr__(self, "capacities", caps)
    for name, value, allowed in (("mode", self.mode, MODES), ("metric", self.metric, METRICS),
                                 ("partition", self.partition, PARTITIONS),
                                 ("similarity", self.similarity, SIMILARITIES),
                                 ("preserve", self.preserve, PRESERVE),
                                 ("execution", self.execution, EXECUTIONS)):
      if value not in allowed:
        raise ValueError(f"MergeConfig.{name} must be one of {allowed}; got {value!r}")
    if self.bucket_step is not None and (isinstance(self.bucket_step, bool) or not isinstance(
        self.bucket_step, int) or self.bucket_step < 1):
      raise ValueError(f"MergeConfig.bucket_step must be None or an int >= 1; got "
                       f"{self.bucket_step!r}")
    if self.mode == "budget" and (self.capacities is None or None in self.capacities):
      raise ValueError("MergeConfig(mode='budget') needs capacities: one static number of "
                       f"preserved tokens per merge layer ({len(self.layers)}); got "
                       f"{self.capacities!r}")
    if self.mode == "budget" and self.preserve != "sample":
      raise ValueError("MergeConfig(mode='budget') needs preserve='sample': each image "
                       "spends its own budget, whatever its batch mates")
    if self.packed_sizes is not None:
      sizes = tuple(None if t is None else int(t) for t in self.packed_sizes)
      if len(sizes) != len(self.layers) or any(t is not None and t < 1 for t in sizes):
        raise ValueError(f"MergeConfig.packed_sizes needs one size >= 1 (or None) per merge "
                         f"layer ({len(self.layers)}); got {self.packed_sizes!r}")
      object.__setattr__(self, "packed_sizes", sizes)

  def replace(self, **kw) -> "MergeConfig":
    return dataclasses.replace(self, **kw)

  @property
  def per_layer(self) -> bool:
    """True when ``tau`` holds one threshold per merge layer."""
    return isinstance(self.tau, tuple)

  def tau_of(self, layer: int):
    """The threshold of block ``layer`` (a float, or a traced scalar inside jit).
    Raises ``ValueError`` when ``layer`` is not a merge layer."""
    if layer not in self.layers:
      raise ValueError(f"layer {layer} is not a merge layer of this MergeConfig "
                       f"(layers={self.layers})")
    return self.tau[self.layers.index(layer)] if self.per_layer else self.tau

  @property
  def active(self) -> bool:
    """False when nothing can merge: cosine similarity never exceeds 1, so with
    ``tau >= 1`` in every merge layer the blocks skip MaMe and the model is
    exactly the plain one. Traced taus are unknown at trace time: active."""
    if not self.layers:
      return False
    taus = self.tau if self.per_layer else (self.tau,)
    if self.similarity != "cosine" or is_traced(*taus):
      return True
    return any(t < 1 for t in taus)

  def capacity(self, layer: int, length: int, num_special: int) -> int:
    """Static capacity of ``layer`` for a sequence of ``length`` tokens."""
    full = num_sources(length, num_special)
    caps = self.capacities
    if caps is None:
      caps = (0,) * len(self.layers) if self.mode == "fixed" else (None,) * len(self.layers)
    c = caps[self.layers.index(layer)]
    return full if c is None else min(c, full)

  @property
  def packs(self) -> bool:
    """Whether the blocks after a merge run packed: ``execution="packed"`` on an
    active config whose merges shorten the sequence (with ``restore_at=
    "attention"`` no block gets shorter, so there is nothing to pack and the
    execution setting has no effect)."""
    return self.execution == "packed" and self.active and not self.keeps_length

  def buckets(self, n: int) -> tuple:
    """The capacities exact mode draws from in a layer of ``n`` sources (see
    ``bucket_step``); the last is ``n``, which never overflows."""
    if self.bucket_step is None:
      return even_buckets(n, BUCKETS_PER_LAYER)
    return linear_buckets(n, self.bucket_step)

  def packed_size(self, layer: int, batch: int, length: int, num_special: int, stage):
    """The packed buffer's static size after block ``layer``, for a block that
    receives ``(batch, length)`` tokens: ``stage`` (the current buffer) unless
    the block merges; after a merge layer, its ``packed_sizes`` entry, at most
    every slot ``batch * merged length``. ``None`` unless the config
    :attr:`packs`."""
    if not self.packs:
      return None
    if layer not in self.layers:
      return stage
    full = batch * merged_length(length, num_special,
                                 self.capacity(layer, length, num_special))
    sizes = self.packed_sizes
    size = None if sizes is None else sizes[self.layers.index(layer)]
    return full if size is None else min(size, full)

  def mame_options(self, layer: int) -> dict:
    """The ``mame`` arguments this config sets in block ``layer`` besides tau,
    capacity and the metric: one definition for the ViT hook and the generation
    blocks."""
    key = (jax.random.fold_in(jax.random.key(self.seed), layer)
           if self.partition == "random" else None)
    return dict(eps=self.eps, partition=self.partition, similarity=self.similarity,
                causal=self.causal, key=key, preserve=self.preserve,
                surplus="merge" if self.mode == "budget" else "drop")

  def brackets(self, layer: int) -> bool:
    """Whether block ``layer`` merges before attention and restores after it
    (:meth:`bracket`) instead of merging between attention and MLP."""
    return self.keeps_length and layer in self.layers and self.active

  def bracket(self, attend, x, token_mask, *, layer, num_special=0):
    """Eq. (17) in a perception block: ``restore(attend(MaMe(x)))``, ``x`` (B, L, D)
    the block's normed tokens, ``attend(tokens, token_mask) -> tokens``. Returns
    ``(out (B, L, D'), aux)`` with the merge record in ``aux["info"]``."""
    y, info = mame(x, self.tau_of(layer), num_special=num_special, token_mask=token_mask,
                   capacity=self.capacity(layer, x.shape[1], num_special),
                   **self.mame_options(layer))
    return restore_stack(attend(y, info.token_mask), [info], self.restore), {"info": info}

  def __call__(self, x, token_mask, size, keys, *, layer, num_special=0):
    """Block hook: ``x (B, L, D) -> (B, num_special + M + c, D)`` in merge layers."""
    if layer not in self.layers or not self.active or self.keeps_length:
      return x, token_mask, size, {}
    c = self.capacity(layer, x.shape[1], num_special)
    y, info = mame(x, self.tau_of(layer), num_special=num_special, capacity=c,
                   token_mask=token_mask, metric=keys if self.metric == "keys" else None,
                   **self.mame_options(layer))
    # MaMe's average (eq. 9) is not size-weighted: sizes stop being tracked.
    return y, info.token_mask, None, {"info": info}


TOME_POOLS = ("mean", "size_weighted")
# ToMe's own settings per model family (facebookresearch/ToMe, tome/patch/): its
# timm patch turns proportional attention on for off-the-shelf models; its MAE patch
# turns it off ("for MAE models, prop_attn should be set to false") and makes the
# global average pool weigh each token by its size.
TOME_RECIPES = {
    "timm": dict(prop_attn=True, pool="mean"),
    "mae": dict(prop_attn=False, pool="size_weighted"),
}


@dataclasses.dataclass(frozen=True)
class ToMeConfig(_Restoring):
  """ToMe (Bolya et al. 2023) inside a model's blocks, for comparison.

  The defaults are ToMe's timm recipe; :meth:`recipe` gives its MAE one.

  Attributes:
    r: tokens merged away per merging block (clipped to what a block can merge).
    layers: the merging blocks; ``None`` means every block.
    prop_attn: proportional attention, ``log(size)`` added to attention logits.
    order: "tome" (ToMe's own output order) or "sorted" (unmerged tokens always
      by position); see :mod:`mame_jax.tome`. They differ only without a class
      token.
    pool: how a ``pool_type="gap"`` model averages its final tokens: "mean" (each
      token once, ToMe's timm patch) or "size_weighted" (each token by the number
      of patches it holds, ToMe's MAE patch: the mean over the original patches).
    restore, restore_at, restore_before_norm: as in :class:`MergeConfig`; ToMe's
      records are restored by its own unmerge (``mame_jax.restore``). In the
      "attention" placement ToMe matches the normed tokens and runs no
      proportional attention (ToMe-SD's placement).
  """

  r: int = 8
  layers: Optional[tuple] = None
  prop_attn: bool = True
  order: str = "tome"
  pool: str = "mean"
  restore: Optional[str] = None
  restore_at: str = "end"
  restore_before_norm: bool = True

  def __post_init__(self):
    if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 0:
      raise ValueError(f"ToMeConfig.r must be an int >= 0; got {self.r!r}")
    _check_restore(self)
    if self.layers is not None:
      object.__setattr__(self, "layers", _int_tuple(self.layers, "layers"))
    for name, value, allowed in (("order", self.order, tome_lib.ORDERS),
                                 ("pool", self.pool, TOME_POOLS)):
      if value not in allowed:
        raise ValueError(f"ToMeConfig.{name} must be one of {allowed}; got {value!r}")

  @classmethod
  def recipe(cls, name: str, **fields) -> "ToMeConfig":
    """ToMe as its authors run it on a model family: ``name`` in
    ``TOME_RECIPES`` ("timm": DeiT / AugReg / SigLIP; "mae": MAE fine-tuned
    models); ``fields`` (``r``, ``layers``, ...) win over the recipe's."""
    if name not in TOME_RECIPES:
      raise ValueError(f"ToMe recipe must be one of {tuple(TOME_RECIPES)}; got {name!r}")
    return cls(**{**TOME_RECIPES[name], **fields})

  def replace(self, **kw) -> "ToMeConfig":
    return dataclasses.replace(self, **kw)

  def _merges(self, layer: int) -> bool:
    return self.r > 0 and (self.layers is None or layer in self.layers)

  def brackets(self, layer: int) -> bool:
    """Whether block ``layer`` merges before attention and restores after it."""
    return self.keeps_length and self._merges(layer)

  def bracket(self, attend, x, token_mask, *, layer, num_special=0):
    """``restore(attend(ToMe(x)))`` (the eq. 17 placement; ToMe-SD's, with no
    proportional attention): the matching runs on the normed tokens themselves.
    Returns ``(out (B, L, D'), {"record": ToMeRecord})``."""
    del layer
    y, _, record = self._merge(x, None, None, num_special)
    out = attend(y, jnp.ones(y.shape[:2], bool))
    return restore_stack(out, [record], self.restore), {"record": record}

  def _merge(self, x, keys, size, num_special):
    held = max(num_special - 1, 0)  # registers after the class token: held aside
    if held:
      return tome_lib.tome_holding(x, self.r, held, metric=keys, size=size, order=self.order)
    return tome_lib.tome(x, self.r, metric=keys, size=size, class_token=num_special > 0,
                         order=self.order)

  def __call__(self, x, token_mask, size, keys, *, layer, num_special=0):
    """Block hook: ``x (B, L, D) -> (B, L - r, D)`` with sizes tracked. ToMe works
    on unpadded sequences; the model never pads before a ToMe block."""
    if not self._merges(layer) or self.keeps_length:
      return x, token_mask, size, {}
    y, size, record = self._merge(x, keys, size, num_special)
    return y, jnp.ones(y.shape[:2], bool), size, {"record": record}


# EViT's own placement (youweiliang/evit: ``drop_loc=(3, 6, 9)``, 0-based): blocks
# 4, 7 and 10 of a 12-block ViT.
EVIT_LAYERS = (3, 6, 9)


@dataclasses.dataclass(frozen=True)
class EViTConfig:
  """EViT (Liang et al. 2022) inside a model's blocks, training-free, for comparison.

  In each of ``layers``, after attention, the ``ceil(keep_rate * n)`` patch tokens
  the class token attends to most are kept and the rest fused into one token
  (:mod:`mame_jax.evit`). Needs a class token (``num_special >= 1``).

  Attributes:
    keep_rate: one rate for every layer, or a tuple with one per entry of ``layers``.
    layers: the pruning blocks (0-based); EViT's default ``(3, 6, 9)``.
    fuse: fuse the inattentive tokens into one (EViT's ``--fuse_token``), else drop them.
  """

  keep_rate: Union[float, tuple] = 0.7
  layers: tuple = EVIT_LAYERS
  fuse: bool = True

  def __post_init__(self):
    object.__setattr__(self, "layers", _int_tuple(self.layers, "layers"))
    rates = self.keep_rate
    if isinstance(rates, (list, tuple)):
      rates = tuple(rates)
      if len(rates) != len(self.layers):
        raise ValueError(f"EViTConfig.keep_rate needs one rate per layer (layers="
                         f"{self.layers}: {len(self.layers)}); got {len(rates)}: {rates!r}")
    for i, r in enumerate(rates if isinstance(rates, tuple) else (rates,)):
      if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
        raise ValueError(f"EViTConfig.keep_rate{'' if not isinstance(rates, tuple) else f'[{i}]'}"
                         f" must be in (0, 1]; got {r!r}")
    object.__setattr__(self, "keep_rate", tuple(float(r) for r in rates)
                       if isinstance(rates, tuple) else float(rates))

  def replace(self, **kw) -> "EViTConfig":
    return dataclasses.replace(self, **kw)

  def rate_of(self, layer: int) -> float:
    if isinstance(self.keep_rate, tuple):
      return self.keep_rate[self.layers.index(layer)]
    return self.keep_rate

  def needs_cls_attention(self, layer: int) -> bool:
    """The block computes the class token's attention row for this layer."""
    return layer in self.layers and self.rate_of(layer) < 1

  def check_depth(self, depth: int) -> None:
    beyond = [l for l in self.layers if l >= depth]
    if beyond:
      raise ValueError(f"EViTConfig.layers {self.layers}: block(s) {beyond} are beyond the "
                       f"model's depth {depth}")

  def __call__(self, x, token_mask, size, keys, *, layer, num_special=0, cls_attn=None):
    """Block hook: ``x (B, L, D) -> (B, 1 + k + fuse, D)`` in EViT layers."""
    if not self.needs_cls_attention(layer):
      return x, token_mask, size, {}
    _check_class_row("EViT", layer, num_special, cls_attn)
    keep = evit_lib.keep_count(x.shape[1] - num_special, self.rate_of(layer))
    y, record = evit_lib.evit(x, cls_attn, keep, fuse=self.fuse, num_special=num_special)
    if record is None:
      return x, token_mask, size, {}
    return y, jnp.ones(y.shape[:2], bool), None, {"record": record}


# DiffRate's published schedules (OpenGVLab/DiffRate, compression_rate.json):
# short model names -> that file's keys.
DIFFRATE_MODELS = {"deit_tiny": "ViT-T-DeiT", "deit_small": "ViT-S-DeiT",
                   "deit_base": "ViT-B-DeiT", "mae_base": "ViT-B-MAE",
                   "mae_large": "ViT-L-MAE", "mae_huge": "ViT-H-MAE"}


@dataclasses.dataclass(frozen=True)
class DiffRateConfig:
  """DiffRate (Chen et al. 2023) inside a model's blocks, with a given schedule.

  In every block, after attention: sort by class attention, prune to ``prune[i]``
  tokens, merge to ``merge[i]`` (:mod:`mame_jax.diffrate`), with proportional
  attention on the tracked sizes. Counts include the class token.

  Attributes:
    prune, merge: one count per block (the model's depth); they never grow:
      ``prune[i] >= merge[i] >= prune[i + 1]``.
    label: a short name for tables (``published`` sets ``"deit_small@2.3"``).
    note: where the schedule came from (``published`` says so, and what it clamped).
  """

  prune: tuple
  merge: tuple
  label: str = dataclasses.field(default="", compare=False)
  note: str = dataclasses.field(default="", compare=False)

  prop_attn = True  # DiffRate's attention always adds log(size)

  def __post_init__(self):
    prune = _int_tuple(self.prune, "DiffRateConfig.prune")
    merge = _int_tuple(self.merge, "DiffRateConfig.merge")
    if len(prune) != len(merge) or not prune:
      raise ValueError(f"DiffRateConfig.prune and .merge need one count per block, the same "
                       f"number; got {len(prune)} and {len(merge)}")
    last = None
    for i, (p, m) in enumerate(zip(prune, merge)):
      if m < 1:
        raise ValueError(f"DiffRateConfig: block {i} keeps {m} tokens; at least 1 (the class "
                         "token) must stay")
      if m > p:
        raise ValueError(f"DiffRateConfig: block {i}'s merge count {m} exceeds its prune "
                         f"count {p}; counts must not grow")
      if last is not None and p > last:
        raise ValueError(f"DiffRateConfig: block {i}'s prune count {p} exceeds block {i - 1}'s "
                         f"merge count {last}; counts must not grow (DiffRateConfig.published "
                         "clamps DiffRate's own schedules)")
      last = m
    object.__setattr__(self, "prune", prune)
    object.__setattr__(self, "merge", merge)

  @classmethod
  def published(cls, model: str, gflops: float) -> "DiffRateConfig":
    """A schedule DiffRate publishes: ``model`` in ``DIFFRATE_MODELS``
    ("deit_small", "mae_base", ...), ``gflops`` one of its targets (e.g. 2.3 for
    DeiT-S, 8.7 for DeiT-B). Some of those schedules let a count grow from one
    step to the next, which DiffRate's code silently clamps (a slice or a merge
    cannot add tokens); here the clamping is explicit -- every count becomes the
    smallest count so far -- and ``note`` lists what changed."""
    table = published_schedules()
    if model not in DIFFRATE_MODELS:
      raise ValueError(f"DiffRate model must be one of {tuple(DIFFRATE_MODELS)}; got {model!r}")
    rows = table[DIFFRATE_MODELS[model]]
    match = [k for k in rows if math.isclose(float(k), float(gflops))]
    if not match:
      raise ValueError(f"DiffRate publishes no {model} schedule at {gflops} GFLOPs; it has "
                       f"{sorted(rows, key=float)}")
    row = rows[match[0]]
    counts, changed, low = [], [], None
    for i, (p, m) in enumerate(zip(row["prune_kept_num"], row["merge_kept_num"])):
      for name, v in (("prune", p), ("merge", m)):
        low = v if low is None else min(low, v)
        if low != v:
          changed.append(f"block {i} {name} {v}->{low}")
        counts.append(low)
    note = f"DiffRate's published {model} schedule at {match[0]} GFLOPs"
    if changed:
      note += " (clamped so that no count grows: " + ", ".join(changed) + ")"
    return cls(prune=tuple(counts[0::2]), merge=tuple(counts[1::2]),
               label=f"{model}@{match[0]}", note=note)

  @classmethod
  def from_spec(cls, spec: str) -> "DiffRateConfig":
    """``"deit_small@2.3"`` (model ``@`` GFLOPs) -> :meth:`published`."""
    model, sep, gflops = str(spec).partition("@")
    try:
      value = float(gflops)
    except ValueError:
      value = None
    if not sep or value is None:
      raise ValueError(f"a DiffRate schedule is named MODEL@GFLOPS, e.g. 'deit_small@2.3' "
                       f"(models: {tuple(DIFFRATE_MODELS)}); got {spec!r}")
    return cls.published(model.strip(), value)

  def replace(self, **kw) -> "DiffRateConfig":
    return dataclasses.replace(self, **kw)

  def needs_cls_attention(self, layer: int) -> bool:
    return layer < len(self.prune)

  def check_depth(self, depth: int) -> None:
    if len(self.prune) != depth:
      raise ValueError(f"DiffRateConfig has counts for {len(self.prune)} blocks; the model has "
                       f"{depth}")

  def __call__(self, x, token_mask, size, keys, *, layer, num_special=0, cls_attn=None):
    """Block hook: ``x (B, L, D) -> (B, merge[layer], D)``, sizes tracked."""
    if layer >= len(self.prune):
      raise ValueError(f"DiffRateConfig has counts for {len(self.prune)} blocks; block {layer} "
                       "has none")
    p, m = self.prune[layer], self.merge[layer]
    if p > x.shape[1]:
      raise ValueError(f"DiffRateConfig: block {layer}'s prune count {p} exceeds the "
                       f"{x.shape[1]} tokens there are")
    if m == x.shape[1]:
      return x, token_mask, size, {}
    _check_class_row("DiffRate", layer, num_special, cls_attn)
    y, size, record = diffrate_lib.diffrate(x, cls_attn, size, p, m,
                                            num_special=num_special)
    return y, jnp.ones(y.shape[:2], bool), size, {"record": record}


def _check_class_row(method: str, layer: int, num_special: int, cls_attn) -> None:
  """EViT and DiffRate rank tokens by the class token's attention: both must be there."""
  if num_special < 1:
    raise ValueError(f"{method} (block {layer}) needs a class token: the model has none")
  if cls_attn is None:
    raise ValueError(f"{method} (block {layer}) needs the class token's attention row: run it "
                     "in a mame_jax.models.vit model")


@functools.lru_cache(maxsize=None)
def published_schedules() -> dict:
  """DiffRate's published schedules, ``{model: {gflops: {"prune_kept_num": [...],
  "merge_kept_num": [...]}}}``, from the data file shipped with this package."""
  with resources.files("mame_jax").joinpath("data/diffrate_schedules.json").open() as f:
    table = json.load(f)
  return {k: v for k, v in table.items() if not k.startswith("_")}


def merge_records(aux: dict) -> list[dict]:
  """The merge record of every block, read from a model's ``aux``: ``records[i]``
  is what block ``i``'s merge left -- ``{"info": MergeInfo}`` for MaMe,
  ``{"record": ToMeRecord}`` for ToMe -- or ``{}`` where the block did not
  merge. ``len(records)`` is the model's depth. The one place that knows where
  in ``aux`` a block keeps its record."""
  blocks = sorted(k for k in aux if k.startswith("block") and k[5:].isdigit())
  if not blocks:
    raise ValueError("aux holds no blocks: it must come from a mame_jax.models.vit model "
                     f"(keys 'block00', ...); got keys {sorted(aux)[:8]}")
  return [aux[name].get("merge") or {} for name in blocks]


def merge_stack(aux: dict) -> list:
  """Every block's merge record as ``mame_jax.restore`` takes them: a ``MergeInfo``
  (MaMe), a ``ToMeRecord`` (ToMe), or ``None`` where the block did not merge."""
  return [r.get("info", r.get("record")) for r in merge_records(aux)]


def restore_end(cfg, x, token_mask, size, aux: dict, *, normed: bool):
  """The model's last step before its head, for a config with ``restore_at="end"``:
  ``x (B, L_k, D)`` back to the grid the first merge saw, every block's merge
  (read from ``aux`` by :func:`merge_records`) undone last first with
  ``cfg.restore``. The model calls it twice, before its final norm
  (``normed=False``) and after it; ``cfg.restore_before_norm`` picks one. Returns
  ``(x, token_mask, size)``: the restored tokens, the first merge's input mask,
  and ``size=None`` (every token is one patch again). Anything else passes
  through unchanged."""
  if cfg.restore is None or cfg.restore_at != "end" or cfg.restore_before_norm == normed:
    return x, token_mask, size
  records = [r for r in merge_stack(aux) if r is not None]
  if not records:
    return x, token_mask, size
  first = records[0]
  mask = (first.input_mask if isinstance(first, MergeInfo)
          else jnp.ones(first.source.shape, bool))
  return restore_stack(x, records, cfg.restore), mask, None


def _check_restore(cfg) -> None:
  name = type(cfg).__name__
  if cfg.restore is not None and cfg.restore not in RESTORES:
    raise ValueError(f"{name}.restore must be None or one of {RESTORES}; got {cfg.restore!r}")
  if cfg.restore_at not in RESTORE_AT:
    raise ValueError(f"{name}.restore_at must be one of {RESTORE_AT}; got {cfg.restore_at!r}")
  if cfg.restore is None and (cfg.restore_at != "end" or not cfg.restore_before_norm):
    raise ValueError(f"{name}(restore_at={cfg.restore_at!r}, restore_before_norm="
                     f"{cfg.restore_before_norm!r}) says where to restore, but restore=None "
                     f"restores nothing: set restore to one of {RESTORES}")


def merge_counts(cfg, aux: dict) -> dict:
  """What exact mode needs from a forward, read from its ``aux`` (inside a
  jitted program, so that the merge records themselves need not be outputs):
  per merge layer ``num_preserved`` (layers,), ``overflow`` (layers,),
  ``dropped`` (B, layers) and ``forced`` (B, layers: budget mode's forced merges).
  Empty unless ``cfg`` is an active ``MergeConfig``."""
  if not isinstance(cfg, MergeConfig) or not cfg.active:
    return {}
  records = merge_records(aux)
  infos = [records[l]["info"] for l in cfg.layers]
  return {"num_preserved": jnp.stack([i.num_preserved for i in infos]),
          "overflow": jnp.stack([i.overflow for i in infos]),
          "dropped": jnp.stack([i.dropped for i in infos], axis=1),
          "forced": jnp.stack([i.forced for i in infos], axis=1)}


def default_layers(depth: int) -> tuple:
  """The paper's training-free default: MaMe in the first 8 blocks (all of them
  when the model has fewer). ``depth``: the model's number of blocks."""
  return tuple(range(min(DEFAULT_NUM_LAYERS, int(depth))))


def parse_layers(spec) -> Optional[tuple]:
  """Block indices from ``"0-7"``, ``"0,2,4-6"``, ``"3"`` or a sequence of ints:
  sorted, each once (``"7,0"`` and ``"0,7"`` are the same layers), so every
  command reads a layer list the same way. ``None`` stays ``None`` (the
  default layers). Raises ``ValueError`` naming the spec when it is malformed or
  negative."""
  if spec is None:
    return None
  out = []
  try:
    if isinstance(spec, str):
      for part in spec.replace(" ", "").split(","):
        if part:
          lo, sep, hi = part.partition("-")
          out.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    else:
      out = [int(v) for v in spec]
  except (TypeError, ValueError) as e:
    raise ValueError(f"layers must look like '0-7', '0,2,4-6' or a list of ints; "
                     f"got {spec!r}") from e
  if any(v < 0 for v in out):
    raise ValueError(f"layers must be >= 0; got {spec!r}")
  return tuple(sorted(set(out)))


def _check_tau(tau, layers):
  """``MergeConfig.tau`` -> a float, a tuple of floats (one per layer), or the
  same with traced scalars (left as they are: their values are unknown while
  tracing). Raises ``ValueError`` naming the field when a value is not a finite
  real number or the tuple's length is not ``len(layers)``."""
  if isinstance(tau, (list, tuple)) or getattr(tau, "ndim", 0) == 1:
    taus = tuple(tau)
    if len(taus) != len(layers):
      raise ValueError(f"MergeConfig.tau needs one tau per merge layer (layers={layers}: "
                       f"{len(layers)}); got {len(taus)}: {taus!r}")
    return tuple(_one_tau(t, f"MergeConfig.tau[{i}]") for i, t in enumerate(taus))
  return _one_tau(tau, "MergeConfig.tau")


def _one_tau(t, name):
  if is_traced(t):
    if jnp.ndim(t) != 0:
      raise ValueError(f"{name} must be a scalar; got a traced value of shape {jnp.shape(t)}")
    return t
  if isinstance(t, (bool, str, bytes)) or getattr(t, "ndim", 0) != 0:
    raise ValueError(f"{name} must be a finite float; got {t!r}")
  try:
    value = float(t)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{name} must be a finite float; got {t!r}") from e
  if not math.isfinite(value):
    raise ValueError(f"{name} must be a finite float; got {t!r}")
  return value


def _int_tuple(values, name) -> tuple:
  try:
    out = tuple(int(v) for v in values)
  except TypeError as e:
    raise ValueError(f"{name} must be a sequence of block indices; got {values!r}") from e
  if any(v < 0 for v in out):
    raise ValueError(f"{name} must be >= 0; got {out}")
  return out
