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

Which patches feed each token: ``vision_tokens(..., return_sources=True)`` adds
the :class:`~mame_jax.vis.sources.SourceMap` of block ``layer``, aligned with the
tokens (the class token left out when ``drop_special``, padding as ``pad_to``
asks), so token ``t`` holds the patches with ``hard == t``; :func:`token_sources`
gives the map alone, :func:`patch_counts` / :func:`kept_and_merged` count kept
tokens (one patch each) and merged ones, and
``mame_jax.vis.pictures.vision_token_figure`` draws them.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mame_jax.merge import is_traced
from mame_jax.models import clip, two_towers, vit
from mame_jax.models.inputs import check_images
from mame_jax.models.merging import merge_records
from mame_jax.vis import sources

_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Style:
  """How one kind of vision-language model reads its image encoder.

  Attributes:
    source: ``load_model``'s known name of the encoder checkpoint.
    layer, drop_special, norm: :func:`vision_tokens`' arguments for it.
    fallback: ``vit.Model`` arguments of a small random stand-in of the same
      kind (``load.pretrained_or_random``'s ``fallback_kw``), for offline runs.
    name: the stand-in's kind, for the note that says it is random.
  """

  source: str
  layer: int
  drop_special: bool
  norm: bool
  fallback: dict
  name: str


# LLaVA-1.5: CLIP ViT-L/14-336, the penultimate layer's 576 patch tokens, no class
# token. PaliGemma: SigLIP So400m/14 (its last layer after the final LayerNorm, as
# big_vision's "encoded"); the nearest known checkpoint here is SigLIP B/16-512.
STYLES = {
    "llava": Style("clip_l14_336", layer=-2, drop_special=True, norm=False,
                   fallback=dict(patch_size=14, pre_norm=True, activation="quick_gelu",
                                 input_norm=(clip.CLIP_MEAN, clip.CLIP_STD)),
                   name="CLIP-shaped ViT"),
    "paligemma": Style("siglip_b16_512", layer=-1, drop_special=True, norm=True,
                       fallback=dict(patch_size=14, class_token=False, pool_type="map"),
                       name="SigLIP-shaped ViT"),
}


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
                  pad_to: Optional[int] = None, norm: bool = False,
                  return_sources: bool = False):
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
    return_sources: also return the tokens' source map (:func:`token_sources`).

  Returns:
    ``(tokens (B, L', D), sizes (B, L') float32, token_mask (B, L') bool)``; see
    the module docstring. With ``return_sources`` a fourth entry, the
    :class:`~mame_jax.vis.sources.SourceMap` ``(soft (B, P, L'), hard (B, P),
    mixing (B, L', P))`` whose token index ``t`` is token ``t`` of ``tokens``.
  """
  img_model, img_params = image_tower(model, params)
  k = block_index(layer, img_model.depth)
  check_images(img_model, img_params, images)
  args = (img_model, k, bool(drop_special), bool(norm), bool(return_sources))
  try:
    hash(args)
  except TypeError:  # a traced tau in the merge config: run it as it is
    out = _tokens(*args, img_params, images)
  else:  # one compiled program per model, layer and input shape
    out = _tokens_jit(*args, img_params, images)
  if pad_to is not None:
    out = _pad(*out, pad_to=int(pad_to))
  return out


def token_sources(model, params, images, *, layer: int = -1, drop_special: bool = True,
                  pad_to: Optional[int] = None) -> sources.SourceMap:
  """The :class:`~mame_jax.vis.sources.SourceMap` of the tokens
  :func:`vision_tokens` returns with the same arguments: ``hard (B, P)`` indexes
  those tokens (``-1``: a patch dropped by a fixed capacity), ``soft (B, P, L')``
  are the shares (``soft.sum(1)`` is ``sizes``), ``mixing (B, L', P)``,
  ``token_mask`` the tokens' mask; ``grid`` the patch grid. With ``drop_special``
  the class token is left out (``num_special`` 0)."""
  return vision_tokens(model, params, images, layer=layer, drop_special=drop_special,
                       pad_to=pad_to, return_sources=True)[3]


def patch_counts(smap: sources.SourceMap) -> jax.Array:
  """(B, L) int32: the patches whose largest holder is each token (``hard``'s
  labels counted). Where every share is whole (ToMe, or MaMe with ``tau >= 1``)
  this is ``sizes``; a MaMe token may also hold parts of patches it is not the
  largest holder of."""
  held = jax.nn.one_hot(smap.hard, smap.token_mask.shape[1], dtype=jnp.int32)
  return held.sum(1)


def kept_and_merged(smap: sources.SourceMap) -> dict:
  """Per image ``(B,)`` int32 counts by ``hard``: ``kept`` tokens hold exactly one
  patch, ``merged`` tokens several (``merged_patches`` in all); ``dropped``
  patches have no token (fixed capacities only). ``kept + merged_patches +
  dropped`` is the patch count ``P``; ``kept + merged`` the tokens holding a
  patch (special tokens hold none)."""
  counts = patch_counts(smap)
  return {"kept": (counts == 1).sum(-1).astype(jnp.int32),
          "merged": (counts > 1).sum(-1).astype(jnp.int32),
          "merged_patches": jnp.where(counts > 1, counts, 0).sum(-1).astype(jnp.int32),
          "dropped": (smap.hard < 0).sum(-1).astype(jnp.int32)}


def _tokens(img_model, k, drop_special, norm, return_sources, img_params, images):
  ns = img_model.num_special
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
  smap = sources.source_maps(aux, img_model.merge)[k] if return_sources else None
  if drop_special and ns:
    x, size, mask = x[:, ns:], size[:, ns:], mask[:, ns:]
    if smap is not None:  # specials hold no patch: every hard label moves down by ns
      smap = smap.replace(soft=smap.soft[:, :, ns:], mixing=smap.mixing[:, ns:],
                          hard=jnp.where(smap.hard >= 0, smap.hard - ns, -1),
                          token_mask=smap.token_mask[:, ns:], num_special=0)
  return (x, size, mask) if smap is None else (x, size, mask, smap)


_tokens_jit = jax.jit(_tokens, static_argnums=(0, 1, 2, 3, 4))


def length_in(aux) -> int:
  """Tokens entering block 0 (class token included)."""
  return aux["block00"]["+sa"].shape[1]


def _pad(x, size, mask, smap=None, *, pad_to):
  length = x.shape[1]
  if pad_to >= length:
    extra = pad_to - length
    out = (jnp.pad(x, ((0, 0), (0, extra), (0, 0))), jnp.pad(size, ((0, 0), (0, extra))),
           jnp.pad(mask, ((0, 0), (0, extra))))
    return out if smap is None else out + (_resize_map(smap, pad_to),)
  if is_traced(mask):
    raise ValueError(f"pad_to={pad_to} is less than the static length {length} under jit, "
                     "where the real counts are unknown: give the merge a capacity that "
                     f"fits (MergeConfig.capacities) or pad_to >= {length}")
  most = int(jnp.max(mask.sum(-1)))
  if most > pad_to:
    raise ValueError(f"pad_to={pad_to} is less than the {most} real tokens of an image in "
                     "this batch")
  out = x[:, :pad_to], size[:, :pad_to], mask[:, :pad_to]
  return out if smap is None else out + (_resize_map(smap, pad_to),)


def _resize_map(smap, length):
  """``smap`` over ``length`` token slots: padding slots added (holding no patch)
  or cut (only slots after every real token, so ``hard`` stays as it is)."""
  extra = length - smap.token_mask.shape[1]
  if extra <= 0:
    return smap.replace(soft=smap.soft[:, :, :length], mixing=smap.mixing[:, :length],
                        token_mask=smap.token_mask[:, :length])
  return smap.replace(soft=jnp.pad(smap.soft, ((0, 0), (0, 0), (0, extra))),
                      mixing=jnp.pad(smap.mixing, ((0, 0), (0, extra), (0, 0))),
                      token_mask=jnp.pad(smap.token_mask, ((0, 0), (0, extra))))
