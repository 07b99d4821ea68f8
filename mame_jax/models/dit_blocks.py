"""Generation blocks: the token count survives every block (eqs. 17-18).

::

    x' = x + MaRe(MSA(MaMe(LN(x))))    (17)
    x  = x' + MLP(LN(x'))              (18)

:class:`GenerationBlock` is the ViT block of ``mame_jax.models.vit`` with the
merge moved around attention (the same ``MultiHeadDotProductAttention`` and
``MlpBlock``, the same parameter names, so a plain block's weights load as
they are); :class:`GenerationStack` is ``depth`` of them. The merge slot takes

* a :class:`~mame_jax.models.merging.MergeConfig` -- MaMe + MaRe
  (:func:`mame_jax.generation.mame_mare`) in ``cfg.layers`` with ``cfg.tau_of``,
  ``cfg.partition`` and the static capacity ``cfg.capacity(layer, L, s)``: full
  N in exact mode without capacities, 0 in fixed mode without them. Exact mode
  (no preserved token dropped at bucketed capacities) is driven from outside:
  ``mame_jax.generation.run_exact`` with ``summary`` of the stack's ``aux``.
  ``metric="keys"`` is refused: in eq. (17) the merge comes before attention;
* a :class:`~mame_jax.tome_sd.ToMeSDConfig` -- ToMe-SD, the baseline;
* ``None`` -- the plain block.

``restore="copy"`` restores MaMe's merge ToMe-SD's way instead of with MaRe.
``token_mask`` (B, L) marks padding: attention ignores padded keys, the merge
treats padding as absent, and padded positions leave each block as they came.

``adaln=True`` makes it DiT's adaLN-Zero block (Peebles & Xie 2023), conditioned
on ``cond`` (B, C): ``SiLU -> Dense(6 D)`` (zero-initialised, so every block
starts as the identity) gives per-sample shift / scale / gate for each half, the
LayerNorms lose their own affine, and

    x' = x + g1 * MaRe(MSA(MaMe(LN(x) * (1 + a1) + b1)))
    x  = x' + g2 * MLP(LN(x') * (1 + a2) + b2)

so the merge sees the tokens attention sees (the modulated ones), and the gate,
per channel, scales the restored output (MaRe is linear per token, so gating
before or after it is the same).
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from mame_jax.generation import RESTORES, mame_mare
from mame_jax.models.merging import MergeConfig
from mame_jax.models.vit import LN_EPS, MlpBlock, MultiHeadDotProductAttention
from mame_jax.tome_sd import ToMeSDConfig


def _mame_options(cfg: MergeConfig, layer: int) -> dict:
  """What ``cfg`` hands to ``mame`` in block ``layer`` besides tau and capacity."""
  if cfg.metric != "tokens":
    raise ValueError(f"MergeConfig.metric={cfg.metric!r} cannot be used in a generation "
                     f"block: eq. (17) merges before attention, so there are no keys yet; "
                     f"use metric='tokens'")
  return cfg.mame_options(layer)


class _Modulation:
  """adaLN-Zero's per-sample ``(shift, scale, gate)`` for the attention (0) and MLP
  (1) halves of a block, each (B, 1, D); without adaLN both are the identity."""

  def __init__(self, params=None):
    self.params = params

  def norm(self, y, half):
    if self.params is None:
      return y
    shift, scale, _ = self.params[half]
    return (y * (1 + scale) + shift).astype(y.dtype)

  def gate(self, y, half):
    if self.params is None:
      return y
    return (y * self.params[half][2]).astype(y.dtype)


def _modulation(adaln: bool, cond, x) -> _Modulation:
  """Creates the block's ``adaLN_modulation`` Dense (inside its ``nn.compact``)."""
  if not adaln:
    if cond is not None:
      raise ValueError("cond was given to a block without adaln=True: it would be ignored")
    return _Modulation()
  if cond is None or cond.ndim != 2 or cond.shape[0] != x.shape[0]:
    raise ValueError(f"adaln=True needs cond (B, C) with B = {x.shape[0]}; got "
                     f"{None if cond is None else tuple(cond.shape)}")
  d = x.shape[-1]
  # Zero-initialised (adaLN-Zero): shifts, scales and gates start at 0, so every
  # block starts as the identity map.
  six = nn.Dense(6 * d, kernel_init=nn.initializers.zeros, name="adaLN_modulation")(
      nn.silu(cond.astype(jnp.float32)))
  parts = [p[:, None, :] for p in jnp.split(six, 6, axis=-1)]
  return _Modulation((parts[0:3], parts[3:6]))


class GenerationBlock(nn.Module):
  """Eqs. (17)-(18): ``(x (B, L, D), token_mask (B, L) | None) -> (x (B, L, D), aux)``;
  with ``adaln`` also ``cond`` (B, C), the conditioning vector.

  ``aux["merge"]`` is ``{"info": MergeInfo}`` (MaMe), ``{"record": ToMeSDRecord}``
  (ToMe-SD) or ``{}`` where the block did not merge.
  """

  mlp_dim: Optional[int] = None
  num_heads: int = 12
  dropout: float = 0.0
  dtype_mm: Any = "float32"
  gelu_approximate: bool = True
  merge: Any = None  # MergeConfig | ToMeSDConfig | None
  restore: str = "mare"  # RESTORES, for MergeConfig merges
  layer: int = 0
  num_special: int = 0
  dtype: Any = "float32"
  attention: str = "auto"
  adaln: bool = False  # DiT's adaLN-Zero conditioning on ``cond``

  @nn.compact
  def __call__(self, x, token_mask=None, deterministic=True, cond=None):
    if self.restore not in RESTORES:
      raise ValueError(f"restore must be one of {RESTORES}; got {self.restore!r}")
    out = {}
    mod = _modulation(self.adaln, cond, x)
    attn = MultiHeadDotProductAttention(self.num_heads, self.dtype_mm,
                                        implementation=self.attention)

    def attend(tokens, mask):
      return attn(tokens, tokens, token_mask=mask)[0]

    y = mod.norm(nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, use_scale=not self.adaln,
                              use_bias=not self.adaln)(x), 0)
    cfg, length = self.merge, x.shape[1]
    if isinstance(cfg, MergeConfig) and cfg.active and self.layer in cfg.layers:
      # ------------- eq. (17): MaRe(MSA(MaMe(LN(x)))) ---------------------
      y, info = mame_mare(
          attend, y, cfg.tau_of(self.layer), restore=self.restore,
          capacity=cfg.capacity(self.layer, length, self.num_special),
          token_mask=token_mask, num_special=self.num_special, return_info=True,
          **_mame_options(cfg, self.layer))
      out["merge"] = {} if info is None else {"info": info}
    elif isinstance(cfg, ToMeSDConfig):
      if token_mask is not None and cfg.merges(self.layer):
        raise ValueError("ToMeSDConfig cannot merge padded sequences (token_mask): "
                         "ToMe-SD has no notion of padding")
      y, out["merge"] = cfg(attend, y, layer=self.layer)
    elif cfg is None or isinstance(cfg, MergeConfig):
      y, out["merge"] = attend(y, token_mask), {}
    else:
      raise TypeError(f"merge must be a MergeConfig, a ToMeSDConfig or None; "
                      f"got {type(cfg).__name__}")
    y = nn.Dropout(rate=self.dropout)(mod.gate(y, 0), deterministic)
    if token_mask is not None:  # padding passes through unchanged
      y = jnp.where(token_mask[..., None], y, 0)
    x = (x + y).astype(jnp.promote_types(x.dtype, self.dtype))

    # eq. (18): x + MLP(LN(x)).
    y = mod.norm(nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, use_scale=not self.adaln,
                              use_bias=not self.adaln)(x), 1)
    y = MlpBlock(mlp_dim=self.mlp_dim, dropout=self.dropout, dtype_mm=self.dtype_mm,
                 gelu_approximate=self.gelu_approximate, dtype=self.dtype)(y, deterministic)
    y = nn.Dropout(rate=self.dropout)(mod.gate(y, 1), deterministic)
    if token_mask is not None:
      y = jnp.where(token_mask[..., None], y, 0)
    x = (x + y).astype(jnp.promote_types(x.dtype, self.dtype))
    return x, out


class GenerationStack(nn.Module):
  """``depth`` generation blocks: ``(x (B, L, D), token_mask) -> (x (B, L, D), aux)``
  with ``aux["block{i:02d}"]`` per block (``merging.merge_records`` reads the
  merge records; ``generation.summary`` the exact-mode statistics) and
  ``aux["tokens_per_block"]`` (B, depth) int32, the real tokens each block's
  attention ran on. No final norm: a DiT puts its own head on top. ``adaln``:
  every block is conditioned on ``cond`` (B, C) (adaLN-Zero)."""

  depth: int
  mlp_dim: Optional[int] = None
  num_heads: int = 12
  dropout: float = 0.0
  dtype_mm: Any = "float32"
  gelu_approximate: bool = True
  merge: Any = None
  restore: str = "mare"
  num_special: int = 0
  dtype: Any = "float32"
  attention: str = "auto"
  adaln: bool = False

  @nn.compact
  def __call__(self, x, token_mask=None, deterministic=True, cond=None):
    if isinstance(self.merge, MergeConfig) and any(l >= self.depth for l in self.merge.layers):
      raise ValueError(f"MergeConfig.layers {self.merge.layers} name blocks beyond the "
                       f"stack's depth {self.depth}")
    aux, counts = {}, []
    b, l = x.shape[:2]
    full = (jnp.full((b,), l, jnp.int32) if token_mask is None
            else token_mask.sum(-1, dtype=jnp.int32))
    for i in range(self.depth):
      x, aux[f"block{i:02d}"] = GenerationBlock(
          mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout=self.dropout,
          dtype_mm=self.dtype_mm, gelu_approximate=self.gelu_approximate,
          merge=self.merge, restore=self.restore, layer=i, num_special=self.num_special,
          dtype=self.dtype, attention=self.attention, adaln=self.adaln,
          name=f"encoderblock_{i}")(x, token_mask, deterministic, cond)
      rec = aux[f"block{i:02d}"]["merge"]
      if "info" in rec:
        counts.append(rec["info"].token_mask.sum(-1, dtype=jnp.int32))
      elif "record" in rec:
        counts.append(jnp.full((b,), rec["record"].num_out, jnp.int32))
      else:
        counts.append(full)
    aux["tokens_per_block"] = jnp.stack(counts, axis=1)
    return x, aux
