"""SigLIP's text tower in Flax linen, laid out like big_vision's
``models/proj/image_text/text_transformer.py``.

Parameter tree (what big_vision's ``.npz`` files hold under ``txt/``):

    Embed_0/embedding (V, D)         token embeddings
    pos_embedding (1, L, D)          learned, one row per position
    Encoder_0/encoderblock_{i}/...   pre-LN blocks, the ViT's (scanned:
                                     Encoder_0/encoderblock/... with a layer axis)
    Encoder_0/encoder_norm
    MAPHead_0/...                    only with pool_type="map"
    head/{kernel (D, E), bias}       the projection into the joint space, when E is set

The blocks are ``mame_jax.models.vit.Encoder``'s: big_vision's text transformer
reuses its ViT encoder, so the numerics (LayerNorm eps 1e-6, tanh GELU, attention
without a causal mask) are the image tower's.

There is no padding mask. big_vision's text transformer attends over every
position, padding included, and ``pool_type="last"`` reads the last position:
with "sticky" EOS tokenisation (``mame_jax.tokenizers``) that is always either
the EOS or a pad id equal to it (SigLIP) or a pad after it (SigLIP 2). This
model does exactly the same, so its embeddings are those of the released
checkpoints.

Text length: big_vision's towers take exactly ``max_len`` tokens, the length they
were trained at (``fixed_length=True``, the default). CLIP's towers
(``mame_jax.models.clip``) take any length from 1 to ``max_len``, as transformers'
``CLIPTextModel`` does: position rows ``0..L-1`` of the table.

Not kept from big_vision: ``vocab_logits`` (the embedding used as an output
layer, a ``(B, L, V)`` product with V up to 256k) -- contrastive use never needs it.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mame_jax.models import vit

# big_vision's text_transformer pool types ("mean" = "gap", "gmp" = "max"), and
# CLIP's two end-of-text rules (transformers' CLIPTextTransformer): "eos", the first
# position holding ``eos_id``; "argmax", the position of the largest id (the rule
# kept for configs whose eos_token_id is the legacy 2, where the end-of-text token
# is the vocabulary's last id).
POOL_TYPES = ("last", "first", "gap", "mean", "max", "gmp", "map", "eos", "argmax")
# Added to the norm before dividing, as big_vision's two towers do.
NORM_EPS = 1e-8


def l2_normalize(z):
  """``z (B, E) -> z / (|z| + 1e-8)`` along the last axis, in float32: the
  normalisation big_vision's two towers apply to both embeddings."""
  z = jnp.asarray(z, jnp.float32)
  return z / (jnp.linalg.norm(z, axis=-1, keepdims=True) + NORM_EPS)


def check_texts(texts, max_len: Optional[int] = None, fixed_length: bool = True) -> None:
  """Raises ``ValueError`` unless ``texts`` are token ids the text tower takes:
  integers of shape ``(B, L)``; with ``max_len`` set, ``L == max_len`` when
  ``fixed_length`` (big_vision's towers) and ``1 <= L <= max_len`` otherwise (CLIP's).
  Looks only at shapes and dtypes (before tracing; never syncs with a device)."""
  shape = tuple(getattr(texts, "shape", np.shape(texts)))
  dtype = getattr(texts, "dtype", None)
  dtype = np.dtype(dtype if dtype is not None else np.asarray(texts).dtype)
  if len(shape) != 2:
    hint = " (one text? add a batch axis: tokens[None])" if len(shape) == 1 else ""
    raise ValueError(f"texts must be token ids of shape (B, L); got shape {shape}{hint}")
  if not np.issubdtype(dtype, np.integer):
    raise ValueError(f"texts must be integer token ids (from mame_jax.tokenizers."
                     f"Tokenizer); got dtype {dtype}")
  if shape[1] < 1:
    raise ValueError(f"texts must hold at least one token; got shape {shape}")
  if max_len is None:
    return
  if fixed_length and shape[1] != max_len:
    raise ValueError(f"texts have {shape[1]} tokens but the text tower takes exactly "
                     f"{max_len} (its pos_embedding has {max_len} rows); tokenize with "
                     f"Tokenizer(..., length={max_len})")
  if shape[1] > max_len:
    raise ValueError(f"texts have {shape[1]} tokens but the text tower takes at most "
                     f"{max_len} (its pos_embedding has {max_len} rows); truncate them to "
                     f"{max_len} tokens, e.g. CLIPTokenizer(..., length={max_len})")


class _TextTransformer(nn.Module):
  """Text tower: ``__call__(texts (B, L) int, *, train=False) -> (z, aux)``.

  ``z`` is ``(B, E)`` (``E = num_classes`` with a head, else ``D``), L2-normalised
  when ``normalize`` (:func:`l2_normalize`). ``aux`` holds ``embedded``,
  ``block{i:02d}``, ``pre_ln``, ``transformed`` (after ``encoder_norm``),
  ``pre_logits`` (the pooled vector), ``logits`` (after ``head``) and ``norm``.

  Attributes as big_vision's text transformer, plus:
    max_len: the size of the position table (``pos_embedding`` rows); when set,
      texts of another length than the tower takes (``fixed_length``) fail with a
      clear error instead of flax's shape error. ``None``: the table is made for
      the texts of the first call.
    fixed_length: with ``max_len``, whether texts must have exactly ``max_len``
      tokens (``True``, big_vision's rule: its towers are trained and released at
      one length) or any length from 1 to ``max_len`` (``False``, transformers'
      ``CLIPTextModel``: a text of ``L`` tokens gets the position rows ``0..L-1``;
      with causal attention and end-of-text pooling, padding after the text
      changes nothing, so ``L`` may be the batch's longest text).
    normalize: L2-normalise the output (the two-tower model normalises itself and
      builds its text tower with ``normalize=False``).
    dtype_mm, dtype, attention: as in ``vit.Model``.
    causal: causal self-attention (CLIP; big_vision's tower has none).
    eos_id: the end-of-text id that ``pool_type="eos"`` looks for.
    ln_eps, activation, gelu_approximate: the blocks' LayerNorm epsilon and MLP
      nonlinearity (``vit.Encoder``'s; CLIP: 1e-5 and "quick_gelu").
  """

  num_classes: Optional[int] = None
  width: int = 512
  depth: int = 12
  mlp_dim: Optional[int] = 2048
  num_heads: int = 8
  dropout: float = 0.0
  vocab_size: int = 32_000
  pool_type: str = "last"
  scan: bool = False
  remat_policy: str = "nothing_saveable"
  max_len: Optional[int] = None
  fixed_length: bool = True
  normalize: bool = True
  dtype_mm: Any = "float32"
  dtype: Any = "float32"
  attention: str = "auto"
  causal: bool = False
  eos_id: Optional[int] = None
  ln_eps: float = vit.LN_EPS
  activation: str = "gelu"
  gelu_approximate: bool = True

  @nn.compact
  def __call__(self, texts, *, train=False):
    if self.pool_type not in POOL_TYPES:
      raise ValueError(f"Unknown text pool type {self.pool_type!r}; one of {POOL_TYPES}")
    if self.pool_type == "eos" and self.eos_id is None:
      raise ValueError("pool_type='eos' needs eos_id, the end-of-text token id")
    check_texts(texts, self.max_len, self.fixed_length)
    out = {}
    embedding = nn.Embed(self.vocab_size, self.width, name="Embed_0",
                         param_dtype=jnp.float32)
    x = out["embedded"] = embedding(jnp.asarray(texts, jnp.int32))
    _, length, d = x.shape
    # The whole table is the parameter; a shorter text takes its first rows.
    pos = self.param("pos_embedding", nn.initializers.normal(stddev=1 / np.sqrt(d)),
                     (1, self.max_len or length, d), jnp.float32)
    x = (x + pos[:, :length]).astype(self.dtype)
    x = nn.Dropout(rate=self.dropout)(x, not train)

    x, _, _, enc = vit.Encoder(
        depth=self.depth, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
        dropout=self.dropout, scan=self.scan, remat_policy=self.remat_policy,
        dtype_mm=self.dtype_mm, dtype=self.dtype, attention=self.attention,
        causal=self.causal, ln_eps=self.ln_eps, activation=self.activation,
        gelu_approximate=self.gelu_approximate,
        name="Encoder_0")(x, deterministic=not train)
    out.update(enc)
    # Pooling and the head in float32, as in the image tower.
    x = out["transformed"] = x.astype(jnp.float32)

    if self.pool_type == "last":  # sticky EOS: the last position is EOS or padding
      x = x[:, -1]
    elif self.pool_type == "first":
      x = x[:, 0]
    elif self.pool_type in ("eos", "argmax"):
      # jnp.argmax takes the first of equal values, as torch's: the first EOS, and
      # with EOS padding the real end of the text.
      ids = jnp.asarray(texts, jnp.int32)
      at = jnp.argmax(ids == self.eos_id if self.pool_type == "eos" else ids, axis=-1)
      x = jnp.take_along_axis(x, at[:, None, None], axis=1)[:, 0]
    elif self.pool_type in ("gap", "mean"):
      x = jnp.mean(x, axis=1)
    elif self.pool_type in ("max", "gmp"):
      x = jnp.max(x, axis=1)
    else:  # "map"
      x = vit.MAPHead(num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                      dtype_mm=self.dtype_mm, attention=self.attention)(x)
    out["pre_logits"] = x
    if self.num_classes:
      x = out["logits"] = nn.Dense(self.num_classes, name="head")(x)
    out["norm"] = jnp.linalg.norm(x, axis=-1, keepdims=True)
    if self.normalize:
      x = l2_normalize(x)
    return x, out


def Model(num_classes=None, *, variant=None, **kw):  # pylint: disable=invalid-name
  """``Model(768, variant="B", vocab_size=32_000, max_len=64)`` -> the text tower.

  ``variant`` (a ViT size name, ``"B"``, ``"L"``, ``"So400m"``, ...; a ``"/p"``
  suffix is ignored) sets width, depth, mlp_dim and num_heads, as in big_vision;
  keyword arguments override it.
  """
  arch = vit.decode_variant(variant.partition("/")[0] if variant else None)
  return _TextTransformer(num_classes, **{**arch, **kw})
