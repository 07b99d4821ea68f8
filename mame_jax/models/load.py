"""Where a model comes from: a checkpoint (file or URL) or random weights."""

from __future__ import annotations

import os
import pathlib
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from mame_jax.models import vit

AUGREG_B16 = ("https://storage.googleapis.com/vit_models/augreg/B_16-i21k-300ep-lr_0.001-"
              "aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_224.npz")
OFFLINE_ENV = "MAME_JAX_OFFLINE"


def random_vit(image_size: int = 224, *, depth: int = 8, width: int = 192, seed: int = 0,
               **model_kw):
  """``(model, params)``: a randomly initialised ViT with 16-px patches, a class
  token, heads of 64 (ViT-Ti's width by default) and ``depth`` blocks -- the
  stand-in when there is no checkpoint. ``model_kw`` override ``vit.Model``'s
  arguments. Parameters come from :func:`random_params`."""
  kw = dict(width=width, depth=depth, num_heads=max(1, width // 64), mlp_dim=4 * width,
            patch_size=16, pool_type="tok")
  model = vit.Model(1000, **{**kw, **model_kw})
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


def pretrained_or_random(url: str = AUGREG_B16, *, offline: Optional[bool] = None,
                         timeout: float = 10.0, cache_dir=None, fallback_size: int = 224,
                         fallback_depth: int = 4):
  """``(model, params, note)``: the checkpoint at ``url`` when it can be had,
  else :func:`random_vit` (``fallback_depth`` blocks: shallow, because on a
  CPU compiling the merged model costs more than running it); ``note`` says
  which, for printing.

  The file is cached by :func:`mame_jax.eval.data.cached_download` (``cache_dir``,
  default ``$MAME_JAX_CACHE`` or ``~/.cache/mame_jax``) and read from there next time. ``offline`` (default: the environment variable
  ``MAME_JAX_OFFLINE=1``) skips the network *and* the cache, so that offline
  runs are always the same small, fast model. ``timeout`` bounds every network
  wait; any failure falls back to the random model.
  """
  from mame_jax.models.checkpoints import load_model  # pylint: disable=import-outside-toplevel
  if offline is None:
    offline = os.environ.get(OFFLINE_ENV, "") not in ("", "0")
  if offline:
    model, params = random_vit(fallback_size, depth=fallback_depth)
    return model, params, (f"offline ({OFFLINE_ENV}=1): a randomly initialised ViT "
                           f"({describe(model)}), not a trained model")
  from mame_jax.eval.data import cached_download  # pylint: disable=import-outside-toplevel
  try:
    path = pathlib.Path(cached_download(url, cache_dir, timeout=timeout))
    model, params = load_model(path)
  except Exception as e:  # pylint: disable=broad-except  # any failure: offline fallback
    model, params = random_vit(fallback_size, depth=fallback_depth)
    return model, params, (f"could not get {url} ({type(e).__name__}: {e}); using a "
                           f"randomly initialised ViT ({describe(model)}) instead")
  return model, params, f"checkpoint {path.name} ({describe(model)})"


def describe(model) -> str:
  """``"width 192, depth 4, patch 16"``: a model in a few words, for messages."""
  return f"width {model.width}, depth {model.depth}, patch {vit.pair(model.patch_size)[0]}"


def checkpoint_or_random(checkpoint=None):
  """``(model, params, note)``: the checkpoint file ``checkpoint``, or without one
  :func:`random_vit`; ``note`` says which, for printing."""
  if checkpoint is None:
    model, params = random_vit()
    return model, params, (f"no checkpoint: using a randomly initialised ViT "
                           f"({describe(model)}); clusters follow the photographs' "
                           "colours, not what a trained model would merge")
  from mame_jax.models.checkpoints import load_model  # pylint: disable=import-outside-toplevel
  model, params = load_model(checkpoint)
  return model, params, f"checkpoint {checkpoint} ({describe(model)})"
