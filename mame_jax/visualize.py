"""Token-cluster pictures (the paper's Figure 1) and the ``mame-jax visualize`` CLI.

Every patch of the image is painted with the mean colour of the patches that
share its token (``mame_jax.sources``: the token holding the largest share of
the patch), with a thin line wherever two neighbouring patches belong to
different tokens. One panel per merge layer, titled with the model's token
count after that block; one row per image and method (MaMe, optionally ToMe).

Pictures are drawn with matplotlib's object API on an Agg canvas, so nothing
here needs a display or changes the global matplotlib backend (notebooks keep
their inline backend). Figures have an exact pixel size:
``(1 + len(layers)) * panel`` wide and ``rows * (panel + TITLE_PX)`` high.

Images everywhere are ``(H, W, 3)`` floats in [-1, 1], what ``mame_jax.vit``
takes. Without a checkpoint the CLI and :func:`demo_figure` use a small randomly
initialised ViT: on real photographs its first blocks still see the image's
colours and edges, so clusters follow the picture, but they are not what a
trained model would merge.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import pathlib
import sys
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mame_jax import sources
from mame_jax.merging import MergeConfig, ToMeConfig

PHOTOS = ("astronaut", "coffee", "chelsea")  # bundled with scikit-image, no download
TITLE_PX = 22   # title band above every panel
DPI = 100
AUGREG_B16 = ("https://storage.googleapis.com/vit_models/augreg/B_16-i21k-300ep-lr_0.001-"
              "aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_224.npz")
OFFLINE_ENV = "MAME_JAX_OFFLINE"


# ----------------------------------------------------------------------------
# Images


def load_image(name: str, size: int = 224) -> np.ndarray:
  """An image file, or the name of a ``skimage.data`` photograph (``astronaut``),
  centre-cropped to a square and resized to ``(size, size, 3)`` float32 in [-1, 1].

  A centre crop keeps the whole square the model sees in the picture (unlike the
  eval pipeline's resize-to-256-then-crop-224, which would cut its border off).
  """
  import skimage.data  # pylint: disable=import-outside-toplevel
  import skimage.io  # pylint: disable=import-outside-toplevel
  import skimage.transform  # pylint: disable=import-outside-toplevel
  import skimage.util  # pylint: disable=import-outside-toplevel
  if os.path.exists(name):
    img = skimage.io.imread(name)
  elif not name.startswith("_") and callable(getattr(skimage.data, name, None)):
    img = getattr(skimage.data, name)()
  else:
    raise ValueError(f"{name!r} is neither an image file nor a skimage.data photograph "
                     f"(e.g. {', '.join(PHOTOS)})")
  img = np.asarray(img)
  if img.ndim == 2:
    img = np.stack([img] * 3, -1)
  if img.ndim != 3 or img.shape[-1] < 3:
    raise ValueError(f"{name!r} is not an RGB or grey image (shape {img.shape})")
  img = skimage.util.img_as_float(img[..., :3])   # any integer or float dtype -> [0, 1]
  h, w = img.shape[:2]
  side = min(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  img = img[top:top + side, left:left + side]
  img = skimage.transform.resize(img, (size, size), anti_aliasing=side > size)
  return (np.clip(img, 0, 1) * 2 - 1).astype(np.float32)


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
      tome_maps)]``, with ``maps`` from :func:`mame_jax.sources.source_maps`.
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


def _panel(fig, picture, left, top, panel, width, height, title):
  ax = fig.add_axes((left / width, 1 - (top + panel) / height, panel / width, panel / height))
  ax.imshow(np.clip(picture, 0, 1), interpolation="nearest", aspect="auto")
  ax.set_axis_off()
  ax.set_title(title, fontsize=7.5, pad=3)


# ----------------------------------------------------------------------------
# Models


def random_vit(image_size: int = 224, *, depth: int = 8, width: int = 192, seed: int = 0,
               **model_kw):
  """``(model, params)``: a randomly initialised ViT with 16-px patches, a class
  token, heads of 64 (ViT-Ti's width by default) and ``depth`` blocks -- the
  stand-in when there is no checkpoint. ``model_kw`` override ``vit.Model``'s
  arguments. Parameters come from :func:`random_params`."""
  from mame_jax.vit import Model  # pylint: disable=import-outside-toplevel
  kw = dict(width=width, depth=depth, num_heads=max(1, width // 64), mlp_dim=4 * width,
            patch_size=16, pool_type="tok")
  model = Model(1000, **{**kw, **model_kw})
  return model, random_params(model, image_size, seed)


def random_params(model, image_size: int = 224, seed: int = 0) -> dict:
  """Random parameters for ``model`` at ``image_size``, drawn with NumPy on the
  shapes ``jax.eval_shape(model.init)`` gives: every kernel ~ N(0, 1/fan_in)
  (LeCun normal), ``pos_embedding`` ~ N(0, 1/D) as in ``vit.py``, biases and
  ``cls`` zero, LayerNorm scales one. Compiling flax's initialisers takes longer
  on a CPU than everything a notebook then does with the model."""
  dummy = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(seed), dummy)["params"]
  rng = np.random.default_rng(seed)

  def draw_leaf(path, leaf):
    names = [getattr(k, "key", str(k)) for k in path]
    shape = leaf.shape
    if names[-1] == "kernel":
      if names[-2] in ("query", "key", "value"):
        fan_in = shape[0]                       # (D, heads, head_dim)
      elif names[-2] == "out":
        fan_in = shape[0] * shape[1]            # (heads, head_dim, D)
      else:
        fan_in = int(np.prod(shape[:-1]))       # Dense (in, out), Conv (p, p, 3, D)
      value = rng.normal(0, 1 / np.sqrt(fan_in), shape)
    elif names[-1] in ("pos_embedding", "probe"):
      value = rng.normal(0, 1 / np.sqrt(shape[-1]), shape)
    elif names[-1] == "scale":
      value = np.ones(shape)
    else:                                       # biases, cls
      value = np.zeros(shape)
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(draw_leaf, shapes)


def image_size_of(model, params, default: int = 224) -> int:
  """The resolution ``params`` were made for (learned position-embedding grid
  times the patch size); ``default`` for sin-cos embeddings."""
  pos = params.get("pos_embedding") if hasattr(params, "get") else None
  if pos is None:
    return default
  patch = model.patch_size if np.ndim(model.patch_size) == 0 else model.patch_size[0]
  return math.isqrt(pos.shape[1]) * int(patch)


def pretrained_or_random(url: str = AUGREG_B16, *, offline: Optional[bool] = None,
                         timeout: float = 10.0, cache_dir=None, fallback_size: int = 224,
                         fallback_depth: int = 4):
  """``(model, params, note)``: the checkpoint at ``url`` when it can be had,
  else :func:`random_vit` (``fallback_depth`` blocks: shallow, because on a
  CPU compiling the merged model costs more than running it); ``note`` says
  which, for printing.

  The file is cached by :func:`mame_jax.data.cached_download` (``cache_dir``,
  default ``$MAME_JAX_CACHE`` or ``~/.cache/mame_jax``) and read from there next time. ``offline`` (default: the environment variable
  ``MAME_JAX_OFFLINE=1``) skips the network *and* the cache, so that offline
  runs are always the same small, fast model. ``timeout`` bounds every network
  wait; any failure falls back to the random model.
  """
  from mame_jax.checkpoints import load_model  # pylint: disable=import-outside-toplevel
  if offline is None:
    offline = os.environ.get(OFFLINE_ENV, "") not in ("", "0")
  if offline:
    model, params = random_vit(fallback_size, depth=fallback_depth)
    return model, params, (f"offline ({OFFLINE_ENV}=1): a randomly initialised ViT "
                           f"({_describe(model)}), not a trained model")
  from mame_jax.data import cached_download  # pylint: disable=import-outside-toplevel
  try:
    path = pathlib.Path(cached_download(url, cache_dir, timeout=timeout))
    model, params = load_model(path)
  except Exception as e:  # pylint: disable=broad-except  # any failure: offline fallback
    model, params = random_vit(fallback_size, depth=fallback_depth)
    return model, params, (f"could not get {url} ({type(e).__name__}: {e}); using a "
                           f"randomly initialised ViT ({_describe(model)}) instead")
  return model, params, f"checkpoint {path.name} ({_describe(model)})"


def _describe(model) -> str:
  patch = model.patch_size if np.ndim(model.patch_size) == 0 else model.patch_size[0]
  return f"width {model.width}, depth {model.depth}, patch {patch}"


def merge_maps(model, params, images, merge, *, per_image: bool = True):
  """Runs ``model`` with ``merge`` on ``images (B, H, W, 3)`` and returns
  ``(maps, aux)``: one :class:`~mame_jax.sources.SourceMap` per block (batch
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


def matched_tome_r(maps, layers: Sequence[int], num_special: int = 1) -> int:
  """ToMe's ``r`` that removes, over ``layers``, about as many tokens as MaMe
  did (batch mean), so that both rows end with similar token counts."""
  start = maps[0].soft.shape[1] + num_special
  end = float(np.mean(np.asarray(maps[max(layers)].num_tokens)))
  return max(0, round((start - end) / max(len(layers), 1)))


def draw(model, params, images, *, tau: float = 0.8, layers: Sequence[int] = range(8),
         tome_r=None, out_path=None, panel: int = 160, names=None):
  """Runs MaMe (and ToMe when ``tome_r`` is an int, or ``"match"`` for
  :func:`matched_tome_r`) in ``layers`` and draws :func:`cluster_figure`.

  Returns ``(figure, counts)``: ``counts[label]`` is ``aux["tokens_per_block"]``
  (B, depth) of that row.
  """
  layers = sorted(set(int(l) for l in layers))
  if not layers or layers[0] < 0 or layers[-1] >= model.depth:
    raise ValueError(f"layers must be blocks of the model (0..{model.depth - 1}); got {layers}")
  cfg = MergeConfig(tau=float(tau), layers=tuple(layers))
  maps, aux = merge_maps(model, params, images, cfg)
  label = f"MaMe tau={tau:g}"
  rows, counts = [(label, maps)], {label: np.asarray(aux["tokens_per_block"])}
  if tome_r is not None:
    r = matched_tome_r(maps, layers, maps[0].num_special) if tome_r == "match" else int(tome_r)
    tmaps, taux = merge_maps(model, params, images, ToMeConfig(r=r, layers=tuple(layers)))
    label = f"ToMe r={r}"
    rows.append((label, tmaps))
    counts[label] = np.asarray(taux["tokens_per_block"])
  fig = cluster_figure(images, rows, layers, out_path=out_path, panel=panel, names=names)
  return fig, counts


def demo_figure(out_path, *, images: Sequence[str] = PHOTOS, checkpoint=None,
                tau: float = 0.8, tome_r="match", layers: Optional[Sequence[int]] = None,
                panel: int = 160, verbose: bool = True) -> pathlib.Path:
  """Figure 1 for the bundled ``skimage.data`` photographs, written to ``out_path``.

  ``checkpoint``: a file ``load_model`` reads; without one a small randomly
  initialised ViT (:func:`random_vit`) is used, and ``verbose`` says so.
  ``tome_r``: an int, ``"match"`` (ToMe removes as many tokens as MaMe) or None
  (no ToMe row). ``layers``: default the first 8 blocks (the paper's
  training-free setting), or all of a shallower model's.
  """
  model, params, note = _model(checkpoint)
  layers = default_layers(model) if layers is None else layers
  size = image_size_of(model, params)
  batch = np.stack([load_image(name, size) for name in images])
  _, counts = draw(model, params, batch, tau=tau, layers=layers, tome_r=tome_r,
                   out_path=out_path, panel=panel, names=list(images))
  if verbose:
    print(note)
    _print_counts(counts, images, layers)
    print(f"wrote {out_path}")
  return pathlib.Path(out_path)


def default_layers(model) -> tuple[int, ...]:
  """The paper's training-free default: MaMe in the first 8 blocks."""
  return tuple(range(min(8, model.depth)))


def _model(checkpoint):
  if checkpoint is None:
    model, params = random_vit()
    return model, params, (f"no checkpoint: using a randomly initialised ViT "
                           f"({_describe(model)}); clusters follow the photographs' "
                           "colours, not what a trained model would merge")
  from mame_jax.checkpoints import load_model  # pylint: disable=import-outside-toplevel
  model, params = load_model(checkpoint)
  return model, params, f"checkpoint {checkpoint} ({_describe(model)})"


def _print_counts(counts, names, layers):
  layers = sorted(set(int(l) for l in layers))
  for label, c in counts.items():
    for name, row in zip(names, c):
      print(f"{label:>16} {name:>18}: tokens after blocks {layers[0]}-{layers[-1]}: "
            + " ".join(str(int(row[l])) for l in layers))


# ----------------------------------------------------------------------------
# CLI: mame-jax visualize


def parse_layers(text: str) -> tuple[int, ...]:
  """``"0-7"`` -> (0, ..., 7); ``"0,2,4"`` and ``"3"`` work too."""
  out = []
  try:
    for part in text.split(","):
      lo, _, hi = part.strip().partition("-")
      out.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
  except ValueError as e:
    raise argparse.ArgumentTypeError(f"layers must look like 0-7 or 0,2,4; got {text!r}") from e
  return tuple(sorted(set(out)))


def _tome_r(text: str):
  if text == "match":
    return text
  try:
    r = int(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(f"--tome-r takes an int >= 0 or 'match'; got {text!r}") from e
  if r < 0:
    raise argparse.ArgumentTypeError(f"--tome-r takes an int >= 0 or 'match'; got {r}")
  return r


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
  """The ``visualize`` options (for a subcommand parser)."""
  parser.add_argument("images", nargs="+", metavar="IMAGE",
                      help=f"image files or skimage.data names ({', '.join(PHOTOS)}, ...)")
  parser.add_argument("--checkpoint", help="a checkpoint file (big_vision/AugReg .npz, "
                      "timm .safetensors); without it a small randomly initialised ViT")
  parser.add_argument("--tau", type=float, default=0.8, help="MaMe threshold (default 0.8)")
  parser.add_argument("--tome-r", type=_tome_r, default=None,
                      help="also draw ToMe with this r per merge layer ('match': as many "
                      "tokens removed as MaMe)")
  parser.add_argument("--layers", type=parse_layers, default=None,
                      help="merge layers, one panel each, e.g. 0-7 or 0,2,4 (default: the "
                      "first 8 blocks)")
  parser.add_argument("--out", default="token_clusters.png", help="PNG to write")
  parser.add_argument("--panel", type=int, default=160, help="panel side in pixels")
  return parser


def run(args: argparse.Namespace) -> int:
  """Runs ``visualize`` for arguments parsed with :func:`add_arguments`; 0 on
  success, 2 (with a message on stderr) for a bad image, checkpoint or layer."""
  try:
    model, params, note = _model(args.checkpoint)
    print(note)
    layers = default_layers(model) if args.layers is None else args.layers
    size = image_size_of(model, params)
    batch = np.stack([load_image(name, size) for name in args.images])
    names = [pathlib.Path(n).stem for n in args.images]
    _, counts = draw(model, params, batch, tau=args.tau, layers=layers,
                     tome_r=args.tome_r, out_path=args.out, panel=args.panel, names=names)
  except (ValueError, OSError) as e:
    print(f"mame-jax visualize: error: {e}", file=sys.stderr)
    return 2
  _print_counts(counts, names, layers)
  print(f"wrote {args.out}")
  return 0


def cli_main(argv: Optional[Sequence[str]] = None) -> int:
  """``mame-jax visualize IMAGE... [--checkpoint PATH] [--tau T] [--tome-r R]
  [--layers 0-7] [--out fig.png]``; ``argv`` excludes the word ``visualize``."""
  parser = add_arguments(argparse.ArgumentParser(
      prog="mame-jax visualize", description="Draw MaMe's (and ToMe's) token clusters."))
  return run(parser.parse_args(argv))


if __name__ == "__main__":
  sys.exit(cli_main())
