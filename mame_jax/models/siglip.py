"""SigLIP / SigLIP 2 checkpoints: both towers read, inferred, checked and written.

A big_vision two-tower ``.npz`` holds, under a wrapper (bare, ``params/`` as the
released files, or ``opt/target/``):

    img/...                          a ViT (``mame_jax.models.checkpoints`` reads it)
    txt/Embed_0/embedding (V, D)     the text tower (``mame_jax.models.text``)
    txt/pos_embedding (1, L, D)
    txt/Encoder_0/encoderblock_{i}/...   or scanned: txt/Encoder_0/encoderblock/...
                                         with a leading layer axis (SigLIP 2 files)
    txt/Encoder_0/encoder_norm/...
    txt/head/...                     the text projection (SigLIP: D -> E)
    t (1,)                           log temperature
    b (1,)                           bias, when the model was trained with one

SigLIP and SigLIP 2 files differ only in the vocabulary (32k / 250k SentencePiece
against Gemma's 256k) and in being scanned; both load the same way. Old text
towers that kept a second position embedding at ``Encoder_0/pos_embedding``
(big_vision adds the two) and pre-linen block names are read too.

Text-tower inference (:func:`text_architecture`) reads width and vocabulary from
the embedding table, ``max_len`` from ``pos_embedding``, depth, ``mlp_dim``, heads
(the query kernel ``(D, heads, head_dim)``) and the output size (``head``) from
the shapes. Pooling is ``"map"`` with a ``MAPHead_0``, else ``"last"`` (SigLIP's;
``"first"``, ``"gap"`` and ``"max"`` have no weights to show them, so they must be
given: ``txt_overrides={"pool_type": ...}``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import zipfile
from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mame_jax.models import checkpoints, text, two_towers, vit

TOWERS = ("both", "img", "txt")
TEXT_ENCODER = "Encoder_0"
_TEXT_BLOCK_RE = re.compile(rf"^{TEXT_ENCODER}/encoderblock_(\d+)/")
_ATTN = "MultiHeadDotProductAttention_0"


# ------------------------------------------------------------------------------------
# Which towers a file holds.


def split_towers(arrays: Mapping) -> dict:
  """Flat arrays (any wrapper) -> ``{"img": flat, "txt": flat, "t": a, "b": a}``,
  each present only when the file has it."""
  flat = checkpoints.unwrap({k: v for k, v in arrays.items() if not k.startswith("meta/")})
  out = {}
  for tower in ("img", "txt"):
    sub = checkpoints._subtree(flat, f"{tower}/")  # pylint: disable=protected-access
    if sub:
      out[tower] = sub
  for scalar in ("t", "b"):
    if scalar in flat:
      out[scalar] = flat[scalar]
  return out


def is_two_towers(keys) -> bool:
  """Whether checkpoint keys (any wrapper) hold a text tower, ``txt/...``."""
  flat = checkpoints.unwrap({k: None for k in keys if not k.startswith("meta/")})
  return any(k.startswith("txt/") for k in flat)


def file_keys(path) -> list:
  """The keys of a checkpoint file, without reading its arrays when it is an
  ``.npz`` (the zip's table of contents); other formats hold no text tower."""
  path = os.fspath(path)
  if not zipfile.is_zipfile(path):
    return []
  with zipfile.ZipFile(path) as z:
    return [n[:-4] for n in z.namelist() if n.endswith(".npy")]


# ------------------------------------------------------------------------------------
# The text tower: any layout -> canonical (unscanned, current names) -> architecture.


def canonicalize_text(params: Mapping) -> dict:
  """A text tower's arrays (flat ``txt/``-less keys, or a params tree, scanned or
  not) -> canonical flat dict, keyed as ``text.Model(scan=False).init`` creates."""
  flat = checkpoints._flatten(params) if any(  # pylint: disable=protected-access
      isinstance(v, Mapping) for v in params.values()) else dict(params)
  prefix = f"{TEXT_ENCODER}/"
  # The encoder is the ViT's: unstacking and pre-linen renaming are the image
  # reader's, applied under the name it knows.
  encoder = {f"Transformer/{k[len(prefix):]}": v for k, v in flat.items()
             if k.startswith(prefix)}
  extra_posemb = encoder.pop("Transformer/pos_embedding", None)
  encoder = checkpoints._from_big_vision(encoder)  # pylint: disable=protected-access
  out = {k: v for k, v in flat.items() if not k.startswith(prefix)}
  out.update({f"{prefix}{k[len('Transformer/'):]}": v for k, v in encoder.items()})
  if extra_posemb is not None:  # an old tower that added two position embeddings
    out["pos_embedding"] = out["pos_embedding"] + extra_posemb
  return out


def text_architecture(flat: Mapping, source="checkpoint") -> dict:
  """``text.Model`` keyword arguments from a canonical text tower's shapes."""
  if "Embed_0/embedding" not in flat:
    shown = ", ".join(sorted(flat)[:5]) or "none"
    raise ValueError(f"{source}: no text tower: expected 'txt/Embed_0/embedding' "
                     f"(vocabulary, width); keys: {shown}")
  vocab, width = flat["Embed_0/embedding"].shape
  layers = sorted({int(m.group(1)) for k in flat if (m := _TEXT_BLOCK_RE.match(k))})
  kw = dict(width=int(width), vocab_size=int(vocab),
            depth=(layers[-1] + 1) if layers else 0,
            max_len=int(flat["pos_embedding"].shape[1]) if "pos_embedding" in flat else None,
            pool_type="map" if "MAPHead_0/probe" in flat else "last",
            num_classes=int(flat["head/kernel"].shape[-1]) if "head/kernel" in flat else None)
  if layers:
    first = f"{TEXT_ENCODER}/encoderblock_{layers[0]}/"
    if f"{first}MlpBlock_0/Dense_0/kernel" in flat:
      kw["mlp_dim"] = int(flat[f"{first}MlpBlock_0/Dense_0/kernel"].shape[-1])
    if f"{first}{_ATTN}/query/kernel" in flat:
      kw["num_heads"] = int(flat[f"{first}{_ATTN}/query/kernel"].shape[1])
  return kw


def architecture(arrays: Mapping, source="checkpoint") -> dict:
  """Both towers' architecture from a two-tower file's arrays: ``{"img": vit.Model
  kwargs, "txt": text.Model kwargs, "bias": bool, "image_size": (H, W) | None}``."""
  towers = _require(split_towers(arrays), "both", source)
  img, img_kw = checkpoints.canonicalize(towers["img"], source=source)
  return {"img": {**checkpoints._architecture(img), **img_kw},  # pylint: disable=protected-access
          "txt": text_architecture(canonicalize_text(towers["txt"]), source),
          "bias": "b" in towers,
          "image_size": checkpoints._image_size(img)}  # pylint: disable=protected-access


def _require(towers: dict, tower: str, source) -> dict:
  need = {"both": ("img", "txt", "t"), "img": ("img",), "txt": ("txt",)}[tower]
  missing = [k for k in need if k not in towers]
  if missing:
    what = {"img": "image tower 'img/...'", "txt": "text tower 'txt/...'",
            "t": "temperature 't'"}
    hint = (" It holds an image tower only: load it with tower='img'."
            if tower == "both" and "img" in towers and "txt" not in towers else "")
    raise ValueError(f"{source}: no {', no '.join(what[k] for k in missing)} for "
                     f"tower={tower!r}; it holds {sorted(towers) or 'nothing'}.{hint}")
  return towers


# ------------------------------------------------------------------------------------
# Loading.


def _fields(cls) -> set:
  return {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}


def _split_overrides(overrides: dict, img_overrides, txt_overrides):
  """Shared ``overrides`` (dtype_mm, dtype, attention, ...) go to every tower that has
  the attribute; an attribute of neither is an error naming it."""
  img_fields, txt_fields = _fields(vit._Model), _fields(text._TextTransformer)  # pylint: disable=protected-access
  img_kw, txt_kw = dict(img_overrides or {}), dict(txt_overrides or {})
  for k, v in overrides.items():
    if k not in img_fields and k not in txt_fields:
      raise ValueError(f"unknown model attribute {k!r}: neither vit.Model nor "
                       "text.Model has it")
    if k in img_fields:
      img_kw.setdefault(k, v)
    if k in txt_fields:
      txt_kw.setdefault(k, v)
  return img_kw, txt_kw


def _fit_text(flat: dict, model, source) -> dict:
  probe = model.clone(scan=False)
  length = model.max_len or flat["pos_embedding"].shape[1]
  texts = jax.ShapeDtypeStruct((1, length), jnp.int32)
  expected = checkpoints._flatten(  # pylint: disable=protected-access
      jax.eval_shape(probe.init, jax.random.key(0), texts)["params"])
  params = checkpoints.check_fit(flat, expected, f"{source} (text tower txt/)")
  if model.scan:
    params = checkpoints._stack_blocks(params, TEXT_ENCODER)  # pylint: disable=protected-access
  return checkpoints._unflatten(params)  # pylint: disable=protected-access


def _scalar(a, name, source):
  a = np.asarray(a, np.float32)
  if a.shape != (1,):
    raise ValueError(f"{source}: {name!r} has shape {a.shape}; expected (1,)")
  return jnp.asarray(a)


def load_model(path, *, tower: str = "both", merge=None, image_size=None,
               img_overrides: Optional[dict] = None, txt_overrides: Optional[dict] = None,
               **overrides):
  """``(model, params)`` from a SigLIP / SigLIP 2 file.

  Args:
    path: the ``.npz``.
    tower: ``"both"`` (a ``two_towers.Model``; params ``{img, txt, t[, b]}``),
      ``"img"`` (the image tower alone, a plain ``vit.Model``: what
      ``checkpoints.load_model`` returns) or ``"txt"`` (the text tower alone, a
      ``text.Model`` whose output is L2-normalised).
    merge: the image tower's merge configuration (``MergeConfig`` / ``ToMeConfig``).
    image_size: the image tower's resolution (position embeddings resampled).
    img_overrides / txt_overrides: attributes of one tower that win over the
      inferred ones.
    **overrides: attributes for every tower that has them (``dtype_mm``, ``dtype``,
      ``attention``, ``scan``).
  """
  source = os.fspath(path)
  if tower not in TOWERS:
    raise ValueError(f"tower must be one of {TOWERS}; got {tower!r}")
  if tower == "img":
    return checkpoints.load_model(path, merge=merge, image_size=image_size,
                                  **{**overrides, **(img_overrides or {})})
  if merge is not None and tower == "txt":
    raise ValueError("merge applies to the image tower; the text tower has none")
  towers = _require(split_towers(checkpoints.read_arrays(path)), tower, source)
  img_kw, txt_kw = _split_overrides(overrides, img_overrides, txt_overrides)
  txt_flat = canonicalize_text(towers["txt"])
  txt_model = text.Model(**{**text_architecture(txt_flat, source), **txt_kw})
  if tower == "txt":
    return txt_model, _fit_text(txt_flat, txt_model, source)

  img_flat, meta_kw = checkpoints.canonicalize(towers["img"], source=source)
  img_model = vit.Model(merge=merge, **{**checkpoints._architecture(img_flat),  # pylint: disable=protected-access
                                        **meta_kw, **img_kw})
  size = vit.pair(image_size or checkpoints._image_size(img_flat) or 224)  # pylint: disable=protected-access
  params = {"img": checkpoints._fit(img_flat, img_model, size,  # pylint: disable=protected-access
                                    f"{source} (image tower img/)"),
            "txt": _fit_text(txt_flat, txt_model.clone(normalize=False), source),
            "t": _scalar(towers["t"], "t", source)}
  if "b" in towers:
    params["b"] = _scalar(towers["b"], "b", source)
  model = two_towers.Model(img=img_model, txt=txt_model.clone(normalize=False),
                           bias_init=0.0 if "b" in towers else None)
  return model, params


# ------------------------------------------------------------------------------------
# Writing (for tests and conversions): the exact inverse of reading.


def save_npz(params: Mapping, path, *, layout: str = "current",
             wrapper: Optional[str] = "params") -> None:
  """Writes a two-tower params tree ``{img, txt, t[, b]}`` as a big_vision ``.npz``.

  ``layout``: ``"current"`` (unscanned blocks) or ``"scanned"`` (both towers'
  blocks stacked on a leading layer axis, as SigLIP 2 files); ``wrapper``: key
  prefix, ``"params"`` as the released files, ``"opt/target"``, or ``None`` (bare).
  """
  if layout not in ("current", "scanned"):
    raise ValueError(f"Unknown two-tower layout {layout!r}: 'current' or 'scanned'")
  img = checkpoints.canonicalize(params["img"])[0]
  txt = canonicalize_text(params["txt"])
  if layout == "scanned":
    img = checkpoints._stack_blocks(img)  # pylint: disable=protected-access
    txt = checkpoints._stack_blocks(txt, TEXT_ENCODER)  # pylint: disable=protected-access
  flat = {**{f"img/{k}": v for k, v in img.items()},
          **{f"txt/{k}": v for k, v in txt.items()}}
  for scalar in ("t", "b"):
    if scalar in params:
      flat[scalar] = params[scalar]
  if wrapper:
    flat = {f"{wrapper.strip('/')}/{k}": v for k, v in flat.items()}
  with open(path, "wb") as f:  # a file object: np.savez would append ".npz" to a name
    np.savez(f, **{k: np.asarray(v) for k, v in flat.items()})
