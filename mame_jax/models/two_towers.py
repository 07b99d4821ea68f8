"""SigLIP / SigLIP 2 two-tower model, laid out like big_vision's
``models/proj/image_text/two_towers.py``.

Parameter tree (what the released ``.npz`` files hold under ``params/``):

    img/...      the image tower: ``mame_jax.models.vit`` (SigLIP: pool_type="map",
                 no class token, usually no ``head``)
    txt/...      the text tower: ``mame_jax.models.text``
    t (1,)       log temperature
    b (1,)       logit bias (SigLIP's sigmoid loss; absent in models trained without it)

``zimg, ztxt, out = model.apply({"params": params}, images, texts)``; either input
may be ``None`` (its embedding is then ``None``). ``zimg (B, E)`` and ``ztxt (N, E)``
are L2-normalised (``z / (|z| + 1e-8)``); ``out["t"] = exp(t)``, ``out["b"] = b``
when the model has one, and ``out["img/..."]`` / ``out["txt/..."]`` the towers'
intermediates. The logits SigLIP was trained with are :func:`logits`:
``zimg @ ztxt.T * exp(t) + b``, and ``sigmoid`` of them the pairwise match
probabilities.

MaMe goes into the image tower only (its ``merge`` attribute, as for any ViT;
``num_special = 0`` since SigLIP has no class token, and the MAP head pools the
real tokens only). Texts are 64 tokens: there is nothing worth merging.
"""

from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from mame_jax.models import text as text_lib


class Model(nn.Module):
  """Two towers: ``__call__(images | None, texts | None, *, train=False) ->
  (zimg (B, E) | None, ztxt (N, E) | None, out)``.

  Attributes:
    img: the image tower, a ``vit.Model`` returning ``(B, E)`` (``pool_type`` not
      ``"none"``).
    txt: the text tower, a ``text.Model``, built with ``normalize=False`` (as the
      loader does): this model normalises both towers the same way, as big_vision.
      (With ``normalize=True`` the second normalisation changes nothing beyond
      float32 rounding.)
    temperature_init: ``t`` starts at ``log(temperature_init)``.
    bias_init: ``b`` starts there; ``None``: the model has no ``b`` (as big_vision).
    activation: what the logits were trained with, and so what turns them into
      probabilities: ``"sigmoid"`` (SigLIP's pairwise loss) or ``"softmax"`` (over
      the texts: CLIP's contrastive loss). No parameter depends on it.
  """

  img: Optional[nn.Module] = None
  txt: Optional[nn.Module] = None
  temperature_init: float = 1.0
  bias_init: Optional[float] = None
  activation: str = "sigmoid"

  @nn.compact
  def __call__(self, images=None, texts=None, *, train=False):
    out = {}
    zimg = ztxt = None
    if texts is not None:
      if self.txt is None:
        raise ValueError("texts given but the model has no text tower (txt=None)")
      ztxt, aux = self.txt(texts, train=train)
      out.update({f"txt/{k}": v for k, v in aux.items()})
      ztxt = out["txt/normalized"] = text_lib.l2_normalize(ztxt)
    if images is not None:
      if self.img is None:
        raise ValueError("images given but the model has no image tower (img=None)")
      zimg, aux = self.img(images, train=train)
      out.update({f"img/{k}": v for k, v in aux.items()})
      out["img/norm"] = jnp.linalg.norm(zimg.astype(jnp.float32), axis=-1, keepdims=True)
      zimg = out["img/normalized"] = text_lib.l2_normalize(zimg)

    t_init = math.log(self.temperature_init)
    t = self.param("t", lambda _, shape: jnp.full(shape, t_init, jnp.float32), (1,))
    out["t/parameter"] = t
    out["t"] = jnp.exp(t)
    if self.bias_init is not None:
      b_init = float(self.bias_init)
      out["b"] = self.param("b", lambda _, shape: jnp.full(shape, b_init, jnp.float32),
                            (1,))
    return zimg, ztxt, out


def logits(zimg, ztxt, out):
  """``(B, E), (N, E), out -> (B, N)``: ``zimg @ ztxt.T * exp(t) (+ b)``, float32."""
  z = jnp.asarray(zimg, jnp.float32) @ jnp.asarray(ztxt, jnp.float32).T
  z = z * out["t"]
  return z + out["b"] if "b" in out else z
