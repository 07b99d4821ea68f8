"""Running a merged model: one compiled program per capacity schedule.

``Runner(model, params)(images) -> (output, aux)`` runs the whole forward, from
embedding to logits, as one jitted program for a static *capacity schedule* (one
capacity per merge layer). The model's ``merge`` config says how:

* ``mode="exact"`` (inference default): capacities are buckets
  (``MergeConfig.buckets``: equal steps up to the layer's N). The first batch runs with
  every layer at its full N (nothing can overflow), and the buckets holding what
  each layer needed become the schedule of later batches (``initial_fraction``
  instead starts every layer at that fraction of N). If any layer overflows --
  more preserved tokens than its capacity -- every overflowing layer grows to
  the bucket that holds what it needed and the batch runs again, so no preserved
  token is ever dropped. The schedule only grows, so over a dataset it settles
  after a few batches; every schedule's program is cached (``num_programs``).
* ``mode="fixed"``: the config's capacities, once; dropped tokens are counted in
  ``aux["dropped"]``.
* ``mode="budget"``: the config's capacities, once; nothing is dropped: an
  image's surplus preserved sources merge into their most similar destinations,
  counted in ``aux["forced"]``.

With ``execution="packed"`` the runner (in every mode) also sizes the flat
buffers the blocks after each merge layer run on (:mod:`mame_jax.models.packing`):
the first batch runs with every slot (nothing can be lost), and its real-token totals, rounded
up to a bucket (``packed_buckets``), become the buffers of later batches; a
batch whose real tokens exceed a buffer is run again with it grown. Like the
capacities, the buffers only grow. ``aux["packed_sizes"]`` says which ran.

ToMe configs and plain models run once, as they are.

The program is lean: inside the jitted function only what exact mode and the
callers need is selected from the model's ``aux`` -- ``tokens_per_block`` and,
for MaMe, each merge layer's ``num_preserved``, ``overflow`` and ``dropped`` --
so XLA never materialises the merge records (the (B, M, N) fusion matrices,
source maps, every block's activations) as outputs. ``Runner(...,
records=True)``, ``runner(images, records=True)`` or ``runner.full(images)``
return the model's whole ``aux`` as well (pictures, restoration, source maps).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from mame_jax.buckets import bucket_for, even_buckets
from mame_jax.merge import merged_length, num_sources
from mame_jax.models.inputs import check_images
from mame_jax.models.merging import MergeConfig, merge_counts
from mame_jax.models.vit import patch_grid


def sequence_lengths(model, image_hw) -> tuple[int, int]:
  """``(tokens entering block 0, num_special)`` for ``image_hw = (H, W)``, or
  ``(T, H, W)`` for a video model (which then answers itself)."""
  if hasattr(model, "sequence_lengths"):
    return model.sequence_lengths(image_hw)
  gh, gw = patch_grid(model, image_hw)
  ns = model.num_special
  return gh * gw + ns, ns


def layer_lengths(cfg: MergeConfig, depth: int, length: int, num_special: int) -> list[int]:
  """Tokens entering each block (static) under ``cfg``'s capacities (all the same
  when every merge is undone right after attention, ``restore_at="attention"``)."""
  out = []
  for layer in range(depth):
    out.append(length)
    if layer in cfg.layers and not cfg.keeps_length:
      length = merged_length(length, num_special, cfg.capacity(layer, length, num_special))
  return out


class Runner:
  """Jitted, cached forward of ``model`` (a ``mame_jax.models.vit`` ViT) with ``params``.

  Attributes:
    schedule: the current capacity schedule (exact mode), one per merge layer.
    num_programs: how many programs were compiled (one per schedule, shape and
      lean / full).
    reruns: batches run again because a layer overflowed.
    records: whether calls return the model's full ``aux`` by default (else the
      lean summary; see the module docstring).
  """

  def __init__(self, model, params, *, initial_fraction: Optional[float] = None,
               records: bool = False):
    self.model, self.params = model, params
    self.records = bool(records)
    self.cfg = model.merge
    self._programs = {}
    self.reruns = 0
    self.schedule: Optional[tuple] = None
    self.packed: Optional[tuple] = None  # packed buffer sizes (execution="packed")
    self._initial_fraction = initial_fraction
    cfg = self.cfg
    if isinstance(cfg, MergeConfig) and any(l >= model.depth for l in cfg.layers):
      raise ValueError(f"MergeConfig.layers {cfg.layers} name blocks beyond the model's "
                       f"depth {model.depth}")

  @property
  def num_programs(self) -> int:
    return len(self._programs)

  @property
  def exact(self) -> bool:
    return (isinstance(self.cfg, MergeConfig) and self.cfg.mode == "exact"
            and self.cfg.active)

  def program(self, schedule: Optional[tuple], shape, records: Optional[bool] = None,
              packed: Optional[tuple] = None):
    """The jitted forward ``(params, images) -> (output, aux)`` for a schedule
    (None: the model's own config) and packed buffer sizes (None: the config's).
    ``records`` (default ``self.records``): the model's whole ``aux`` plus the
    summary, else only the summary (lean)."""
    records = self.records if records is None else bool(records)
    k = (schedule, packed, tuple(shape), records)
    if k not in self._programs:
      model, cfg = self.model, self.cfg
      if schedule is not None:
        model = model.clone(merge=cfg.replace(capacities=schedule))
      if packed is not None:
        model = model.clone(merge=model.merge.replace(packed_sizes=packed))

      def forward(p, x):
        out, aux = model.apply({"params": p}, x)
        summary = _select(cfg, aux)
        return out, ({**aux, **summary} if records else summary)
      self._programs[k] = jax.jit(forward)
    return self._programs[k]

  def _buckets(self, schedule, length, ns):
    """Bucket sets of every merge layer under ``schedule``."""
    cfg = self.cfg.replace(capacities=schedule)
    lengths = layer_lengths(cfg, self.model.depth, length, ns)
    return [cfg.buckets(num_sources(lengths[l], ns)) for l in cfg.layers]

  def _schedule(self, length, ns, count) -> tuple:
    """Capacities, first layer first: layer ``i`` gets the bucket holding
    ``count(i, n)`` preserved tokens, ``n`` its N under the capacities before it."""
    caps = []
    for i in range(len(self.cfg.layers)):
      schedule = tuple(caps) + (None,) * (len(self.cfg.layers) - i)
      buckets = self._buckets(schedule, length, ns)[i]
      caps.append(bucket_for(min(int(count(i, buckets[-1])), buckets[-1]), buckets))
    return tuple(caps)

  def _initial_schedule(self, length, ns):
    """A first guess, ``initial_fraction`` of each layer's N (every N when it is
    None: the first batch then settles the schedule); exact mode grows it."""
    fraction = 1.0 if self._initial_fraction is None else self._initial_fraction
    return self._schedule(length, ns, lambda i, n: n * fraction)

  def __call__(self, images, *, records: Optional[bool] = None):
    """``images (B, H, W, 3)`` in [-1, 1] -> ``(output, aux)``; in exact mode
    ``aux["capacities"]`` is the schedule used and nothing was dropped.

    ``aux`` holds ``tokens_per_block`` (B, depth) and, for MaMe, per merge layer
    ``num_preserved`` (layers,) int, ``overflow`` (layers,) bool and ``dropped``
    (B, layers) int, as NumPy arrays; with ``records`` (default
    ``self.records``) also the model's whole ``aux``."""
    check_images(self.model, self.params, images)  # before tracing: clear errors
    images = jnp.asarray(images)
    packed = isinstance(self.cfg, MergeConfig) and self.cfg.packs
    if not (self.exact or packed):
      out, aux = self.program(None, images.shape, records)(self.params, images)
      return out, _summarise(self.cfg, aux)
    length, ns = sequence_lengths(self.model, images.shape[1:-1])  # (H, W) / (T, H, W)
    settle = self.exact and self.schedule is None and self._initial_fraction is None
    if self.exact and self.schedule is None:
      self.schedule = self._initial_schedule(length, ns)
    while True:
      out, aux = self.program(self.schedule, images.shape, records, self.packed)(
          self.params, images)
      aux = _summarise(self.cfg, aux)
      over = np.asarray(aux["overflow"]) if self.exact else np.zeros(0, bool)
      if over.any():
        # Grow every overflowing layer to the bucket holding what it needed. Later
        # layers saw truncated inputs, so they may overflow again next round; the
        # schedule only grows, so this ends (at worst at full capacity).
        need = np.asarray(aux["num_preserved"])
        caps = list(self.schedule)
        for i in range(len(caps)):
          if over[i]:
            buckets = self._buckets(tuple(caps), length, ns)[i]
            caps[i] = bucket_for(min(int(need[i]), buckets[-1]), buckets)
        if tuple(caps) == self.schedule:  # cannot happen: the last bucket is N
          raise RuntimeError(f"exact mode could not grow the overflowing layers of "
                             f"{self.schedule} (needed {need.tolist()})")
        self.schedule = tuple(caps)
        self.reruns += 1
        continue
      if packed:
        batch, ran = images.shape[0], self.packed
        self.packed = self._packed_after(aux, batch, length, ns)
        ran = ran or self._full(batch, length, ns)
        totals = np.asarray(aux["tokens_per_block"]).sum(0)[list(self.cfg.layers)]
        if (totals > np.asarray(ran)).any():  # a buffer lost tokens: run again
          self.reruns += 1
          continue
        aux["packed_sizes"] = ran
      if self.exact:
        aux["capacities"] = self.schedule
        if settle:  # the first batch ran at full capacity: keep what it needed
          need = np.asarray(aux["num_preserved"])
          self.schedule = self._schedule(length, ns, lambda i, n: need[i])
      return out, aux

  def served(self, shape, records: Optional[bool] = None):
    """The program that served the last call on inputs of ``shape`` (the settled
    capacity schedule and packed buffers): the one to time."""
    return self.program(self.schedule if self.exact else None, shape, records, self.packed)

  def paid_tokens(self, shape) -> tuple[list, list]:
    """``(padded, paid)`` per block for inputs of ``shape``, per image: the static
    length each block's output has in the served program, and the tokens its
    token-wise layers pay for (``packed_sizes / B`` after a merge with packed
    execution, else the padded length). For a plain model or another merge, the
    sequence length entering the first block throughout (ToMe's counts are
    static and read from ``tokens_per_block``)."""
    length, ns = sequence_lengths(self.model, tuple(shape[1:-1]))
    depth, batch = self.model.depth, shape[0]
    if not (isinstance(self.cfg, MergeConfig) and self.cfg.active):
      return [length] * depth, [length] * depth
    cfg = self.cfg if self.schedule is None else self.cfg.replace(capacities=self.schedule)
    padded = layer_lengths(cfg, depth + 1, length, ns)[1:]
    sizes = self.packed or (self._full(batch, length, ns) if cfg.packs else None)
    return padded, paid_lengths(padded, cfg.layers, sizes, batch)

  def _full(self, batch, length, ns) -> tuple:
    """Every slot after each merge layer: ``batch * merged length``."""
    cfg = self.cfg if self.schedule is None else self.cfg.replace(capacities=self.schedule)
    lengths = layer_lengths(cfg, self.model.depth + 1, length, ns)
    return tuple(batch * lengths[l + 1] for l in cfg.layers)

  def _packed_after(self, aux, batch, length, ns) -> tuple:
    """The packed buffers for the next run: each merge layer's real-token total
    rounded up to its bucket, never below the buffer it has."""
    totals = np.asarray(aux["tokens_per_block"]).sum(0)
    sizes = []
    for i, (layer, full) in enumerate(zip(self.cfg.layers, self._full(batch, length, ns))):
      size = bucket_for(min(int(totals[layer]), full), packed_buckets(full))
      if self.packed is not None and self.packed[i] is not None:
        size = max(size, min(self.packed[i], full))
      sizes.append(size)
    return tuple(sizes)

  def full(self, images):
    """``self(images, records=True)``: the output and the model's whole ``aux``
    (every block's merge record) beside the summary."""
    return self(images, records=True)


def paid_lengths(padded, layers, sizes, batch) -> list:
  """Per block, the tokens per image its token-wise layers pay for: the padded
  length ``padded[i]``, or after merge layer ``layers[k]`` with packed buffers
  ``sizes`` (one per merge layer; ``None``: padded execution) that buffer's
  share ``sizes[k] / batch``, until the next merge layer."""
  paid, stage = list(padded), None
  for i in range(len(padded)):
    if sizes is not None and i in layers:
      stage = sizes[list(layers).index(i)] / batch
    if stage is not None:
      paid[i] = stage
  return paid


def packed_buckets(full: int, count: int = 32) -> list:
  """The buffer sizes a merge layer's packed stage draws from: ``count`` equal
  steps up to ``full`` (every slot), so a buffer wastes at most ``full / count``
  slots and a run sees at most ``count`` programs per layer."""
  return even_buckets(full, count)


def _select(cfg, aux) -> dict:
  """Inside the jitted forward: the summary the runner returns --
  ``tokens_per_block`` (B, depth) and :func:`~mame_jax.models.merging.merge_counts`."""
  return {"tokens_per_block": aux["tokens_per_block"], **merge_counts(cfg, aux)}


def _summarise(cfg, aux):
  """The summary on the host (NumPy) for MaMe configs: ``exact`` mode reads
  ``overflow`` and ``num_preserved`` between runs anyway."""
  if not isinstance(cfg, MergeConfig) or not cfg.active:
    return aux
  aux = dict(aux)
  aux["num_preserved"] = _host(aux["num_preserved"]).astype(np.int64)
  aux["overflow"] = _host(aux["overflow"]).astype(bool)
  aux["dropped"] = _host(aux["dropped"])
  aux["forced"] = _host(aux["forced"])
  return aux


def _host(a) -> np.ndarray:
  """A NumPy copy, gathering the rows other hosts hold (multi-host runs)."""
  if isinstance(a, jax.Array) and not a.is_fully_addressable and not a.is_fully_replicated:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return np.asarray(multihost_utils.process_allgather(a, tiled=True))
  return np.asarray(a)
