"""A small class-conditional diffusion transformer (DiT, Peebles & Xie 2023) whose
blocks merge with MaMe + MaRe (eqs. 17-18) or ToMe-SD.

``DiT()(x (B, H, W, C), t (B,), y (B,)) -> (eps (B, H, W, C), aux)``:

1. patchify: a ``patch x patch`` convolution with stride ``patch`` (``embedding``),
   plus fixed 2-D sin-cos position embeddings (``vit.posemb_sincos_2d``);
2. conditioning ``c = MLP(sinusoid(t)) + embed(y)`` (B, D); class ``num_classes``
   is the *null* class, what classifier-free guidance (``mame_jax.diffusion``)
   uses for the unconditional half;
3. ``depth`` adaLN-Zero generation blocks (``dit_blocks.GenerationStack`` with
   ``adaln=True``: the one block definition, its ``merge`` slot and options as
   there);
4. final layer: ``LN(x) * (1 + scale) + shift`` from ``c``, ``Dense(patch^2 C)``
   (zero-initialised, so the untrained model predicts 0), unpatchify.

``aux`` is the stack's (``aux["block{i:02d}"]``, ``aux["tokens_per_block"]``), so
``merging.merge_records`` and ``generation.summary`` read it as for the stack.

Weights are saved as one ``.npz`` (:func:`save`): the flat ``/``-joined params and
``meta/config``, the constructor's arguments as a JSON string; :func:`load` reads
it with ``allow_pickle=False`` (``checkpoints.read_arrays``) and checks every key
and shape against what the model creates.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mame_jax.models import checkpoints
from mame_jax.models.dit_blocks import GenerationStack
from mame_jax.models.vit import LN_EPS, posemb_sincos_2d

# The constructor arguments that describe the architecture (saved in meta/config).
ARCH_FIELDS = ("image_size", "patch_size", "channels", "width", "depth", "num_heads",
               "mlp_ratio", "num_classes", "frequency_dim")


def timestep_embedding(t, dim: int, max_period: float = 10_000.0):
  """(B,) timesteps (any real values) -> (B, dim) ``[cos(t f), sin(t f)]``, ``dim // 2``
  frequencies going geometrically from 1 down to ``1 / max_period`` (DiT's and
  the DDPM U-Net's sinusoid)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class DiT(nn.Module):
  """Class-conditional DiT predicting the noise ``eps`` of a noisy image.

  Attributes:
    image_size: H = W of the images (a multiple of ``patch_size``).
    patch_size: side of a patch; ``(image_size / patch_size)^2`` tokens.
    channels: image channels (in and out).
    width, depth, num_heads, mlp_ratio: the transformer.
    num_classes: real classes; index ``num_classes`` is the null class.
    frequency_dim: size of the timestep sinusoid.
    merge: the blocks' merge slot: ``MergeConfig`` (MaMe + MaRe), ``ToMeSDConfig``
      or ``None`` (see ``mame_jax.models.dit_blocks``).
    restore: "mare" or "copy", for ``MergeConfig`` merges.
    attention: ``vit.ATTENTION_IMPLS``.
  """

  image_size: int = 32
  patch_size: int = 4
  channels: int = 1
  width: int = 64
  depth: int = 4
  num_heads: int = 4
  mlp_ratio: float = 4.0
  num_classes: int = 10
  frequency_dim: int = 128
  merge: Any = None
  restore: str = "mare"
  attention: str = "auto"

  @property
  def grid(self) -> int:
    """Tokens per side."""
    return self.image_size // self.patch_size

  @property
  def num_tokens(self) -> int:
    return self.grid ** 2

  def config(self) -> dict:
    """The architecture (JSON-able; ``DiT(**config)`` rebuilds it)."""
    return {k: getattr(self, k) for k in ARCH_FIELDS}

  @nn.compact
  def __call__(self, x, t, y, deterministic=True):
    b, p, d = x.shape[0], self.patch_size, self.width
    want = (self.image_size, self.image_size, self.channels)
    if x.ndim != 4 or tuple(x.shape[1:]) != want:
      raise ValueError(f"DiT expects images (B, {', '.join(map(str, want))}); got "
                       f"{tuple(x.shape)}")
    if self.image_size % p:
      raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {p}")
    if jnp.shape(t) != (b,) or jnp.shape(y) != (b,):
      raise ValueError(f"t and y must be (B,) = ({b},); got {jnp.shape(t)} and {jnp.shape(y)}")
    g = self.grid
    tokens = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", name="embedding")(x)
    tokens = tokens.reshape(b, g * g, d) + posemb_sincos_2d(g, g, d)

    temb = timestep_embedding(t, self.frequency_dim)
    temb = nn.Dense(d, kernel_init=nn.initializers.normal(0.02), name="t_embedder_0")(temb)
    temb = nn.Dense(d, kernel_init=nn.initializers.normal(0.02), name="t_embedder_1")(
        nn.silu(temb))
    yemb = nn.Embed(self.num_classes + 1, d, embedding_init=nn.initializers.normal(0.02),
                    name="y_embedder")(jnp.asarray(y, jnp.int32))
    cond = temb + yemb

    tokens, aux = GenerationStack(
        depth=self.depth, mlp_dim=int(self.mlp_ratio * d), num_heads=self.num_heads,
        merge=self.merge, restore=self.restore, num_special=0, attention=self.attention,
        adaln=True, name="Transformer")(tokens, None, deterministic, cond)

    # Final layer: adaptive LayerNorm (shift, scale from c), then a zero-initialised
    # projection to the patch pixels.
    shift, scale = jnp.split(nn.Dense(2 * d, kernel_init=nn.initializers.zeros,
                                      name="final_modulation")(nn.silu(cond)), 2, axis=-1)
    tokens = nn.LayerNorm(epsilon=LN_EPS, use_scale=False, use_bias=False,
                          name="final_norm")(tokens)
    tokens = tokens * (1 + scale[:, None]) + shift[:, None]
    out = nn.Dense(p * p * self.channels, kernel_init=nn.initializers.zeros,
                   name="head")(tokens)
    # Unpatchify: (B, g*g, p*p*C) -> (B, g*p, g*p, C), the inverse of the conv's grid.
    out = out.reshape(b, g, g, p, p, self.channels).transpose(0, 1, 3, 2, 4, 5)
    return out.reshape(b, g * p, g * p, self.channels), aux


def init(model: DiT, seed: int = 0) -> dict:
  """Random params of ``model`` (a batch of one zero image, timestep 0, class 0)."""
  x = jnp.zeros((1, model.image_size, model.image_size, model.channels))
  zeros = jnp.zeros((1,), jnp.int32)
  return jax.jit(model.init)(jax.random.key(seed), x, zeros, zeros)["params"]


def save(path, model: DiT, params, extra: Optional[dict] = None) -> None:
  """Writes ``params`` and the architecture to one ``.npz`` (``meta/config``: JSON;
  ``meta/extra``: ``extra`` as JSON, e.g. how the model was trained)."""
  flat = {k: np.asarray(v) for k, v in checkpoints._flatten(jax.device_get(params)).items()}  # pylint: disable=protected-access
  flat["meta/config"] = np.asarray(json.dumps(model.config()))
  flat["meta/extra"] = np.asarray(json.dumps(extra or {}, default=float))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:  # a file object: np.savez would append ".npz" to a name
    np.savez(f, **flat)


def load(path, **overrides) -> tuple[DiT, dict, dict]:
  """``(model, params, extra)`` from a file written by :func:`save`; ``overrides``
  (``merge=``, ``restore=``, ``attention=``) go to the constructor. Raises
  ``ValueError`` naming the file when it is not such a file or its weights do
  not fit the architecture it records."""
  flat = checkpoints.read_arrays(path)
  if "meta/config" not in flat:
    raise ValueError(f"{path}: no meta/config entry: not a DiT file written by "
                     f"mame_jax.models.dit.save")
  config = json.loads(str(flat.pop("meta/config")))
  extra = json.loads(str(flat.pop("meta/extra"))) if "meta/extra" in flat else {}
  unknown = sorted(set(config) - set(ARCH_FIELDS))
  if unknown:
    raise ValueError(f"{path}: meta/config has unknown fields {unknown}; expected a subset "
                     f"of {ARCH_FIELDS}")
  model = DiT(**config, **overrides)
  expected = jax.eval_shape(lambda: init(model))
  want = {k: tuple(v.shape) for k, v in checkpoints._flatten(expected).items()}  # pylint: disable=protected-access
  got = {k: tuple(v.shape) for k, v in flat.items()}
  missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
  bad = sorted(k for k in set(want) & set(got) if want[k] != got[k])
  if missing or unexpected or bad:
    raise ValueError(f"{path}: the weights do not fit DiT({config}): missing {missing[:5]}, "
                     f"unexpected {unexpected[:5]}, wrong shape "
                     f"{[(k, got[k], want[k]) for k in bad[:5]]}")
  params = checkpoints._unflatten({k: jnp.asarray(v, jnp.float32) for k, v in flat.items()})  # pylint: disable=protected-access
  return model, params, extra


def with_merge(model: DiT, merge=None, restore: str = "mare") -> DiT:
  """The same architecture (and params) with another merge slot."""
  return model.clone(merge=merge, restore=restore)


__all__ = ["DiT", "init", "load", "save", "timestep_embedding", "with_merge"]
