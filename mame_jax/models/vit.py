"""Vision Transformer in Flax linen, laid out like big_vision's ``models/vit.py``.

Module names follow big_vision so that its checkpoints (and, through
``mame_jax.models.checkpoints``, AugReg / SigLIP / timm ones) load with no renaming table:

    embedding/{kernel (p, p, 3, D), bias}
    cls (1, 1, D)                  only with a class token
    pos_embedding (1, h*w, D)      no class slot: added before the class token is prepended
    Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_0,
                                  LayerNorm_1, MlpBlock_0/{Dense_0, Dense_1}}
    Transformer/encoder_norm       absent when fc_norm=True
    MAPHead_0/{probe, MultiHeadDotProductAttention_0, LayerNorm_0, MlpBlock_0}
    fc_norm, pre_logits, head

What differs from big_vision, all for token merging:

* The attention is written here (with flax's parameter names and shapes) so that it
  masks padded keys, adds a per-key logit bias (ToMe's proportional attention adds
  ``log(size)``) and returns the keys averaged over heads, ``(B, L, head_dim)``, which
  ToMe and MaMe-on-keys use as the merge metric.
* Each block has one marked merge hook between attention and MLP (eqs. 14-16:
  ``x = x + MSA(LN(x)); x = MaMe(x); x = x + MLP(LN(x))``). ``token_mask (B, L)`` and
  the token sizes ``size (B, L)`` flow from block to block, and the token count may
  change from one block to the next (unscanned blocks only).
* Pooling respects ``token_mask``.
* Parameters are created float32 (:func:`cast_params` casts them, e.g. to bf16 for
  inference). ``dtype_mm`` sets the dtype in which the matmuls and the patch
  convolution compute, ``dtype`` that of the activations (residual stream, LayerNorm
  outputs, GELU); both default to float32. Attention logits and softmax, LayerNorm
  statistics, the merge arithmetic, pooling and the head are float32 in any case.
* Attention runs through ``jax.nn.dot_product_attention`` (XLA, or cuDNN's fused
  kernel on a GPU in bf16); ``attention="manual"`` keeps the hand-written einsums.

Every model returns ``(output, aux)``; ``aux`` holds named intermediates.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mame_jax.models import packing

LN_EPS = 1e-6
# Logit given to masked keys. Finite rather than -inf so that a row whose keys are all
# masked still has a finite (uniform) softmax instead of NaN; in float32,
# exp(-1e30 - max) is exactly 0 next to any real key.
MASKED_LOGIT = -1e30

# (width, depth, mlp_dim, num_heads), Table 2 of arXiv:2106.04560 as in big_vision.
VARIANTS = {
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
    "So400m": (1152, 27, 4304, 16),
}


def decode_variant(variant: Optional[str]) -> dict:
  """``"B/16"`` -> ``{width: 768, depth: 12, mlp_dim: 3072, num_heads: 12,
  patch_size: (16, 16)}``; without ``"/p"`` the patch size is left out."""
  if variant is None:
    return {}
  name, _, patch = variant.partition("/")
  if name not in VARIANTS:
    raise ValueError(f"Unknown ViT variant {name!r}; known: {sorted(VARIANTS)}")
  width, depth, mlp_dim, num_heads = VARIANTS[name]
  kw = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads)
  if patch:
    kw["patch_size"] = (int(patch), int(patch))
  return kw


def pair(v) -> tuple[int, int]:
  """``16`` or ``(16, 16)`` -> ``(16, 16)``: a side or ``(H, W)`` as two ints."""
  return (int(v), int(v)) if np.ndim(v) == 0 else tuple(int(i) for i in v)


def patch_grid(model, image_hw) -> tuple[int, int]:
  """The grid of patches ``(H / ph, W / pw)`` that ``model`` makes of an image
  ``image_hw = S`` or ``(H, W)``."""
  (h, w), (ph, pw) = pair(image_hw), pair(model.patch_size)
  return h // ph, w // pw


def image_size_of(model, params, default: int = 224) -> int:
  """The side of the square images ``params`` were made for: the learned
  position-embedding grid (square) times the patch size; ``default`` when the
  model has sin-cos embeddings (any size works)."""
  pe = params.get("pos_embedding") if hasattr(params, "get") else None
  if pe is None:
    return default
  return math.isqrt(pe.shape[1]) * pair(model.patch_size)[0]


def posemb_sincos_2d(h, w, width, temperature=10_000.0, dtype=jnp.float32):
  """Fixed 2-D sin-cos position embedding (MoCo v3, big_vision), ``(1, h*w, width)``.

  Channels are ``[sin(x f), cos(x f), sin(y f), cos(y f)]`` for ``width // 4``
  frequencies ``f`` going geometrically from 1 down to ``1 / temperature``; tokens in
  row-major ``(y, x)`` order like the patch sequence.
  """
  if width % 4:
    raise ValueError(f"sincos2d posemb needs a width divisible by 4, got {width}")
  # NumPy: the table depends only on static shapes, so it enters the trace as a constant.
  quarter = width // 4
  freqs = 1.0 / temperature ** (np.arange(quarter) / max(quarter - 1, 1))
  ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  ax = xs.reshape(-1, 1) * freqs[None]
  ay = ys.reshape(-1, 1) * freqs[None]
  pe = np.concatenate([np.sin(ax), np.cos(ax), np.sin(ay), np.cos(ay)], axis=1)
  return jnp.asarray(pe[None], dtype)


# How a learned grid of position embeddings is resampled to another grid
# (resample_posemb):
#   "bilinear":  jax.image.resize bilinear, no antialiasing (big_vision / timm
#                DeiT checkpoints here).
#   "bicubic":   torch's F.interpolate(mode="bicubic", align_corners=False,
#                antialias=False) with an explicit size, which is also ONNX
#                Resize(cubic, half_pixel, cubic_coeff_a=-0.75): DINOv2's rule in
#                transformers' Dinov2Model.
#   "bicubic_aa": the antialiased bicubic of transformers' Dinov2WithRegisters and
#                timm's resample_abs_pos_embed (Keys a=-0.5, the kernel widened by
#                the shrink factor, weights renormalised at the borders):
#                jax.image.resize(method="bicubic", antialias=True).
POSEMB_RESAMPLING = ("bilinear", "bicubic", "bicubic_aa")


def cubic_resize_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
  """The ``(n_out, n_in)`` float64 matrix of a 1-D bicubic resize without
  antialiasing: output ``i`` samples the input at ``(i + 0.5) * n_in / n_out - 0.5``
  (half-pixel centres) with Keys' cubic kernel of parameter ``a`` over the four
  nearest inputs, indices clamped to the edge. ``a = -0.75`` is torch's and ONNX's
  default. Equal sizes give the identity."""
  scale = n_in / n_out
  src = (np.arange(n_out) + 0.5) * scale - 0.5
  base = np.floor(src)
  t = src - base

  def kernel(d):  # Keys (1981), |d| <= 2
    d = np.abs(d)
    return np.where(d <= 1, ((a + 2) * d - (a + 3)) * d * d + 1,
                    np.where(d < 2, ((a * d - 5 * a) * d + 8 * a) * d - 4 * a, 0.0))

  m = np.zeros((n_out, n_in))
  for tap in (-1, 0, 1, 2):
    idx = np.clip(base + tap, 0, n_in - 1).astype(int)
    np.add.at(m, (np.arange(n_out), idx), kernel(t - tap))
  return m


def resample_posemb(posemb, new_hw, method: str = "bilinear"):
  """Resizes a square grid of learned position embeddings to another grid.

  ``posemb (1, h*w, D) -> (1, H*W, D)`` for ``new_hw = H`` or ``(H, W)``; the input
  itself is returned when the grid already has that size. ``method`` is one of
  :data:`POSEMB_RESAMPLING`.

  "bilinear" is ``jax.image.resize(..., method="bilinear", antialias=False)``:
  half-pixel sample centres (as ``tf.image.resize`` and timm's ``F.interpolate(...,
  align_corners=False)``) and no antialiasing, so that shrinking stays a plain
  interpolation of the learned grid instead of a blur. big_vision uses
  ``scipy.ndimage.zoom(order=1)``, which pins the corner samples instead; the two
  differ slightly at other sizes and agree at the same size. "bicubic" applies
  :func:`cubic_resize_matrix` along each axis (in float64, then cast back);
  "bicubic_aa" is ``jax.image.resize(method="bicubic", antialias=True)``.
  """
  _check_choice(method, POSEMB_RESAMPLING, "posemb resampling")
  _, n, d = posemb.shape
  new_h, new_w = pair(new_hw)
  side = math.isqrt(n)
  if side * side != n:
    raise ValueError(f"resample_posemb needs a square grid, got {n} embeddings")
  if (side, side) == (new_h, new_w):
    return posemb
  if method == "bicubic":
    grid = np.asarray(posemb, np.float64).reshape(side, side, d)
    grid = np.einsum("Hh,hwd,Ww->HWd", cubic_resize_matrix(side, new_h), grid,
                     cubic_resize_matrix(side, new_w))
    return jnp.asarray(grid.reshape(1, new_h * new_w, d), posemb.dtype)
  grid = jnp.asarray(posemb, jnp.float32).reshape(side, side, d)
  grid = jax.image.resize(grid, (new_h, new_w, d), antialias=method == "bicubic_aa",
                          method="bilinear" if method == "bilinear" else "bicubic")
  return grid.reshape(1, new_h * new_w, d).astype(posemb.dtype)


def cast_params(params, dtype):
  """``params`` with every floating-point leaf cast to ``dtype`` (integer leaves,
  if any, kept): e.g. ``cast_params(params, "bfloat16")`` after loading, for bf16
  inference with ``Model(..., dtype="bfloat16", dtype_mm="bfloat16")``. Halves the
  parameters' memory and saves the per-call casts of float32 weights."""
  dtype = jnp.dtype(dtype)

  def cast(a):
    return a.astype(dtype) if jnp.issubdtype(jnp.result_type(a), jnp.floating) else a
  return jax.tree.map(cast, params)


def merge_hook(merge, layer, num_special, x, token_mask, size, keys, cls_attn=None):
  """The one place where a block hands its tokens to the merge.

  ``x (B, L, D)``, ``token_mask (B, L) bool``, ``size (B, L) float32`` (``None``
  when nothing merges), ``keys (B, L, head_dim)``, ``cls_attn (B, L)`` (the class
  token's attention row averaged over heads, only for a merge whose
  ``needs_cls_attention(layer)`` is true) ->
  ``(x (B, L', D), token_mask (B, L'), size (B, L') | None, aux: dict)``.

  ``merge=None`` is the identity; otherwise ``merge`` is a config from
  ``mame_jax.models.merging`` (``MergeConfig``, ``ToMeConfig``, ``EViTConfig``,
  ``DiffRateConfig``), or any callable
  ``merge(x, token_mask, size, keys, layer=..., num_special=...)``.
  """
  if merge is None:
    return x, token_mask, size, {}
  if cls_attn is not None:
    return merge(x, token_mask, size, keys, layer=layer, num_special=num_special,
                 cls_attn=cls_attn)
  return merge(x, token_mask, size, keys, layer=layer, num_special=num_special)


def brackets_attention(merge, layer) -> bool:
  """Whether ``merge`` wraps block ``layer``'s attention (merge before it, restore
  after it: eq. 17) instead of merging between attention and MLP; then the block
  calls ``merge.bracket(attend, tokens, token_mask, layer=..., num_special=...)``."""
  wants = getattr(merge, "brackets", None)
  return bool(wants(layer)) if wants is not None else False


def restore_hook(merge, x, token_mask, size, aux, *, normed: bool):
  """After the last block, before (``normed=False``) and after the final norm:
  a merge that restores the token grid for a dense head does it here
  (``merge.restore_end``); otherwise the identity."""
  restore_end = getattr(merge, "restore_end", None)
  if restore_end is None:
    return x, token_mask, size
  return restore_end(x, token_mask, size, aux, normed=normed)


def needs_cls_attention(merge, layer) -> bool:
  """Whether ``merge`` wants the class token's attention row in block ``layer``
  (EViT and DiffRate rank tokens by it)."""
  wants = getattr(merge, "needs_cls_attention", None)
  return bool(wants(layer)) if wants is not None else False


def class_attention(q0, k, token_mask=None, bias=None):
  """The class token's attention row, averaged over heads: ``q0 (B, H, hd)`` (the
  class token's query), ``k (B, L, H, hd)``, ``token_mask (B, L)``, ``bias (B, L)``
  -> ``(B, L)`` float32. One query against every key, computed on its own so
  that the block's attention keeps its fused kernel."""
  scale = 1.0 / math.sqrt(q0.shape[-1])
  logits = jnp.einsum("bhd,blhd->bhl", q0.astype(jnp.float32), k.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST) * scale
  if bias is not None:
    logits = logits + bias[:, None, :].astype(jnp.float32)
  if token_mask is not None:
    logits = jnp.where(token_mask[:, None, :], logits, MASKED_LOGIT)
  return jax.nn.softmax(logits, axis=-1).mean(axis=1)


class MlpBlock(nn.Module):
  """Transformer MLP ``Dense(mlp_dim) -> GELU -> Dense(D)``: ``(B, L, D) -> (B, L, D)``."""

  mlp_dim: Optional[int] = None  # defaults to 4 * D
  dropout: float = 0.0
  dtype_mm: Any = "float32"
  gelu_approximate: bool = True  # big_vision: tanh GELU; timm: exact erf GELU
  dtype: Any = "float32"  # of the GELU (the activations)
  activation: str = "gelu"  # ACTIVATIONS; OpenAI CLIP: "quick_gelu"

  @nn.compact
  def __call__(self, x, deterministic=True):
    _check_choice(self.activation, ACTIVATIONS, "activation")
    dense = functools.partial(
        nn.Dense, dtype=self.dtype_mm, param_dtype=jnp.float32,
        kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.normal(stddev=1e-6))
    d = x.shape[-1]
    y = dense(self.mlp_dim or 4 * d)(x)
    y = y.astype(self.dtype)
    if self.activation == "quick_gelu":  # x * sigmoid(1.702 x), what OpenAI CLIP trained with
      y = y * jax.nn.sigmoid(1.702 * y)
    else:
      y = nn.gelu(y, approximate=self.gelu_approximate)
    y = nn.Dropout(rate=self.dropout)(y, deterministic)
    return dense(d)(y)


# How attention is computed; every choice gives the same values to float32 rounding.
#   "auto":   jax.nn.dot_product_attention; cuDNN's fused kernel on a GPU when the
#             inputs are bf16/fp16 and the head dim suits it (else, or when cuDNN
#             refuses the call, XLA). On the CPU this is implementation=None (XLA).
#   "xla":    jax.nn.dot_product_attention(implementation="xla").
#   "cudnn":  jax.nn.dot_product_attention(implementation="cudnn"); raises where
#             cuDNN cannot run (no GPU, float32, head dim not a multiple of 8).
#   "manual": the hand-written einsum + softmax, kept for comparison only.
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "manual")
# How ToMe's per-key bias reaches the kernel:
#   "add":  as dot_product_attention's ``bias`` (B, 1, 1, L) -- broadcast to
#           (B, 1, Q, L) for cuDNN, which wants the full query length.
#   "fold": as one extra head dimension (:func:`fold_key_bias`), so that a kernel
#           without bias support (or with a slow one) computes it.
ATTENTION_BIAS = ("add", "fold")
# How padding reaches the kernel: "mask" a boolean (B, 1, 1, L) mask (any layout);
# "lengths" the count of real keys as ``key_value_seq_lengths`` (correct only when
# the real tokens come first, which MaMe and ToMe guarantee); "auto": "lengths"
# with a MergeConfig / ToMeConfig merge, else "mask".
ATTENTION_MASK = ("auto", "mask", "lengths")
# How the encoded tokens become one vector: the class token, the mean of the
# other tokens, a MAP head, the class token beside that mean (DINOv2's
# classifier input), or every token.
POOL_TYPES = ("tok", "gap", "map", "tok_gap", "none")
# The MLP's nonlinearity: "gelu" (tanh or erf, by gelu_approximate) or "quick_gelu"
# (x * sigmoid(1.702 x), OpenAI CLIP's).
ACTIVATIONS = ("gelu", "quick_gelu")
# cuDNN's flash attention needs a head dim that is a multiple of 8.
CUDNN_HEAD_MULTIPLE = 8


def _check_choice(value, allowed, name):
  if value not in allowed:
    raise ValueError(f"{name} must be one of {allowed}; got {value!r}")


def _cudnn_eligible(dtype, head_dim) -> bool:
  """Whether "auto" should try cuDNN: a GPU, half-precision inputs (cuDNN's fused
  attention has no float32 kernel) and a head dim it accepts (<= 128 on every
  architecture it supports)."""
  return (jax.default_backend() == "gpu"
          and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
          and head_dim % CUDNN_HEAD_MULTIPLE == 0 and head_dim <= 128)


def fold_key_bias(q, k, v, bias, scale, multiple=1):
  """Folds a per-key logit bias into the head dimension.

  ``q (B, Q, H, hd)``, ``k, v (B, L, H, hd)``, ``bias (B, L)``, ``scale`` the logit
  scale the kernel will apply -> ``q', k', v'`` with head dim ``hd'``, the smallest
  multiple of ``multiple`` above ``hd``, such that
  ``scale * q' . k' = scale * q . k + bias`` and ``softmax(...) v'`` is the wanted
  output padded with zeros (slice ``[..., :hd]``).

  The first extra column holds 1 on every query and ``bias / scale`` on every key;
  the rest, and all of ``v``'s extra columns, are 0. The query column is exactly 1
  in any dtype, so in bf16 the only extra rounding is that of ``bias / scale``, the
  same relative error as rounding ``bias`` itself. cuDNN needs ``multiple=8``: a
  64-wide head then computes 72 columns (12.5% more attention arithmetic).
  """
  b, nq, h, hd = q.shape
  nk = k.shape[1]
  extra = -(-(hd + 1) // multiple) * multiple - hd
  ones = jnp.ones((b, nq, h, 1), q.dtype)
  key_col = jnp.broadcast_to((bias / scale).astype(k.dtype)[:, :, None, None], (b, nk, h, 1))
  q = jnp.concatenate([q, ones, jnp.zeros((b, nq, h, extra - 1), q.dtype)], axis=-1)
  k = jnp.concatenate([k, key_col, jnp.zeros((b, nk, h, extra - 1), k.dtype)], axis=-1)
  v = jnp.concatenate([v, jnp.zeros((b, nk, h, extra), v.dtype)], axis=-1)
  return q, k, v


def manual_attention(q, k, v, token_mask=None, bias=None, causal=False):
  """The hand-written attention: ``q (B, Q, H, hd)``, ``k, v (B, L, H, hd)``,
  ``token_mask (B, L) bool``, ``bias (B, L)`` -> ``(B, Q, H, hd)``. Float32 logits
  and softmax; masked keys get ``MASKED_LOGIT``; ``causal``: query ``i`` sees keys
  ``<= i`` only (CLIP's text tower)."""
  q = q / jnp.sqrt(q.shape[-1]).astype(q.dtype)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
  if bias is not None:
    logits = logits + bias[:, None, None, :].astype(jnp.float32)
  if token_mask is not None:
    logits = jnp.where(token_mask[:, None, None, :], logits, MASKED_LOGIT)
  if causal:
    nq, nk = q.shape[1], k.shape[1]
    logits = jnp.where(jnp.tril(jnp.ones((nq, nk), bool)), logits, MASKED_LOGIT)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def fused_attention(q, k, v, token_mask=None, bias=None, *, implementation="auto",
                    bias_mode="add", mask_is_prefix=False, causal=False):
  """Attention through ``jax.nn.dot_product_attention``; same arguments and result
  as :func:`manual_attention`, plus:

    implementation: "auto", "xla" or "cudnn" (see ``ATTENTION_IMPLS``).
    bias_mode: "add" or "fold" (see ``ATTENTION_BIAS``).
    mask_is_prefix: ``token_mask`` holds the real tokens first; it is then passed as
      ``key_value_seq_lengths`` (no (B, 1, Q, L) mask tensor for cuDNN).
    causal: query ``i`` attends to keys ``<= i`` (``is_causal``).

  The logits are ``q k^T / sqrt(hd)`` in float32 (XLA: ``preferred_element_type``
  float32, softmax in float32), as in the manual path.
  """
  hd = q.shape[-1]
  if implementation == "auto":
    if _cudnn_eligible(q.dtype, hd + (CUDNN_HEAD_MULTIPLE if bias_mode == "fold" else 0)):
      try:
        return fused_attention(q, k, v, token_mask, bias, implementation="cudnn",
                               bias_mode=bias_mode, mask_is_prefix=mask_is_prefix,
                               causal=causal)
      except (NotImplementedError, RuntimeError, ValueError):
        pass  # cuDNN refused this shape or is missing: XLA computes the same thing.
    impl = None
  else:
    impl = implementation
  scale = 1.0 / math.sqrt(hd)
  mask = lengths = None
  if token_mask is not None:
    if mask_is_prefix:
      lengths = jnp.sum(token_mask, axis=-1, dtype=jnp.int32)
    else:
      mask = token_mask[:, None, None, :]
  bias4 = None
  if bias is not None and bias_mode == "fold":
    multiple = CUDNN_HEAD_MULTIPLE if impl == "cudnn" else 1
    q, k, v = fold_key_bias(q, k, v, bias.astype(jnp.float32), scale, multiple)
  elif bias is not None:
    bias4 = bias[:, None, None, :]
    if impl == "cudnn":  # cuDNN takes a bias only at the full (Q, L) size, in q's dtype.
      bias4 = jnp.broadcast_to(bias4, (q.shape[0], 1, q.shape[1], k.shape[1])).astype(q.dtype)
    else:
      bias4 = bias4.astype(jnp.float32)
  y = jax.nn.dot_product_attention(q, k, v, bias=bias4, mask=mask, scale=scale,
                                   key_value_seq_lengths=lengths, implementation=impl,
                                   is_causal=causal)
  return y[..., :hd]


class MultiHeadDotProductAttention(nn.Module):
  """Multi-head attention with flax's parameters ``query|key|value|out``.

  ``inputs_q (B, Q, D)``, ``inputs_kv (B, L, D)``; ``token_mask (B, L) bool`` marks the
  real keys; ``bias (B, L)`` is added to every query's logit for that key. Returns
  ``(out (B, Q, D), keys (B, L, head_dim))``, the keys averaged over heads.

  Logits are ``q k^T / sqrt(head_dim)`` and the softmax runs in float32 whatever
  ``dtype_mm`` is. ``implementation``, ``bias_mode`` and ``mask_is_prefix`` choose
  the kernel (``ATTENTION_IMPLS``, ``ATTENTION_BIAS``, :func:`fused_attention`);
  they change no parameter and, beyond rounding, no value.

  ``pack=(idx, (B, L))`` (packed execution, :mod:`mame_jax.models.packing`): the
  inputs are the flat real tokens ``(T, D)`` at ``idx``; the projections run on
  them, attention on the padded ``(B, L)`` layout, and ``out`` is ``(T, D)``
  again (``keys`` stays ``(B, L, head_dim)``).
  """

  num_heads: int
  dtype_mm: Any = "float32"
  implementation: str = "auto"
  bias_mode: str = "add"
  mask_is_prefix: bool = False
  # False: the key projection has no bias (VideoMAE and BEiT learn only q and v
  # biases); a key bias only shifts each query's logits by a constant, so it is
  # left out rather than held at zero.
  use_key_bias: bool = True
  causal: bool = False  # query i sees keys <= i (CLIP's text tower)
  # Also return the class token's attention row (B, L): see class_attention.
  cls_row: bool = False

  @nn.compact
  def __call__(self, inputs_q, inputs_kv, token_mask=None, bias=None, pack=None):
    _check_choice(self.implementation, ATTENTION_IMPLS, "attention")
    _check_choice(self.bias_mode, ATTENTION_BIAS, "attention_bias")
    d = inputs_kv.shape[-1]
    if d % self.num_heads:
      raise ValueError(f"width {d} is not divisible by num_heads={self.num_heads}")
    head_dim = d // self.num_heads
    dense = functools.partial(
        nn.DenseGeneral, dtype=self.dtype_mm, param_dtype=jnp.float32,
        kernel_init=nn.initializers.xavier_uniform())
    heads = (self.num_heads, head_dim)
    q = dense(heads, axis=-1, name="query")(inputs_q)  # (B, Q, H, hd)
    k = dense(heads, axis=-1, name="key", use_bias=self.use_key_bias)(inputs_kv)  # (B, L, H, hd)
    v = dense(heads, axis=-1, name="value")(inputs_kv)  # (B, L, H, hd)
    # flat real tokens -> the padded layout attention runs on (pack=None: as they are)
    q, k, v = (packing.unpack(t, pack) for t in (q, k, v))
    if self.implementation == "manual":
      y = manual_attention(q, k, v, token_mask, bias, causal=self.causal)
    else:
      y = fused_attention(q, k, v, token_mask, bias, implementation=self.implementation,
                          bias_mode=self.bias_mode, mask_is_prefix=self.mask_is_prefix,
                          causal=self.causal)
    if pack is not None:
      y = packing.gather(y, pack[0])
    out = dense(inputs_q.shape[-1], axis=(-2, -1), name="out")(y)
    if self.cls_row:
      return out, jnp.mean(k, axis=-2), class_attention(q[:, 0], k, token_mask, bias)
    return out, jnp.mean(k, axis=-2)


class LayerScale(nn.Module):
  """A learned gain per channel, ``x * scale`` (CaiT's LayerScale, in every DINOv2
  block on the attention and the MLP branch). ``scale (D,)`` starts at ones, as
  transformers' ``layerscale_value`` default does."""

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    return x * scale.astype(x.dtype)


class Encoder1DBlock(nn.Module):
  """Pre-norm block: ``x + MSA(LN(x))``, then the merge hook, then ``x + MLP(LN(x))``.

  ``__call__(x (B, L, D), token_mask=None, size=None) ->
  (x (B, L', D), token_mask, size, aux)``; ``L' = L`` unless the merge changes it.
  With ``prop_attn`` and a ``size``, attention adds ``log(size)`` to its logits
  (ToMe's proportional attention). With ``layer_scale`` each branch's output is
  multiplied by a learned per-channel gain before its residual add
  (``LayerScale_0`` after attention, ``LayerScale_1`` after the MLP: DINOv2).

  ``pack=(T_in, T_out)``: packed execution (:mod:`mame_jax.models.packing`) --
  the LayerNorms, projections, MLP and residual adds run on the real tokens
  gathered into a flat buffer of ``T_in`` slots before the merge hook and
  ``T_out`` after it (``None``: that part runs padded); the block's input and
  output stay ``(B, L, D)``, zero at padded positions.
  """

  mlp_dim: Optional[int] = None
  num_heads: int = 12
  dropout: float = 0.0
  dtype_mm: Any = "float32"
  gelu_approximate: bool = True
  prop_attn: bool = False
  merge: Any = None
  layer: int = 0  # this block's index, handed to the merge hook
  num_special: int = 0  # leading tokens the merge leaves alone (the class token)
  dtype: Any = "float32"  # residual stream, LayerNorm outputs, GELU
  attention: str = "auto"  # ATTENTION_IMPLS
  attention_bias: str = "add"  # ATTENTION_BIAS
  mask_is_prefix: bool = False  # token masks hold the real tokens first
  ln_eps: float = LN_EPS  # transformers' VideoMAE: 1e-12
  use_key_bias: bool = True
  activation: str = "gelu"  # ACTIVATIONS
  causal: bool = False  # causal self-attention (CLIP's text tower; never merges)
  layer_scale: bool = False  # DINOv2's LayerScale on both branches

  @nn.compact
  def __call__(self, x, token_mask=None, size=None, deterministic=True, pack=(None, None)):
    out = {}
    prop_attn = self.prop_attn or getattr(self.merge, "prop_attn", False)
    bias = jnp.log(size) if (prop_attn and size is not None) else None
    pack_in, pack_out = pack
    x, where = packing.pack(x, token_mask, pack_in)
    # LayerNorm statistics are float32 in any dtype (flax); its output is self.dtype.
    y = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype)(x)
    cls_row = needs_cls_attention(self.merge, self.layer)
    attention = MultiHeadDotProductAttention(
        self.num_heads, self.dtype_mm, implementation=self.attention,
        bias_mode=self.attention_bias, mask_is_prefix=self.mask_is_prefix,
        use_key_bias=self.use_key_bias, causal=self.causal, cls_row=cls_row)
    bracketed = None
    if brackets_attention(self.merge, self.layer):
      # ---------- eq. (17): restore(MSA(merge(LN(x)))), the length kept ----------
      def attend(tokens, mask):
        return attention(tokens, tokens, token_mask=mask)[0]
      y, bracketed = self.merge.bracket(attend, y, token_mask, layer=self.layer,
                                        num_special=self.num_special)
      keys, cls_attn = None, []
    else:
      y, keys, *cls_attn = attention(y, y, token_mask=token_mask, bias=bias, pack=where)
    if self.layer_scale:
      y = LayerScale()(y)
    y = nn.Dropout(rate=self.dropout)(y, deterministic)
    x = (x + y).astype(jnp.promote_types(x.dtype, self.dtype))
    # back to (B, L, D) for the merge and the next block
    x, y = packing.unpack(x, where), packing.unpack(y, where)
    out["sa"], out["+sa"] = y, x

    # ------------------- MERGE HOOK (eq. 15: x = MaMe(x)) -------------------
    x, token_mask, size, out["merge"] = merge_hook(
        self.merge, self.layer, self.num_special, x, token_mask, size, keys,
        cls_attn[0] if cls_attn else None)
    out["merge"] = bracketed or out["merge"]
    # ------------------------------------------------------------------------

    x, where = packing.pack(x, token_mask, pack_out)
    y = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype)(x)
    y = MlpBlock(
        mlp_dim=self.mlp_dim, dropout=self.dropout, dtype_mm=self.dtype_mm,
        gelu_approximate=self.gelu_approximate, dtype=self.dtype,
        activation=self.activation)(y, deterministic)
    if self.layer_scale:
      y = LayerScale()(y)
    y = nn.Dropout(rate=self.dropout)(y, deterministic)
    x = (x + y).astype(jnp.promote_types(x.dtype, self.dtype))
    x, y = packing.unpack(x, where), packing.unpack(y, where)
    out["mlp"], out["+mlp"] = y, x
    return x, token_mask, size, out


def _real_tokens(x, token_mask):
  """Number of real tokens per sample, int32 ``(B,)``."""
  if token_mask is None:
    return jnp.full((x.shape[0],), x.shape[1], jnp.int32)
  return jnp.sum(token_mask, axis=-1, dtype=jnp.int32)


class Encoder(nn.Module):
  """The blocks, then ``encoder_norm``.

  ``__call__(x (B, L, D), token_mask=None, size=None) -> (x, token_mask, size, aux)``
  with ``aux["block{i:02d}"]`` per block and ``aux["tokens_per_block"]`` int32
  ``(B, depth)``, the real tokens left after each block.

  ``scan=True`` runs one ``nn.scan``-ed, rematerialised (``remat_policy``) block whose
  params ``encoderblock/...`` carry a leading layer axis. Scanning needs the same
  token count in every block, so it refuses a ``merge``.
  """

  depth: int
  mlp_dim: Optional[int] = None
  num_heads: int = 12
  dropout: float = 0.0
  scan: bool = False
  remat_policy: str = "nothing_saveable"
  dtype_mm: Any = "float32"
  gelu_approximate: bool = True
  prop_attn: bool = False
  merge: Any = None
  final_norm: bool = True
  num_special: int = 0
  dtype: Any = "float32"
  attention: str = "auto"
  attention_bias: str = "add"
  mask_is_prefix: bool = False
  ln_eps: float = LN_EPS  # of every block's LayerNorms and encoder_norm
  use_key_bias: bool = True
  activation: str = "gelu"
  causal: bool = False
  layer_scale: bool = False

  @nn.compact
  def __call__(self, x, token_mask=None, size=None, deterministic=True):
    out = {}
    block_kw = dict(
        mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout=self.dropout,
        dtype_mm=self.dtype_mm, gelu_approximate=self.gelu_approximate,
        prop_attn=self.prop_attn, dtype=self.dtype, attention=self.attention,
        attention_bias=self.attention_bias, mask_is_prefix=self.mask_is_prefix,
        ln_eps=self.ln_eps, use_key_bias=self.use_key_bias, activation=self.activation,
        causal=self.causal, layer_scale=self.layer_scale)
    check_depth = getattr(self.merge, "check_depth", None)
    if check_depth is not None:  # EViT / DiffRate: layers or a schedule per block
      check_depth(self.depth)
    if self.scan:
      if self.merge is not None:
        raise ValueError(
            "scan=True cannot merge: a scanned block needs the same token count "
            "in every layer. Use scan=False (load_model unstacks scanned weights).")

      def body(block, carry, mask, sz):
        carry, _, _, aux = block(carry, mask, sz, deterministic)
        return carry, aux

      policy = getattr(jax.checkpoint_policies, self.remat_policy, None)
      body = nn.remat(body, prevent_cse=False, policy=policy)
      scanned = nn.scan(
          body, variable_axes={"params": 0},
          split_rngs={"params": True, "dropout": True},
          in_axes=(nn.broadcast, nn.broadcast), length=self.depth)
      x, per_layer = scanned(
          Encoder1DBlock(name="encoderblock", **block_kw), x, token_mask, size)
      for i in range(self.depth):
        out[f"block{i:02d}"] = jax.tree.map(lambda a, i=i: a[i], per_layer)
      counts = [_real_tokens(x, token_mask)] * self.depth
    else:
      counts = []
      stage = None  # the packed buffer's size since the last merge (None: padded)
      packed_size = getattr(self.merge, "packed_size", None)
      for i in range(self.depth):
        block = Encoder1DBlock(
            name=f"encoderblock_{i}", merge=self.merge, layer=i,
            num_special=self.num_special, **block_kw)
        pack_in = stage
        if packed_size is not None:
          stage = packed_size(i, x.shape[0], x.shape[1], self.num_special, stage)
        x, token_mask, size, out[f"block{i:02d}"] = block(
            x, token_mask, size, deterministic, pack=(pack_in, stage))
        counts.append(_real_tokens(x, token_mask))
    out["pre_ln"] = x
    out["tokens_per_block"] = jnp.stack(counts, axis=1)
    x, token_mask, size = restore_hook(self.merge, x, token_mask, size, out, normed=False)
    if self.final_norm:
      x = nn.LayerNorm(epsilon=self.ln_eps, name="encoder_norm", dtype=self.dtype)(x)
    x, token_mask, size = restore_hook(self.merge, x, token_mask, size, out, normed=True)
    return x, token_mask, size, out


class MAPHead(nn.Module):
  """Multihead attention pooling: a learned probe attends to the real tokens.

  ``x (B, L, D), token_mask (B, L) | None -> (B, D)``.
  """

  mlp_dim: Optional[int] = None
  num_heads: int = 12
  dtype_mm: Any = "float32"
  gelu_approximate: bool = True
  attention: str = "auto"
  mask_is_prefix: bool = False

  @nn.compact
  def __call__(self, x, token_mask=None):
    n, _, d = x.shape
    probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, d), jnp.float32)
    probe = jnp.broadcast_to(probe, (n, 1, d))
    y, _ = MultiHeadDotProductAttention(
        self.num_heads, self.dtype_mm, implementation=self.attention,
        mask_is_prefix=self.mask_is_prefix)(probe, x, token_mask=token_mask)
    z = nn.LayerNorm(epsilon=LN_EPS)(y)
    y = y + MlpBlock(mlp_dim=self.mlp_dim, dtype_mm=self.dtype_mm,
                     gelu_approximate=self.gelu_approximate)(z)
    return y[:, 0]


def masked_mean(x, token_mask=None, size=None):
  """Mean over the real tokens: ``x (B, L, D), token_mask (B, L) | None -> (B, D)``.

  Every real token counts once whatever its ToMe ``size``, unless ``size (B, L)``
  is given: then each weighs its size, which is the mean over the original patches
  (ToMe's MAE global pool).
  """
  if token_mask is None and size is None:
    return jnp.mean(x, axis=1)
  w = jnp.ones(x.shape[:2], x.dtype) if token_mask is None else token_mask.astype(x.dtype)
  if size is not None:
    w = w * size.astype(x.dtype)
  w = w[..., None]
  return jnp.sum(x * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1)


class _Model(nn.Module):
  """ViT: ``__call__(image (B, H, W, 3) in [-1, 1], *, train=False) -> (output, aux)``.

  ``output`` is the logits ``(B, num_classes)`` when ``num_classes`` is set, else the
  pooled representation (after ``pre_logits`` when ``rep_size``); ``pool_type="none"``
  keeps the token axis. ``aux`` holds ``stem``, ``with_posemb``, ``block{i:02d}``
  (``sa``, ``+sa``, ``merge``, ``mlp``, ``+mlp``), ``pre_ln``, ``encoded``,
  ``head_input``, ``pre_logits``, ``logits``, ``tokens_per_block`` int32
  ``(B, depth)``, and with a merge the final ``token_mask`` and ``size``.

  Attributes beyond big_vision's:
    class_token: prepend the ``cls`` token; ``None`` means ``pool_type == "tok"``.
      timm MAE fine-tuned models have ``class_token=True`` with ``pool_type="gap"``,
      where ``gap`` averages the other tokens.
    fc_norm: no ``encoder_norm`` before pooling; a LayerNorm ``fc_norm`` after it.
    gelu_approximate: tanh GELU (big_vision) or exact erf GELU (timm: ``False``).
    input_norm: ``(mean, std)``, per-channel tuples. Images always arrive in [-1, 1];
      with ``input_norm`` they are mapped to ``((x + 1) / 2 - mean) / std`` before the
      patch embedding, which is the normalisation timm DeiT / MAE weights expect.
    prop_attn: add ``log(size)`` to the attention logits (ToMe) once tokens merge.
    merge: opaque, hashable merge configuration handed to every block's merge hook.
      With a merge, ``token_mask`` starts all True and ``size`` all ones; without one
      both stay ``None`` and the model costs what big_vision's does.
    dtype: of the activations from the patch embedding to ``encoder_norm``: the
      residual stream, LayerNorm outputs (their statistics are float32 anyway) and
      GELU. ``dtype="bfloat16", dtype_mm="bfloat16"`` is bf16 inference end to end;
      the merge arithmetic stays float32 (``mame`` and ``tome`` upcast), ToMe's
      sizes stay float32, and pooling and the head run in float32 (cheap: one
      vector per image), so the output is float32.
    attention: "auto" (default), "xla", "cudnn" or "manual" (``ATTENTION_IMPLS``).
    attention_bias: "add" or "fold": how ToMe's ``log(size)`` reaches the kernel.
    attention_mask: "auto", "mask" or "lengths": how padding reaches the kernel
      (``ATTENTION_MASK``).
    activation: the MLP's nonlinearity, "gelu" or "quick_gelu" (``ACTIVATIONS``).
    pre_norm: a LayerNorm ``pre_norm`` on the tokens (class token included) before
      the first block, as CLIP's image tower has (transformers' ``pre_layrnorm``).
    ln_eps: epsilon of the blocks' LayerNorms, ``pre_norm`` and ``encoder_norm``
      (CLIP: 1e-5).
    layer_scale: DINOv2's LayerScale, a learned per-channel gain on the attention
      and the MLP branch of every block (``LayerScale_0/scale``,
      ``LayerScale_1/scale``).
    num_registers: DINOv2-reg's register tokens, ``registers (1, R, D)``,
      inserted after the class token and before the patches, with no position
      embedding. They are special tokens: ``num_special`` counts them, so no merge
      (MaMe, ToMe, EViT, DiffRate) ever moves, drops or merges them; ``gap``
      pooling skips them.

  ``pool_type="tok_gap"`` is transformers' ``Dinov2ForImageClassification`` head
  input: the class token concatenated with the mean of the patch tokens (the real
  ones, registers excluded), ``(B, 2D)``.
  """

  num_classes: Optional[int] = None
  patch_size: Union[int, Sequence[int]] = (16, 16)
  width: int = 768
  depth: int = 12
  mlp_dim: Optional[int] = None  # defaults to 4 * width
  num_heads: int = 12
  posemb: str = "learn"  # or "sincos2d"
  rep_size: Union[int, bool] = False
  dropout: float = 0.0
  pool_type: str = "gap"  # POOL_TYPES
  class_token: Optional[bool] = None
  fc_norm: bool = False
  head_zeroinit: bool = True
  scan: bool = False
  remat_policy: str = "nothing_saveable"
  dtype_mm: Any = "float32"
  gelu_approximate: bool = True
  input_norm: Optional[tuple] = None
  prop_attn: bool = False
  merge: Any = None
  dtype: Any = "float32"
  attention: str = "auto"
  attention_bias: str = "add"
  attention_mask: str = "auto"
  activation: str = "gelu"
  pre_norm: bool = False
  ln_eps: float = LN_EPS
  layer_scale: bool = False
  num_registers: int = 0

  @property
  def has_class_token(self) -> bool:
    if self.class_token is None:
      return self.pool_type in ("tok", "tok_gap")
    return bool(self.class_token)

  @property
  def num_special(self) -> int:
    """The leading tokens no merge touches: the class token and the registers."""
    return int(self.has_class_token) + self.num_registers

  @property
  def mask_is_prefix(self) -> bool:
    """Whether attention may take padding as key lengths: MaMe and ToMe keep the
    real tokens first (``attention_mask="auto"``), an arbitrary merge may not."""
    _check_choice(self.attention_mask, ATTENTION_MASK, "attention_mask")
    if self.attention_mask != "auto":
      return self.attention_mask == "lengths"
    from mame_jax.models import merging  # pylint: disable=import-outside-toplevel
    return isinstance(self.merge, (merging.MergeConfig, merging.ToMeConfig))

  @nn.compact
  def __call__(self, image, *, train=False):
    if self.pool_type not in POOL_TYPES:
      raise ValueError(f"Unknown pool type {self.pool_type!r}; known: {POOL_TYPES}")
    if self.pool_type in ("tok", "tok_gap") and not self.has_class_token:
      raise ValueError(f"pool_type={self.pool_type!r} needs a class token")
    out = {}
    image = jnp.asarray(image, jnp.float32)
    if self.input_norm is not None:
      mean, std = (jnp.asarray(v, jnp.float32) for v in self.input_norm)
      image = ((image + 1.0) / 2.0 - mean) / std

    patch = pair(self.patch_size)
    x = out["stem"] = nn.Conv(
        self.width, patch, strides=patch, padding="VALID", name="embedding",
        dtype=self.dtype_mm, param_dtype=jnp.float32)(image)
    n, h, w, d = x.shape
    x = x.reshape(n, h * w, d).astype(self.dtype)

    # Position embeddings go on the patches, before the class token is prepended.
    if self.posemb == "learn":
      pos = self.param("pos_embedding", nn.initializers.normal(stddev=1 / np.sqrt(d)),
                       (1, h * w, d), jnp.float32)
    elif self.posemb == "sincos2d":
      pos = posemb_sincos_2d(h, w, d)
    else:
      raise ValueError(f"Unknown posemb type {self.posemb!r}")
    x = out["with_posemb"] = x + pos.astype(self.dtype)

    prefix = []
    if self.has_class_token:
      cls = self.param("cls", nn.initializers.zeros, (1, 1, d), jnp.float32)
      prefix.append(jnp.broadcast_to(cls.astype(x.dtype), (n, 1, d)))
    if self.num_registers:  # DINOv2-reg: [cls | registers | patches]
      reg = self.param("registers", nn.initializers.zeros, (1, self.num_registers, d),
                       jnp.float32)
      prefix.append(jnp.broadcast_to(reg.astype(x.dtype), (n, self.num_registers, d)))
    if prefix:
      x = jnp.concatenate([*prefix, x], axis=1)
    num_prefix = self.num_special
    x = nn.Dropout(rate=self.dropout)(x, not train)
    if self.pre_norm:  # CLIP: after the class token and position embeddings
      x = out["pre_norm"] = nn.LayerNorm(epsilon=self.ln_eps, name="pre_norm",
                                         dtype=self.dtype)(x)

    token_mask = size = None
    if self.merge is not None:
      token_mask = jnp.ones(x.shape[:2], bool)
      size = jnp.ones(x.shape[:2], jnp.float32)

    x, token_mask, size, enc = Encoder(
        depth=self.depth, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
        dropout=self.dropout, scan=self.scan, remat_policy=self.remat_policy,
        dtype_mm=self.dtype_mm, gelu_approximate=self.gelu_approximate,
        prop_attn=self.prop_attn, merge=self.merge, final_norm=not self.fc_norm,
        num_special=num_prefix, dtype=self.dtype, attention=self.attention,
        attention_bias=self.attention_bias, mask_is_prefix=self.mask_is_prefix,
        ln_eps=self.ln_eps, activation=self.activation, layer_scale=self.layer_scale,
        name="Transformer")(x, token_mask, size, deterministic=not train)
    out.update(enc)
    if token_mask is not None:
      out["token_mask"], out["size"] = token_mask, size
    out["encoded"] = x
    # Pooling and the head see float32: one vector per image, and a bf16 mean over
    # hundreds of tokens would lose digits the logits keep.
    x = x.astype(jnp.float32)

    if self.pool_type in ("gap", "tok_gap"):  # mean over the real, non-special tokens
      mask = None if token_mask is None else token_mask[:, num_prefix:]
      # ToMe's MAE recipe weighs each token by its size (ToMeConfig.pool).
      weighted = size is not None and getattr(self.merge, "pool", None) == "size_weighted"
      mean = masked_mean(x[:, num_prefix:], mask, size[:, num_prefix:] if weighted else None)
      x = jnp.concatenate([x[:, 0], mean], axis=-1) if self.pool_type == "tok_gap" else mean
    elif self.pool_type == "tok":
      x = x[:, 0]
    elif self.pool_type == "map":
      x = MAPHead(num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                  dtype_mm=self.dtype_mm, attention=self.attention,
                  mask_is_prefix=self.mask_is_prefix,
                  gelu_approximate=self.gelu_approximate)(x, token_mask)
    if self.fc_norm:
      x = nn.LayerNorm(epsilon=LN_EPS, name="fc_norm")(x)
    out["head_input"] = x

    if self.rep_size:
      rep_size = self.width if self.rep_size is True else self.rep_size
      x = nn.tanh(nn.Dense(rep_size, name="pre_logits")(x))
    out["pre_logits"] = x

    if self.num_classes:
      kw = {"kernel_init": nn.initializers.zeros} if self.head_zeroinit else {}
      x = out["logits"] = nn.Dense(self.num_classes, name="head", **kw)(x)
    return x, out


def Model(num_classes=None, *, variant=None, **kw):  # pylint: disable=invalid-name
  """``Model(1000, variant="B/16", pool_type="tok")`` -> ``_Model``.

  ``variant`` sets width, depth, mlp_dim and num_heads (and patch_size with ``"/p"``);
  keyword arguments override it.
  """
  kw = {**decode_variant(variant), **kw}
  if "patch_size" in kw:
    kw["patch_size"] = pair(kw["patch_size"])
  if kw.get("input_norm") is not None:  # tuples of floats keep the module hashable
    kw["input_norm"] = tuple(tuple(float(c) for c in np.ravel(v)) for v in kw["input_norm"])
  return _Model(num_classes, **kw)
