"""Vision tokens for a language model, with MaMe / ToMe in the encoder before them.

LLaVA-style models read an image as the hidden states of one layer of a CLIP
image tower (LLaVA-1.5: the penultimate layer's patch tokens, class token
dropped); PaliGemma-style ones read SigLIP's last layer without its pooling head.
Every token less is a token the language model does not attend over.
:func:`vision_tokens` gives those hidden states when the encoder merges:

    tokens, sizes, token_mask = vision_tokens(model, params, images, layer=-2)

* ``tokens (B, L', D)``: the residual stream after block ``layer`` (negative
  counts from the end, as Python's indices and transformers' ``hidden_states[1:]``
  do), the real tokens first and zeros after them;
* ``sizes (B, L')`` float32: how many patches each token holds. A merged MaMe
  source is shared among its destinations by its fusion weights (eq. 8's column
  normalisation), a ToMe token holds its group, so per image the sizes add up to
  the patch count (less only when ``mode="fixed"`` capacities dropped tokens); the
  class token, when kept, holds none. They come from the merge records,
  ``mame_jax.vis.sources``' transitions (rows normalised).
* ``token_mask (B, L')`` bool: the real tokens.

The length is static: it follows from the image size and the merge's static
capacities (``MergeConfig.capacities``; ``None``: the full capacity, nothing ever
dropped), so under ``jax.jit`` one capacity schedule is one program, and
``pad_to`` gives every batch the same length for the language model. With
``tau >= 1`` (or no merge) the tokens are exactly the plain encoder's hidden
states. The blocks after ``layer`` are not run.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mame_jax.merge import is_traced
from mame_jax.models import two_towers, vit
from mame_jax.models.inputs import check_images
from mame_jax.models.merging import merge_records
from mame_jax.vis import sources

_HIGHEST = jax.lax.Precision.HIGHEST


def image_tower(model, params) -> tuple:
  """``(vit model, its params)`` of a two-tower model (its ``img``) or a ViT."""
  if isinstance(model, two_towers.Model):
    if model.img is None or "img" not in params:
      raise ValueError("vision_tokens: the two-tower model has no image tower (img)")
    return model.img, params["img"]
  if isinstance(model, vit._Model):  # pylint: disable=protected-access
    return model, params
  raise TypeError("vision_tokens: model must be a two_towers.Model or a vit.Model (what "
                  f"mame_jax.load_model returns); got {type(model).__name__}")


def block_index(layer: int, depth: int) -> int:
  """``layer`` (negative: from the end) -> the block index in ``[0, depth)``."""
  k = int(layer) + depth if int(layer) < 0 else int(layer)
  if not 0 <= k < depth:
    raise ValueError(f"layer={layer} is outside the encoder's {depth} blocks "
                     f"(allowed: {-depth} .. {depth - 1})")
  return k


def _row_normalised(t):
  total = t.sum(-1, keepdims=True)
  return jnp.where(total > 0, t / jnp.where(total > 0, total, 1), 0)


def track_sizes(size, merge_aux):
  """Patches per token ``(B, L_in) -> (B, L_out)`` through one block's merge
  (``{"info": MergeInfo}``, ``{"record": ToMeRecord}`` or ``{}``)."""
  if "info" in merge_aux:
    t = sources.mame_transition(merge_aux["info"])
  elif "record" in merge_aux:
    t = sources.tome_transition(merge_aux["record"])
  else:
    return size
  return jnp.einsum("bk,bko->bo", size, _row_normalised(t.astype(jnp.float32)),
                    precision=_HIGHEST)


def vision_tokens(model, params, images, *, layer: int = -1, drop_special: bool = True,
                  pad_to: Optional[int] = None, norm: bool = False):
  """The hidden states a language model reads, after block ``layer``.

  Args:
    model, params: a ``two_towers.Model`` (SigLIP, CLIP) or a ``vit.Model`` and its
      params, as ``mame_jax.load_model`` returns them; the merge in the image
      tower's ``merge`` slot acts in the blocks up to ``layer``.
    images: ``(B, H, W, 3)`` float in [-1, 1], of the size the model was loaded for.
    layer: the block whose output is taken; ``-1`` the last (PaliGemma), ``-2``
      the penultimate (LLaVA-1.5).
    drop_special: leave out the class token (CLIP; SigLIP has none).
    pad_to: the output length; shorter outputs are padded with zeros (mask
      False). Less than the static length is allowed only outside ``jit`` when
      every image's real tokens fit; else ``ValueError``.
    norm: apply the tower's final LayerNorm (``encoder_norm``) to the tokens, as
      transformers' ``last_hidden_state`` of SigLIP does.

  Returns:
    ``(tokens (B, L', D), sizes (B, L') float32, token_mask (B, L') bool)``; see
    the module docstring.
  """
  img_model, img_params = image_tower(model, params)
  k = block_index(layer, img_model.depth)
  check_images(img_model, img_params, images)
  args = (img_model, k, bool(drop_special), bool(norm))
  try:
    hash(args)
  except TypeError:  # a traced tau in the merge config: run it as it is
    x, size, mask = _tokens(*args, img_params, images)
  else:  # one compiled program per model, layer and input shape
    x, size, mask = _tokens_jit(*args, img_params, images)
  if pad_to is not None:
    x, size, mask = _pad(x, size, mask, int(pad_to))
  return x, size, mask


def _tokens(img_model, k, drop_special, norm, img_params, images):
  ns = 1 if img_model.has_class_token else 0
  # Only the blocks up to `layer` run; pooling and head are left out (their params
  # stay in the tree, unused).
  truncated = img_model.clone(depth=k + 1, class_token=img_model.has_class_token,
                              pool_type="none", num_classes=None, rep_size=False)
  _, aux = truncated.apply({"params": img_params}, images)
  x = aux[f"block{k:02d}"]["+mlp"]
  if norm:
    if img_model.fc_norm:
      raise ValueError("norm=True: this model has no encoder_norm (fc_norm=True)")
    x = nn.LayerNorm(epsilon=img_model.ln_eps, dtype=img_model.dtype).apply(
        {"params": img_params["Transformer"]["encoder_norm"]}, x)
  b, length = x.shape[:2]
  # Real tokens come first after MaMe and ToMe: the count says which.
  count = aux["tokens_per_block"][:, k]
  mask = jnp.arange(length)[None] < count[:, None]
  size = jnp.concatenate([jnp.zeros((b, ns), jnp.float32),
                          jnp.ones((b, length_in(aux) - ns), jnp.float32)], axis=1)
  for merge_aux in merge_records(aux)[:k + 1]:
    size = track_sizes(size, merge_aux)
  x = jnp.where(mask[..., None], x, jnp.zeros((), x.dtype))
  size = jnp.where(mask, size, 0.0)
  if drop_special and ns:
    x, size, mask = x[:, ns:], size[:, ns:], mask[:, ns:]
  return x, size, mask


_tokens_jit = jax.jit(_tokens, static_argnums=(0, 1, 2, 3))


def length_in(aux) -> int:
  """Tokens entering block 0 (class token included)."""
  return aux["block00"]["+sa"].shape[1]


def _pad(x, size, mask, pad_to):
  length = x.shape[1]
  if pad_to >= length:
    extra = pad_to - length
    return (jnp.pad(x, ((0, 0), (0, extra), (0, 0))), jnp.pad(size, ((0, 0), (0, extra))),
            jnp.pad(mask, ((0, 0), (0, extra))))
  if is_traced(mask):
    raise ValueError(f"pad_to={pad_to} is less than the static length {length} under jit, "
                     "where the real counts are unknown: give the merge a capacity that "
                     f"fits (MergeConfig.capacities) or pad_to >= {length}")
  most = int(jnp.max(mask.sum(-1)))
  if most > pad_to:
    raise ValueError(f"pad_to={pad_to} is less than the {most} real tokens of an image in "
                     "this batch")
  return x[:, :pad_to], size[:, :pad_to], mask[:, :pad_to]
