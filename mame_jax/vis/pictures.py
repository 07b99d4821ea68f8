"""Token-cluster pictures (the paper's Figure 1) and the ``mame-jax visualize`` CLI.

Every patch of the image is painted with the mean colour of the patches that
share its token (``mame_jax.vis.sources``: the token holding the largest share of
the patch), with a thin line wherever two neighbouring patches belong to
different tokens. One panel per merge layer, titled with the model's token
count after that block; one row per image and method (MaMe, optionally ToMe, EViT,
DiffRate).

Pictures are drawn with matplotlib's object API on an Agg canvas, so nothing
here needs a display or changes the global matplotlib backend (notebooks keep
their inline backend). Figures have an exact pixel size:
``(1 + len(layers)) * panel`` wide and ``rows * (panel + TITLE_PX)`` high.

Images everywhere are ``(H, W, 3)`` floats in [-1, 1], what ``mame_jax.models.vit``
takes. Without a checkpoint the CLI and :func:`demo_figure` use a small randomly
initialised ViT: on real photographs its first blocks still see the image's
colours and edges, so clusters follow the picture, but they are not what a
trained model would merge.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mame_jax.eval import methods as methods_lib
from mame_jax.eval.data import PHOTOS, load_image
from mame_jax.models import load
from mame_jax.models.merging import DEFAULT_TAU, MergeConfig, ToMeConfig, default_layers
from mame_jax.models.vit import image_size_of
from mame_jax.vis import sources

TITLE_PX = 22   # title band above every panel
DPI = 100


# ----------------------------------------------------------------------------
# Images


# ----------------------------------------------------------------------------
# Pictures


def cluster_image(image, hard, grid, *, size: Optional[int] = None,
                  line=(1.0, 1.0, 1.0)) -> np.ndarray:
  """One token-cluster picture.

  Args:
    image: (H, W, 3) in [-1, 1], the image the model saw.
    hard: (P,) int, the token holding each patch (``SourceMap.hard[b]``); -1
      (a dropped patch) is painted black.
    grid: ``(h, w)`` patches, ``P = h * w``, row-major.
    size: side of the picture in pixels (default: the image's height); patches
      are scaled to it by nearest neighbour, so lines stay one pixel wide.
    line: RGB in [0, 1] of the lines between groups.

  Returns:
    (size, round(size * W / H), 3) float32 RGB in [0, 1]: each patch has its group's
    mean colour (the mean over all pixels of the group's patches).
  """
  image = (np.asarray(image, np.float64) + 1) / 2
  hard = np.asarray(hard).reshape(-1)
  gh, gw = grid
  if hard.size != gh * gw:
    raise ValueError(f"hard has {hard.size} patches but grid {grid} needs {gh * gw}")
  ph, pw = image.shape[0] // gh, image.shape[1] // gw
  patch_rgb = image[:gh * ph, :gw * pw].reshape(gh, ph, gw, pw, 3).mean((1, 3)).reshape(-1, 3)
  labels = np.where(hard >= 0, hard, hard.max(initial=0) + 1)  # dropped: a group of their own
  counts = np.bincount(labels)
  mean = np.stack([np.bincount(labels, patch_rgb[:, c]) for c in range(3)], -1)
  mean = mean / np.maximum(counts, 1)[:, None]
  colour = np.where((hard >= 0)[:, None], mean[labels], 0.0).reshape(gh, gw, 3)

  out_h = image.shape[0] if size is None else int(size)
  out_w = max(1, round(out_h * image.shape[1] / image.shape[0]))
  rows = np.arange(out_h) * gh // out_h
  cols = np.arange(out_w) * gw // out_w
  ids = labels.reshape(gh, gw)[rows][:, cols]
  picture = colour[rows][:, cols]
  edge = np.zeros(ids.shape, bool)
  edge[:, :-1] |= ids[:, :-1] != ids[:, 1:]
  edge[:-1, :] |= ids[:-1, :] != ids[1:, :]
  picture[edge] = line
  return picture.astype(np.float32)


def figure_size(num_rows: int, num_layers: int, panel: int = 160) -> tuple[int, int]:
  """``(width, height)`` in pixels of :func:`cluster_figure`'s figure."""
  return (1 + num_layers) * panel, num_rows * (panel + TITLE_PX)


def cluster_figure(images, rows: Sequence[tuple], layers: Sequence[int], *,
                   out_path=None, panel: int = 160, names: Optional[Sequence[str]] = None
                   ) -> Figure:
  """Figure 1: for every image, one row per method.

  Args:
    images: (B, H, W, 3) in [-1, 1].
    rows: ``(label, maps)`` pairs, e.g. ``[("MaMe tau=0.8", maps), ("ToMe r=12",
      tome_maps)]``, with ``maps`` from :func:`mame_jax.vis.sources.source_maps`.
    layers: the blocks to draw, one panel each (titled with the token count the
      model has after that block, class token included).
    out_path: where to write the figure as PNG, or None.
    panel: side of each panel in pixels.
    names: one caption per image for the first column.

  Returns:
    the matplotlib ``Figure`` (size :func:`figure_size`), drawn on an Agg canvas.
  """
  images = np.asarray(images)
  layers = list(layers)
  width, height = figure_size(len(images) * len(rows), len(layers), panel)
  fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
  FigureCanvasAgg(fig)
  r = 0
  for b, image in enumerate(images):
    for label, maps in rows:
      top = r * (panel + TITLE_PX) + TITLE_PX
      caption = label if names is None else f"{names[b]}: {label}"
      _panel(fig, (image + 1) / 2, 0, top, panel, width, height, caption)
      for c, layer in enumerate(layers, start=1):
        smap = maps[layer]
        grid = smap.grid or sources.grid_shape(smap.hard.shape[-1])
        pic = cluster_image(image, np.asarray(smap.hard[b]), grid, size=panel)
        tokens = int(smap.num_tokens[b])
        _panel(fig, pic, c * panel, top, panel, width, height, f"block {layer}: {tokens} tokens")
      r += 1
  if out_path is not None:
    fig.savefig(out_path, dpi=DPI)
  return fig


def _panel(fig, picture, left, top, panel, width, height, title, box_width=None):
  box_width = panel if box_width is None else box_width  # a video strip is wider
  ax = fig.add_axes((left / width, 1 - (top + panel) / height, box_width / width,
                     panel / height))
  ax.imshow(np.clip(picture, 0, 1), interpolation="nearest", aspect="auto")
  ax.set_axis_off()
  ax.set_title(title, fontsize=7.5, pad=3)


def merge_maps(model, params, images, merge, *, per_image: bool = True):
  """Runs ``model`` with ``merge`` on ``images (B, H, W, 3)`` and returns
  ``(maps, aux)``: one :class:`~mame_jax.vis.sources.SourceMap` per block (batch
  ``B``) and the model's ``aux`` (``tokens_per_block`` of every image).

  MaMe runs at full capacity in every layer (exact, nothing dropped) in one
  compiled program: for a few pictures that beats the runner's bucket search.
  ``per_image``: run every image alone (the same compiled program). MaMe's
  preservation mask is batch-wide (Sec. 3.3): in a batch, an image keeps every
  token that any other image keeps, so its picture would depend on the others.
  """
  if isinstance(merge, MergeConfig):
    merge = merge.replace(capacities=None, mode="exact")
  run = _compiled(model.clone(merge=merge))
  images = jnp.asarray(images)
  parts = ([run(params, images[i:i + 1]) for i in range(len(images))] if per_image
           else [run(params, images)])
  maps, counts = jax.tree.map(lambda *a: jnp.concatenate(a), *parts) if len(parts) > 1 else parts[0]
  return maps, {"tokens_per_block": counts}


@functools.lru_cache(maxsize=16)
def _compiled(model):
  """One jitted forward + source maps per model (merge config included), so
  that drawing the same tau again -- a slider moving back -- compiles nothing."""

  @jax.jit
  def run(params, x):
    _, aux = model.apply({"params": params}, x)
    return sources.source_maps(aux, model.merge), aux["tokens_per_block"]

  return run


def tome_token_counts(start: int, r: int, num_blocks: int, num_special: int = 1) -> list:
  """Tokens after each of ``num_blocks`` ToMe blocks that merge ``r`` from
  ``start`` tokens: a block removes ``min(r, (n - num_special) // 2)`` of its
  ``n`` (ToMe's clip: bipartite matching merges at most half the tokens), so a
  large ``r`` is spent only in the early blocks."""
  counts, n = [], int(start)
  for _ in range(num_blocks):
    n -= max(0, min(int(r), (n - num_special) // 2))
    counts.append(n)
  return counts


def matched_tome_r(maps, layers: Sequence[int], num_special: int = 1) -> int:
  """ToMe's ``r`` whose token count after the last of ``layers`` comes closest to
  MaMe's there (batch mean), so that both rows remove about as many tokens.

  ``r`` is the same in every ToMe block and is clipped per block
  (:func:`tome_token_counts`), so ``r = removed / len(layers)`` falls short
  whenever that ``r`` exceeds half of a late block's tokens (MaMe at tau=0.8 in
  ViT-B/16's first 8 blocks: 197 -> 4 tokens, but ToMe r=24 ends at 15); the
  search simulates the clip instead (ties: the smaller ``r``). Even so the two may
  not meet exactly -- ToMe's counts move in steps -- so callers should print
  both final counts (``draw``'s ``counts``).
  """
  layers = sorted(set(int(l) for l in layers))
  start = int(maps[0].soft.shape[1]) + num_special
  end = float(np.mean(np.asarray(maps[layers[-1]].num_tokens)))
  best = min(range(start + 1),
             key=lambda r: (abs(tome_token_counts(start, r, len(layers), num_special)[-1]
                                - end), r))
  return best


def draw(model, params, images, *, tau: float = DEFAULT_TAU, layers: Sequence[int] = range(8),
         tome_r=None, out_path=None, panel: int = 160, names=None, extra: Sequence = (),
         preserve: str = "batch"):
  """Runs MaMe (and ToMe when ``tome_r`` is an int, or ``"match"`` for
  :func:`matched_tome_r`) in ``layers`` and draws :func:`cluster_figure`.
  ``preserve``: MaMe's rule, "batch" (the paper's: the images drawn together
  share their preserved sources) or "sample" (each image its own).

  ``extra``: more merge configs, one row each after those, in their own blocks
  (panels still at ``layers``), labelled as ``mame-jax eval`` names them --
  e.g. ``EViTConfig`` (its kept tokens, and the fused token as one group: every
  inattentive patch has the fused token's index, the last one) or
  ``DiffRateConfig`` (pruned patches belong to no token: ``hard = -1``, painted
  black like dropped ones; merged ones form groups as ToMe's do).

  Returns ``(figure, counts)``: ``counts[label]`` is ``aux["tokens_per_block"]``
  (B, depth) of that row.
  """
  layers = sorted(set(int(l) for l in layers))
  if not layers or layers[0] < 0 or layers[-1] >= model.depth:
    raise ValueError(f"layers must be blocks of the model (0..{model.depth - 1}); got {layers}")
  cfg = MergeConfig(tau=float(tau), layers=tuple(layers), preserve=preserve)
  maps, aux = merge_maps(model, params, images, cfg)
  label = f"MaMe tau={tau:g}"
  rows, counts = [(label, maps)], {label: np.asarray(aux["tokens_per_block"])}
  if tome_r is not None:
    r = matched_tome_r(maps, layers, maps[0].num_special) if tome_r == "match" else int(tome_r)
    tmaps, taux = merge_maps(model, params, images, ToMeConfig(r=r, layers=tuple(layers)))
    label = f"ToMe r={r}"
    rows.append((label, tmaps))
    counts[label] = np.asarray(taux["tokens_per_block"])
  for cfg in extra:
    if hasattr(cfg, "check_depth"):  # EViT / DiffRate: a clear error before tracing
      cfg.check_depth(model.depth)
    emaps, eaux = merge_maps(model, params, images, cfg)
    label = methods_lib.describe_merge(cfg).name
    rows.append((label, emaps))
    counts[label] = np.asarray(eaux["tokens_per_block"])
  fig = cluster_figure(images, rows, layers, out_path=out_path, panel=panel, names=names)
  return fig, counts


def demo_figure(out_path, *, images: Sequence[str] = PHOTOS[:3], checkpoint=None,
                tau: float = DEFAULT_TAU, tome_r="match", layers: Optional[Sequence[int]] = None,
                panel: int = 160, verbose: bool = True) -> pathlib.Path:
  """Figure 1 for the bundled ``skimage.data`` photographs, written to ``out_path``.

  ``checkpoint``: what :func:`mame_jax.models.load.load_model` takes (a file, a
  URL, a known name); without one a small randomly initialised ViT
  (:func:`random_vit`) is used, and ``verbose`` says so.
  ``tome_r``: an int, ``"match"`` (:func:`matched_tome_r`) or None
  (no ToMe row). ``layers``: default the first 8 blocks (the paper's
  training-free setting), or all of a shallower model's.
  """
  model, params, note = load.checkpoint_or_random(checkpoint)
  layers = default_layers(model.depth) if layers is None else layers
  size = image_size_of(model, params)
  batch = np.stack([load_image(name, size) for name in images])
  _, counts = draw(model, params, batch, tau=tau, layers=layers, tome_r=tome_r,
                   out_path=out_path, panel=panel, names=list(images))
  if verbose:
    print(note)
    print_counts(counts, images, layers)
    print(f"wrote {out_path}")
  return pathlib.Path(out_path)


def print_counts(counts, names, layers):
  """Prints the tokens after every merge layer, one line per method and image."""
  layers = sorted(set(int(l) for l in layers))
  for label, c in counts.items():
    for name, row in zip(names, c):
      print(f"{label:>16} {name:>18}: tokens after blocks {layers[0]}-{layers[-1]}: "
            + " ".join(str(int(row[l])) for l in layers))




# ----------------------------------------------------------------------------
# Video (VideoMAE): a strip of frames per block and method


def video_strip(video, hard, grid, *, size: Optional[int] = None,
                line=(1.0, 1.0, 1.0)) -> np.ndarray:
  """One block's token clusters of a video as a strip of frames, left to right.

  Args:
    video: (T, H, W, 3) in [-1, 1], the frames the model saw.
    hard: (P,) int, the token holding each tubelet (``SourceMap.hard[b]``),
      ``P = t * h * w`` in VideoMAE's ``(t, y, x)`` order.
    grid: ``(t, h, w)`` tubelets (``SourceMap.grid``).
    size: frame height in pixels (default: the video's).

  Returns:
    (size, t * size * W / H, 3) float32 RGB in [0, 1]: the first frame of each
    tubelet, every patch painted with its token's mean colour over *all* the
    frames its tubelets cover in the strip (a token that spans frames has one
    colour in all of them), with lines between tokens (:func:`cluster_image`).
  """
  video = np.asarray(video)
  t, h, w = (int(g) for g in grid)
  if video.ndim != 4 or video.shape[0] % t:
    raise ValueError(f"video must be (T, H, W, 3) with T a multiple of the grid's {t} "
                     f"tubelets; got shape {video.shape}")
  frames = video[::video.shape[0] // t]                       # (t, H, W, 3)
  strip = np.concatenate(list(frames), axis=1)                 # (H, t W, 3)
  ids = np.asarray(hard).reshape(t, h, w).transpose(1, 0, 2).reshape(h, t * w)
  height = video.shape[1] if size is None else int(size)
  return cluster_image(strip, ids, (h, t * w), size=height, line=line)


def video_figure(video, rows: Sequence[tuple], layers: Sequence[int], *, out_path=None,
                 panel: int = 96) -> Figure:
  """The frames of ``video (T, H, W, 3)`` on top, then one strip
  (:func:`video_strip`) per method in ``rows`` (``(label, maps)`` pairs, as for
  :func:`cluster_figure`) and block in ``layers``, MaMe's and ToMe's strips of
  a block one under the other. Frames are ``panel`` pixels high; the figure is
  ``t * panel`` wide (``t`` tubelets) and ``(1 + len(rows) * len(layers)) *
  (panel + TITLE_PX)`` high."""
  video = np.asarray(video)
  layers = list(layers)
  grid = rows[0][1][0].grid
  if grid is None or len(grid) != 3:
    raise ValueError(f"maps must come from a video model (grid (t, h, w)); got grid {grid}")
  width = int(grid[0]) * round(panel * video.shape[2] / video.shape[1])
  lines = 1 + len(rows) * len(layers)
  height = lines * (panel + TITLE_PX)
  fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
  FigureCanvasAgg(fig)
  frames = video[::video.shape[0] // int(grid[0])]
  _panel(fig, (np.concatenate(list(frames), axis=1) + 1) / 2, 0, TITLE_PX, panel, width,
         height, "frames (first of each tubelet)", box_width=width)
  line = 1
  for layer in layers:
    for label, maps in rows:
      smap = maps[layer]
      pic = video_strip(video, np.asarray(smap.hard[0]), smap.grid, size=panel)
      top = line * (panel + TITLE_PX) + TITLE_PX
      _panel(fig, pic, 0, top, panel, width, height,
             f"{label}, block {layer}: {int(smap.num_tokens[0])} tokens", box_width=width)
      line += 1
  if out_path is not None:
    fig.savefig(out_path, dpi=DPI)
  return fig


def draw_video(model, params, video, *, tau: float = DEFAULT_TAU,
               layers: Optional[Sequence[int]] = None, tome_r="match", out_path=None,
               panel: int = 96):
  """MaMe (and ToMe: an int ``r``, ``"match"`` for :func:`matched_tome_r`, or
  None) on one video ``(T, H, W, 3)`` of a VideoMAE model, drawn by
  :func:`video_figure`. Returns ``(figure, counts)`` as :func:`draw`."""
  layers = default_layers(model.depth) if layers is None else sorted(set(int(l) for l in layers))
  batch = np.asarray(video)[None]
  maps, aux = merge_maps(model, params, batch, MergeConfig(tau=float(tau), layers=tuple(layers)))
  label = f"MaMe tau={tau:g}"
  rows, counts = [(label, maps)], {label: np.asarray(aux["tokens_per_block"])}
  if tome_r is not None:
    r = matched_tome_r(maps, layers, 0) if tome_r == "match" else int(tome_r)
    tmaps, taux = merge_maps(model, params, batch, ToMeConfig(r=r, layers=tuple(layers)))
    label = f"ToMe r={r}"
    rows.append((label, tmaps))
    counts[label] = np.asarray(taux["tokens_per_block"])
  return video_figure(batch[0], rows, layers, out_path=out_path, panel=panel), counts


def image_grid(images, columns: int, pad: int = 1) -> np.ndarray:
  """(N, H, W, C) images in [-1, 1] -> one (rows (H + pad) - pad, ...) float
  picture in [0, 1], ``columns`` per row, ``pad`` white pixels between them;
  grey (C = 1) becomes (H', W'). For sample grids (``benchmarks/dit_digits.py``)."""
  images = (np.clip(np.asarray(images, np.float32), -1, 1) + 1) / 2
  n, h, w, c = images.shape
  rows = -(-n // columns)
  out = np.ones((rows * (h + pad) - pad, columns * (w + pad) - pad, c), np.float32)
  for i, im in enumerate(images):
    r, k = divmod(i, columns)
    out[r * (h + pad):r * (h + pad) + h, k * (w + pad):k * (w + pad) + w] = im
  return out[..., 0] if c == 1 else out


# ----------------------------------------------------------------------------
# Vision tokens for a language model: kept patches plain, merged groups tinted


def vision_token_image(image, hard, grid, *, size: Optional[int] = None, tint: float = 0.45,
                       line=(1.0, 1.0, 1.0)) -> np.ndarray:
  """Where the vision tokens were kept and where merged, on the photograph.

  A token holding exactly one patch (by ``hard``) was kept: its patch shows the
  photograph as it is. The patches of a token holding several were merged: they
  are painted with the group's mean colour (what :func:`cluster_image` paints,
  the low-pass average the token carries) tinted ``tint`` towards a colour of its
  own, and outlined. Dropped patches (``hard`` -1) are black.

  Args:
    image: (H, W, 3) in [-1, 1], the image the model saw.
    hard: (P,) int, the token holding each patch (``SourceMap.hard[b]``, e.g. of
      ``mame_jax.vision_tokens.token_sources``).
    grid: ``(h, w)`` patches, ``P = h * w``, row-major.
    size: height of the picture in pixels (default: the image's).
    tint: how far merged groups move towards their own colour, in [0, 1].
    line: RGB in [0, 1] of the outlines around merged groups.

  Returns:
    (size, round(size * W / H), 3) float32 RGB in [0, 1]; with no token merged
    (every token one patch) it is the photograph, resampled.
  """
  from matplotlib import colormaps  # pylint: disable=import-outside-toplevel
  means = cluster_image(image, hard, grid, size=size, line=line)
  out_h, out_w = means.shape[:2]
  image = (np.asarray(image, np.float32) + 1) / 2
  # The photograph at the picture's size, nearest neighbour like cluster_image.
  photo = image[np.arange(out_h) * image.shape[0] // out_h]
  photo = photo[:, np.arange(out_w) * image.shape[1] // out_w]
  hard = np.asarray(hard).reshape(-1)
  gh, gw = grid
  counts = np.bincount(hard[hard >= 0], minlength=1)
  merged = (hard >= 0) & (counts[np.maximum(hard, 0)] > 1)          # (P,)
  rows, cols = np.arange(out_h) * gh // out_h, np.arange(out_w) * gw // out_w
  ids = hard.reshape(gh, gw)[rows][:, cols]                          # token of each pixel
  in_merged = merged.reshape(gh, gw)[rows][:, cols]
  hue = np.asarray(colormaps["tab20"](np.maximum(ids, 0) % 20))[..., :3]
  picture = np.where(in_merged[..., None], (1 - tint) * means + tint * hue, photo)
  picture[ids < 0] = 0.0
  # Outlines only where a merged group meets another token: kept patches stay plain.
  edge = np.zeros(ids.shape, bool)
  edge[:, :-1] |= (ids[:, :-1] != ids[:, 1:]) & (in_merged[:, :-1] | in_merged[:, 1:])
  edge[:-1, :] |= (ids[:-1, :] != ids[1:, :]) & (in_merged[:-1, :] | in_merged[1:, :])
  picture[edge] = line
  return np.clip(picture, 0, 1).astype(np.float32)


def vision_token_title(smap, b: int, label: Optional[str] = None) -> str:
  """``"MaMe tau=0.8: 576 -> 231 tokens"``: image ``b``'s patches and the tokens
  the language model reads (``smap.num_tokens`` less the special ones)."""
  tokens = int(smap.num_tokens[b]) - smap.num_special
  text = f"{smap.hard.shape[-1]} -> {tokens} tokens"
  return text if label is None else f"{label}: {text}"


def vision_token_figure(images, rows: Sequence[tuple], *, names: Optional[Sequence[str]] = None,
                        out_path=None, panel: int = 224) -> Figure:
  """One line per image: the photograph, then one :func:`vision_token_image` per
  entry of ``rows`` (``(label, smap)`` pairs, ``smap`` a
  :class:`~mame_jax.vis.sources.SourceMap` of the batch, e.g. from
  ``mame_jax.vision_tokens.token_sources``), titled with the token count
  (:func:`vision_token_title`). ``(1 + len(rows)) * panel`` wide and ``len(images) *
  (panel + TITLE_PX)`` high (:func:`figure_size`); written as PNG to ``out_path``
  when given."""
  images = np.asarray(images)
  width, height = figure_size(len(images), len(rows), panel)
  fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
  FigureCanvasAgg(fig)
  for b, image in enumerate(images):
    top = b * (panel + TITLE_PX) + TITLE_PX
    _panel(fig, (image + 1) / 2, 0, top, panel, width, height,
           "image" if names is None else str(names[b]))
    for c, (label, smap) in enumerate(rows, start=1):
      grid = smap.grid or sources.grid_shape(smap.hard.shape[-1])
      pic = vision_token_image(image, np.asarray(smap.hard[b]), grid, size=panel)
      _panel(fig, pic, c * panel, top, panel, width, height, vision_token_title(smap, b, label))
  if out_path is not None:
    fig.savefig(out_path, dpi=DPI)
  return fig
