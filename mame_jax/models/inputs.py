"""Checks at the model's door: images a ``vit.Model`` can take, tested before tracing.

A ViT given the wrong images fails far from the cause -- a 100 px image for a
model loaded at 224 px surfaces as flax's ``ScopeParamShapeError`` about
``pos_embedding``, and ``uint8`` pixels run without complaint and give
meaningless logits. :func:`check_images` looks only at shapes and dtypes (never
at values, so it costs nothing and never syncs with the device) and raises one
``ValueError`` that names the argument, what was expected and how to get it.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Union

import numpy as np

from mame_jax.models.vit import pair, patch_grid


def check_images(model, params_or_image_size: Union[Mapping, int, tuple, None], images):
  """Raises ``ValueError`` unless ``images`` suit ``model``.

  Args:
    model: a ``mame_jax.models.vit`` model (its ``patch_size`` and ``posemb``).
    params_or_image_size: the model's parameters (their learned
      ``pos_embedding (1, h*w, D)`` fixes the patch grid, hence the image size),
      or the image side ``S`` / ``(H, W)`` the model takes, or ``None`` (any size,
      as with sin-cos position embeddings).
    images: what is about to be fed to the model: ``(B, H, W, 3)``, RGB,
      channels last, float values in [-1, 1] (values are not checked).

  Why each rule: the model's first op is a patch convolution over 3 channels
  (rank and channels), learned position embeddings exist for one patch grid
  only (size; ``load_model(..., image_size=S)`` resamples them to another), and
  integer pixels would be taken as values far outside [-1, 1].
  """
  if hasattr(model, "check_inputs"):  # a video model checks its own (B, T, H, W, 3)
    model.check_inputs(params_or_image_size, images)
    return
  shape = tuple(getattr(images, "shape", np.shape(images)))
  dtype = getattr(images, "dtype", None)
  if dtype is None:
    dtype = np.asarray(images).dtype
  if len(shape) != 4:
    hint = " (one image? add a batch axis: images[None])" if len(shape) == 3 else ""
    raise ValueError(f"images must have shape (B, H, W, 3); got shape {shape}{hint}")
  if shape[-1] != 3:
    hint = (" (channels first? transpose to channels last: images.transpose(0, 2, 3, 1))"
            if shape[1] == 3 else "")
    raise ValueError(f"images must have 3 colour channels, last: shape (B, H, W, 3); "
                     f"got shape {shape}{hint}")
  dtype = np.dtype(dtype)
  if not np.issubdtype(dtype, np.floating):
    hint = (" for 8-bit pixels in [0, 255]: x.astype(np.float32) / 127.5 - 1"
            if np.issubdtype(dtype, np.integer) else "")
    raise ValueError(f"images must be float values in [-1, 1]; got dtype {dtype}. "
                     f"Convert them{hint or ' to floats in [-1, 1]'}")
  ph, pw = pair(model.patch_size)
  h, w = shape[1:3]
  if h < ph or w < pw:
    raise ValueError(f"images of {h}x{w} px are smaller than one {ph}x{pw} px patch; "
                     f"shape {shape}")
  grid = _expected_grid(model, params_or_image_size)
  if grid is None or patch_grid(model, (h, w)) == grid:
    return
  want = (grid[0] * ph, grid[1] * pw)
  side = f"{want[0]}" if want[0] == want[1] else f"{want}"
  raise ValueError(
      f"images are {h}x{w} px but the model was loaded for {want[0]}x{want[1]} px images "
      f"(its learned pos_embedding is a {grid[0]}x{grid[1]} grid of {ph}x{pw} px patches). "
      f"Resize the images to {want[0]}x{want[1]}, or load the model for this size with "
      f"mame_jax.load_model(..., image_size={h if h == w else (h, w)}) (instead of "
      f"image_size={side}), which resamples the position embeddings")


def _expected_grid(model, params_or_image_size) -> Optional[tuple]:
  """The patch grid ``(gh, gw)`` the model takes, or ``None`` when any works."""
  spec = params_or_image_size
  if spec is None:
    return None
  if isinstance(spec, Mapping) or hasattr(spec, "get"):
    if getattr(model, "posemb", "learn") != "learn":
      return None
    pe = spec.get("pos_embedding")
    if pe is None:
      return None
    n = int(np.shape(pe)[1])
    side = math.isqrt(n)
    # A non-square table does not tell its grid: pass the image size to check it.
    return (side, side) if side * side == n else None
  return patch_grid(model, spec)
