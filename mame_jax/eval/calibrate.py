"""Choosing tau automatically: the largest tau that meets a FLOP budget.

The paper leaves tau to the user (0.8 for the off-the-shelf models). Here a
target -- an *ideal speedup* (baseline FLOPs / merged FLOPs) or GFLOPs per
image -- is met on a few calibration batches:

    mame-jax calibrate --checkpoint deit_small.safetensors --data imagenet2012 \\
        --target-speedup 2 --calib-images 512 --limit 10000

How. Fewer tokens survive a lower tau (tokens kept is monotone in tau), so the
FLOPs are monotone too and a bisection finds the largest tau whose FLOPs meet
the target. Each candidate needs only the token counts, and the FLOPs come
from them analytically (:func:`vit_gflops`: per block, the attention
``2 L D (4 D) + 4 L^2 D`` for its ``L`` tokens in, the merge ``4 M N D``, the
MLP ``4 L' D mlp_dim`` for its ``L'`` tokens out, plus patch embedding and
head), so no candidate is compiled: the counting program takes tau as a
*traced* argument and runs with full capacities (nothing dropped), compiled
once for the whole search. The speedup is that of the *program that will
run*, not of the real tokens alone: from each candidate's token counts the
runner's settled program is worked out (:func:`program_tokens`: exact mode's
bucketed capacities, which with the paper's batch-wide rule or a padded batch
hold the largest need of any image, and packed execution's buffers), at the
batch size of the calibration batches, and the speedup is the baseline's
analytic GFLOPs over that program's. So a target met here is what ``mame-jax
eval`` measures as its ideal speedup, padding included; ``real_speedup`` says
what the real tokens alone would have given. A GFLOPs target is first turned
into a speedup with XLA's count for the baseline, so it is in the units of
``mame-jax eval``'s table (the analytic model ignores the element-wise work
that XLA also counts, a few percent). The preservation rule and the execution
come from ``merge`` (``preserve``, ``execution``).

* ``per_layer=False``: one tau for every merge layer, bisected on
  ``[lo, hi]`` (default ``[-1, 1]``, the range of cosine similarity); the
  result meets the target on the calibration data by construction (the lower
  end of the bracket always does).
* ``per_layer=True``: one tau per merge layer. Every merge layer is asked to
  keep the same fraction ``rho`` of its mergeable tokens; ``rho`` is the
  largest for which that token schedule meets the target (arithmetic only),
  then each layer's tau is bisected in turn, first layer first (later layers
  not merging yet), to keep at most ``rho``. If the result falls short
  (token counts are discrete and interact through the layers) ``rho`` is
  lowered and the layers solved again, at most ``max_rounds`` times;
  ``Calibration.met`` says whether the target was reached.

Afterwards the chosen config can be evaluated on held-out data (``heldout=``
in Python; the CLI holds out every image after the calibration ones), with
``mame_jax.eval.loop``: accuracy, measured and ideal speedup from XLA.

Per-layer thresholds are a plain ``MergeConfig`` whose ``tau`` is a tuple,
one per merge layer (:func:`layerwise`), which the runner drives like any other
(exact mode, buckets). Calibration runs on one device in one process.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mame_jax.eval import data as data_lib
from mame_jax.eval import loop as eval_lib
from mame_jax.eval import report
from mame_jax.eval import timing
from mame_jax.buckets import bucket_for
from mame_jax.eval.runner import packed_buckets, paid_lengths, sequence_lengths
from mame_jax.merge import merged_length, num_sources
from mame_jax.models.inputs import check_images
from mame_jax.models.merging import MergeConfig, default_layers, parse_layers
from mame_jax.models.vit import pair


def layerwise(base: MergeConfig, taus: Sequence[float]) -> MergeConfig:
  """``base`` with one tau per layer of ``base.layers`` (``taus[i]`` for block
  ``base.layers[i]``). Layers whose tau merges nothing (``>= 1`` for cosine
  similarity) are left out, so they cost nothing; when the remaining taus are
  all equal ``tau`` is that one float, else a tuple. Capacities are reset (the
  layers changed). Raises ``ValueError`` when ``taus`` does not have one entry
  per layer."""
  taus = [float(t) for t in taus]
  if len(taus) != len(base.layers):
    raise ValueError(f"taus needs one tau per merge layer of base (layers={base.layers}); "
                     f"got {len(taus)}")
  keep = [i for i, t in enumerate(taus) if not (base.similarity == "cosine" and t >= 1)]
  layers = tuple(base.layers[i] for i in keep)
  taus = [taus[i] for i in keep]
  tau = (taus[0] if taus else 1.0) if len(set(taus)) <= 1 else tuple(taus)
  return base.replace(layers=layers, capacities=None, tau=tau)


# ----------------------------------------------------------------------------
# FLOPs from token counts


def vit_gflops(model, tokens, image_hw, merge_layers: Sequence[int] = (),
               padded=None) -> np.ndarray:
  """Analytic GFLOPs per image (2 per multiply-add, matmuls only) of a
  ``vit.Model`` whose blocks leave ``tokens (n, depth)`` tokens each
  (``aux["tokens_per_block"]``); blocks in ``merge_layers`` also pay for the
  merge (similarities and fusion, ``4 M N D``). ``padded (n, depth)``: the
  lengths attention and the merge run on when they differ from ``tokens``
  (packed execution: the token-wise layers pay for ``tokens``, attention for the
  padded rows). Returns ``(n,)``."""
  tokens = np.asarray(tokens, np.float64).reshape(-1, model.depth)
  padded = tokens if padded is None else np.broadcast_to(
      np.asarray(padded, np.float64).reshape(-1, model.depth), tokens.shape)
  d = model.width
  mlp = model.mlp_dim or 4 * d
  length, ns = sequence_lengths(model, image_hw)
  ph, pw = pair(model.patch_size)
  flops = np.full(tokens.shape[0], 2.0 * (length - ns) * ph * pw * 3 * d)  # embedding
  l_in = p_in = np.full(tokens.shape[0], float(length))
  for i in range(model.depth):
    l_out = tokens[:, i]
    flops += 2 * l_in * d * 4 * d + 4 * p_in * p_in * d  # qkv + out; logits + AV
    if i in merge_layers:
      body = np.maximum(p_in - ns, 0)
      flops += 4 * np.floor(body / 2) * np.ceil(body / 2) * d
    flops += 4 * l_out * d * mlp
    l_in, p_in = l_out, padded[:, i]
  if model.pool_type == "map":  # probe attention over the last tokens + its MLP
    flops += 2 * l_in * d * 2 * d + 4 * l_in * d + 4 * d * d + 4 * d * mlp
  if model.rep_size:
    rep = d if model.rep_size is True else model.rep_size
    flops += 2 * d * rep
    d = rep
  if model.num_classes:
    flops += 2 * d * model.num_classes
  return flops / 1e9


def program_tokens(cfg: MergeConfig, model, batches_tokens, image_hw) -> tuple:
  """What the runner's settled program pays for, per image, on batches whose real
  token counts are ``batches_tokens`` (a list of ``(B, depth)``, every row the
  program runs): ``(paid (depth,), padded (depth,))``.

  ``padded`` is each block's static output length: exact mode's capacities are
  the buckets holding the largest preserved count any image of any batch needs
  (the schedule only grows), so the padding and the bucket slack are counted.
  ``paid`` is what the token-wise layers pay for: the padded length, or with
  packed execution the buffer's share per image (the largest batch total
  rounded up to ``runner.packed_buckets``)."""
  length, ns = sequence_lengths(model, image_hw)
  need = np.max([preserved_counts(t, length, ns, cfg.layers).max(0) for t in batches_tokens],
                axis=0)
  padded, l = [], length
  for i in range(model.depth):
    if i in cfg.layers:
      n = num_sources(l, ns)
      c = bucket_for(min(int(need[cfg.layers.index(i)]), n), cfg.buckets(n))
      l = merged_length(l, ns, c)
    padded.append(l)
  batch, sizes = batches_tokens[0].shape[0], None
  if cfg.packs:
    sizes = []
    for i in cfg.layers:
      full = batch * padded[i]
      total = max(int(t[:, i].sum()) for t in batches_tokens)
      sizes.append(bucket_for(min(total, full), packed_buckets(full)))
  paid = paid_lengths(padded, cfg.layers, sizes, batch)
  return np.asarray(paid, np.float64), np.asarray(padded, np.float64)


def preserved_counts(tokens, length: int, num_special: int, layers) -> np.ndarray:
  """Each image's preserved sources in every merge layer, ``(n, len(layers))``, from
  its real tokens after every block ``tokens (n, depth)`` (``tokens_per_block``;
  ``length`` tokens enter block 0): a merge of ``L`` real tokens leaves the
  special ones, ``(L - s) // 2`` destinations and the preserved sources."""
  tokens = np.asarray(tokens)
  before = np.concatenate([np.full((tokens.shape[0], 1), length), tokens[:, :-1]], axis=1)
  return np.stack([tokens[:, i] - num_special - (before[:, i] - num_special) // 2
                   for i in layers], axis=1)


# ----------------------------------------------------------------------------
# Calibration


@dataclasses.dataclass
class Calibration:
  """What :func:`calibrate` chose and why.

  Attributes:
    tau: the threshold (``per_layer``: a tuple, one per merge layer).
    merge: the ``MergeConfig`` to run (per layer: its ``tau`` is a tuple).
    target_speedup: the speedup asked for (from ``target_gflops`` when that was
      given).
    speedup: the speedup of the program that will run, on the calibration data
      (analytic: baseline GFLOPs over the program's, its padding, bucket slack
      and packed buffers included; :func:`program_tokens`).
    met: ``speedup >= target_speedup``.
    real_speedup: what the real tokens alone would give (no padding): the
      ideal the program's speedup falls short of.
    gflops_per_image, baseline_gflops_per_image: analytic, on the calibration
      data (the program's). ``xla_baseline_gflops``: XLA's count (only for a
      GFLOPs target).
    tokens_per_layer: mean real tokens after each block at the chosen tau.
    history: the candidates whose speedup was measured, ``{"tau": [...],
      "speedup": ...}`` (per-layer: the rounds, not the one-layer probes).
    heldout: the ``mame_jax.eval.loop`` result on held-out data, if asked for.
  """

  tau: Any
  merge: MergeConfig
  target_speedup: float
  speedup: float
  met: bool
  gflops_per_image: float
  baseline_gflops_per_image: float
  tokens_per_layer: list
  num_images: int
  target_gflops: Optional[float] = None
  xla_baseline_gflops: Optional[float] = None
  real_speedup: Optional[float] = None
  history: list = dataclasses.field(default_factory=list)
  heldout: Optional[dict] = None

  def to_json(self) -> dict:
    out = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("merge", "heldout")}
    out["tau"] = list(self.tau) if isinstance(self.tau, tuple) else self.tau
    out["merge_layers"] = list(self.merge.layers)
    if self.heldout is not None:
      out["heldout"] = report.to_json(self.heldout)
    return out


class _Counter:
  """Real tokens after each block for any taus: one compiled program with the
  taus traced and full capacities (so nothing is ever dropped)."""

  def __init__(self, model, params, base: MergeConfig, batches):
    self.model, self.params, self.base = model, params, base.replace(capacities=None,
                                                                     mode="exact")
    self.batches = batches

    def count(params, images, taus):  # taus (k,) traced: one program for every candidate
      cfg = self.base.replace(tau=tuple(taus[i] for i in range(len(taus))))
      _, aux = model.clone(merge=cfg).apply({"params": params}, images)
      return aux["tokens_per_block"]
    self._count = jax.jit(count)
    self.calls = 0

  def per_batch(self, taus) -> list:
    """``taus (k,)`` -> ``[(tokens (B, depth), valid (B,))]``, one per batch: every
    row the program runs, and which of them are real images."""
    self.calls += 1
    taus = jnp.asarray(taus, jnp.float32)
    return [(np.asarray(self._count(self.params, x, taus)), v) for x, v in self.batches]

  def __call__(self, taus) -> np.ndarray:
    """``taus (k,)`` -> ``(n, depth)`` token counts of the valid rows."""
    return np.concatenate([t[v] for t, v in self.per_batch(taus)])


def _as_batches(batches, model, params):
  """Arrays ``(B, H, W, 3)`` or ``data.Batch`` es -> ``[(images, valid)]``, each
  checked against the model first (shape, float dtype, image size)."""
  out = []
  for b in batches:
    check_images(model, params, b.images if isinstance(b, data_lib.Batch) else b)
    if isinstance(b, data_lib.Batch):
      out.append((jnp.asarray(b.images), np.asarray(b.valid)))
    else:
      x = jnp.asarray(b, jnp.float32)
      out.append((x, np.ones(x.shape[0], bool)))
  if not out:
    raise ValueError("calibrate needs at least one calibration batch")
  return out


def calibrate(model, params, batches, target_gflops: Optional[float] = None,
              target_speedup: Optional[float] = None, per_layer: bool = False, *,
              merge_layers=None, merge: Optional[MergeConfig] = None, tol: float = 1e-3,
              lo: float = -1.0, hi: float = 1.0, max_rounds: int = 4,
              heldout=None, **eval_kwargs) -> Calibration:
  """Picks tau (or one per merge layer) meeting a target on ``batches``.

  Args:
    model, params: a ``mame_jax.models.vit`` model and its parameters.
    batches: calibration images, arrays ``(B, H, W, 3)`` in [-1, 1] or
      ``mame_jax.eval.data.Batch`` es (their padding rows are ignored).
    target_gflops: GFLOPs per image to stay within, in XLA's units (as in
      ``mame-jax eval``); or
    target_speedup: the ideal speedup to reach (baseline / merged FLOPs).
    per_layer: one tau per merge layer instead of one for all.
    merge_layers: the merging blocks (default: the first 8).
    merge: a ``MergeConfig`` whose other options (metric, partition, ...) to
      keep; its ``tau`` is what is calibrated.
    tol: bisection stops when the tau bracket is narrower than this.
    lo, hi: the tau bracket (cosine similarity lies in [-1, 1]).
    max_rounds: per-layer only, see the module docstring.
    heldout: data (a name, ``Source``) to evaluate the result on, with
      ``**eval_kwargs`` for :func:`mame_jax.eval.loop.evaluate` (baseline and
      the calibrated config; ``taus=`` / ``tome_r=`` add rows to compare).

  Returns:
    a :class:`Calibration`. Raises ``ValueError`` when even ``tau = lo`` in
    every layer cannot reach the target.
  """
  if (target_gflops is None) == (target_speedup is None):
    raise ValueError("give exactly one of target_gflops and target_speedup")
  batches = _as_batches(batches, model, params)
  layers = (default_layers(model.depth) if merge_layers is None
            else parse_layers(merge_layers))
  base = (merge or MergeConfig()).replace(layers=tuple(layers))
  if base.mode != "exact":
    raise ValueError(f"calibrate picks tau for exact mode; got MergeConfig(mode="
                     f"{base.mode!r}) (a fixed or budget run's capacities are set by hand)")
  if base.keeps_length:
    raise ValueError("calibrate targets the merged sequence's cost; MergeConfig(restore_at="
                     "'attention') keeps every block's length (restore_at='end' calibrates)")
  if any(l >= model.depth for l in base.layers):
    raise ValueError(f"merge layers {base.layers} beyond the model's depth {model.depth}")
  image_hw = tuple(batches[0][0].shape[1:3])
  counter = _Counter(model, params, base, batches)
  n_images = int(sum(v.sum() for _, v in batches))
  length, ns = sequence_lengths(model, image_hw)
  base_gflops = float(vit_gflops(model, np.full((1, model.depth), length), image_hw)[0])

  xla_base = None
  if target_gflops is not None:
    if not target_gflops > 0:
      raise ValueError(f"target_gflops must be > 0; got {target_gflops}")
    x0 = batches[0][0]
    plain = jax.jit(lambda p, x: model.clone(merge=None).apply({"params": p}, x))
    xla_base = timing.gflops(plain, params, x0) / x0.shape[0]
    target_speedup = xla_base / target_gflops
  if not target_speedup > 0:
    raise ValueError(f"target_speedup must be > 0; got {target_speedup}")

  history = []

  def measure(taus):
    """The program's speedup (what the target is about), its GFLOPs per image
    and the real tokens of the valid images."""
    per_batch = counter.per_batch(taus)
    tokens = np.concatenate([t[v] for t, v in per_batch])
    cfg = base.replace(tau=tuple(float(t) for t in taus))
    paid, padded = program_tokens(cfg, model, [t for t, _ in per_batch], image_hw)
    gflops = float(vit_gflops(model, paid, image_hw, base.layers, padded)[0])
    real = float(np.mean(vit_gflops(model, tokens, image_hw, base.layers)))
    speedup = base_gflops / gflops
    history.append({"tau": [float(t) for t in taus], "speedup": speedup,
                    "real_speedup": base_gflops / real})
    return speedup, gflops, tokens

  k = len(base.layers)
  if per_layer:
    taus = _per_layer(model, image_hw, base, counter, measure, target_speedup, tol, lo, hi,
                      max_rounds, base_gflops)
  else:
    taus = [_bisect(lambda t: measure([t] * k)[0] >= target_speedup, lo, hi, tol,
                    what=f"a speedup of {target_speedup:.3g} (of the program that runs)",
                    best=lambda: history[-1]["speedup"])] * k
  speedup, gflops, tokens = measure(taus)
  real_speedup = history[-1]["real_speedup"]
  cfg = layerwise(base, taus)
  result = Calibration(
      tau=tuple(taus) if per_layer else taus[0], merge=cfg, target_speedup=target_speedup,
      speedup=speedup, met=speedup >= target_speedup, gflops_per_image=gflops,
      baseline_gflops_per_image=base_gflops, tokens_per_layer=tokens.mean(0).tolist(),
      num_images=n_images, target_gflops=target_gflops, xla_baseline_gflops=xla_base,
      history=history, real_speedup=real_speedup)
  if heldout is not None:
    eval_kwargs.setdefault("taus", ())
    result.heldout = eval_lib.evaluate(model, params, heldout, extra=[cfg], **eval_kwargs)
  return result


def _bisect(ok, lo, hi, tol, *, what, best):
  """The largest t in [lo, hi] with ``ok(t)`` (``ok`` true at lo, false at hi;
  monotone in between), to within ``tol``."""
  if ok(hi):
    return hi
  if not ok(lo):
    raise ValueError(f"cannot reach {what}: even tau = {lo} only gives {best():.3g}")
  while hi - lo > tol:
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if ok(mid) else (lo, mid)
  return lo


def _per_layer(model, image_hw, base, counter, measure, target, tol, lo, hi, max_rounds,
               base_gflops):
  """One tau per merge layer, every layer keeping the same fraction rho."""
  length, ns = sequence_lengths(model, image_hw)
  layers, k = base.layers, len(base.layers)

  def planned(rho):  # the speedup if every merge layer kept rho of its mergeable tokens
    counts, l = [], float(length)
    for i in range(model.depth):
      if i in layers:
        l = ns + rho * (l - ns)
      counts.append(l)
    return base_gflops / float(vit_gflops(model, np.array([counts]), image_hw, layers)[0])

  # A merge keeps at least the M destinations: about half its tokens.
  rho = _bisect(lambda r: planned(r) >= target, 0.5, 1.0, 1e-4,
                what=f"an ideal speedup of {target:.3g}", best=lambda: planned(0.5))
  taus = [2.0] * k  # 2 > any cosine similarity: nothing merges yet
  for _ in range(max_rounds):
    taus = [2.0] * k
    for j, layer in enumerate(layers):
      def kept(t, j=j, layer=layer):
        tokens = counter(taus[:j] + [t] + taus[j + 1:])
        before = tokens[:, layer - 1] if layer else np.full(len(tokens), length)
        return float(np.mean((tokens[:, layer] - ns) / np.maximum(before - ns, 1)))
      try:
        taus[j] = _bisect(lambda t: kept(t) <= rho, lo, hi, tol, what="", best=lambda: 0)
      except ValueError:
        taus[j] = lo  # this layer cannot go below rho: merge as much as it can
    if measure(taus)[0] >= target:
      break
    rho -= 0.02
  return taus


# ----------------------------------------------------------------------------
# Command line


def format_report(cal: Calibration) -> str:
  tau = (", ".join(f"{t:.4f}" for t in cal.tau) if isinstance(cal.tau, tuple)
         else f"{cal.tau:.4f}")
  lines = [f"calibrated on {cal.num_images} images: tau = {tau} in blocks "
           f"{list(cal.merge.layers)} -> speedup {cal.speedup:.3f} of the program that runs "
           f"(target {cal.target_speedup:.3f}: {'met' if cal.met else 'NOT met'}; the real "
           f"tokens alone: {cal.real_speedup or cal.speedup:.3f}), "
           f"{cal.gflops_per_image:.3f} analytic GFLOPs/img (baseline "
           f"{cal.baseline_gflops_per_image:.3f}), {len(cal.history)} candidates"]
  if cal.heldout is not None:
    lines += ["held-out evaluation:", report.format_report(cal.heldout)]
    row = cal.heldout["rows"][-1]  # the calibrated config: the last row
    lines.append(f"promised {cal.speedup:.3f}x, measured {row['measured_speedup']:.3f}x "
                 f"(XLA's ideal for the program {row['ideal_speedup']:.3f}x) on the held-out "
                 "images")
  return "\n".join(lines)
