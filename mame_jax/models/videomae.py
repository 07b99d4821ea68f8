"""VideoMAE (Tong et al., 2022) in Flax, with the ViT's blocks and their one merge hook.

The encoder is ``mame_jax.models.vit``'s: the same ``Encoder`` (``Encoder1DBlock``,
``MultiHeadDotProductAttention``, ``MlpBlock``, the merge hook between attention and
MLP), so ``MergeConfig`` / ``ToMeConfig`` merges, ``mame_jax.eval.runner.Runner`` and
``merging.merge_records`` work unchanged. What VideoMAE adds around it:

* a *tubelet* embedding, a 3-D convolution over ``tubelet_size`` frames x ``p`` x
  ``p`` pixels with stride equal to its size; its tokens are flattened in
  ``(t, y, x)`` order (time slowest), as transformers' ``flatten(2)`` of the
  ``(B, D, T', H', W')`` convolution output does;
* a *fixed* 1-D sinusoid position table over all ``T' H' W'`` tokens
  (:func:`sinusoid_table`), not stored in the checkpoint;
* no class token (``num_special = 0``): every token may merge;
* the query and value projections have biases, the key projection none
  (``use_key_bias=False``);
* the block LayerNorms use ``layer_norm_eps`` (1e-12 in transformers' config),
  while ``fc_norm`` uses PyTorch's default 1e-5;
* pooling: with ``use_mean_pooling`` the tokens are averaged (the real ones only:
  ``vit.masked_mean``) and then ``fc_norm``; without it the final ``encoder_norm``
  is applied and token 0 -- the first patch token -- is taken;
* inputs: videos ``(B, T, H, W, 3)`` in [-1, 1], mapped to ImageNet-normalised
  pixels inside the model (like ``vit.Model``'s ``input_norm``).

Checkpoints: the transformers layout, a folder holding ``config.json`` and
``model.safetensors`` (or a sharded ``model.safetensors.index.json``), as
``save_pretrained`` writes it -- e.g. ``MCG-NJU/videomae-base-finetuned-kinetics``.
:func:`load_model` reads one (``mame_jax.load_model(folder)`` dispatches here),
:func:`save_transformers` writes one (for tests). Parameter names follow
``vit.py`` (``embedding``, ``Transformer/encoderblock_{i}/...``,
``Transformer/encoder_norm``, ``fc_norm``, ``head``); the embedding kernel is
``(ts, p, p, 3, D)``. A folder with only ``pytorch_model.bin`` is refused: nothing
is ever unpickled.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mame_jax.models import checkpoints, vit

CONFIG_FILE = checkpoints.TRANSFORMERS_CONFIG
WEIGHTS_FILE = checkpoints.TRANSFORMERS_WEIGHTS
WEIGHTS_INDEX = checkpoints.TRANSFORMERS_INDEX
PICKLE_FILES = checkpoints.TRANSFORMERS_PICKLES
# PyTorch nn.LayerNorm's default eps, which transformers' fc_norm keeps.
FC_NORM_EPS = 1e-5
DEFAULT_LN_EPS = 1e-12  # transformers' VideoMAEConfig.layer_norm_eps
# hidden_act values of transformers' ACT2FN that vit.MlpBlock computes:
# name -> gelu_approximate.
HIDDEN_ACTS = {"gelu": False, "gelu_new": True, "gelu_pytorch_tanh": True}
# Public fine-tuned checkpoints on the Hugging Face hub (MCG-NJU), by short name.
HUB = "https://huggingface.co/{repo}/resolve/main/{file}"
KNOWN_FOLDERS = {
    "videomae_b_k400": "MCG-NJU/videomae-base-finetuned-kinetics",
    "videomae_l_k400": "MCG-NJU/videomae-large-finetuned-kinetics",
}


def sinusoid_table(n: int, width: int) -> np.ndarray:
  """The fixed position table ``(n, width)`` float64 of transformers' VideoMAE.

  Token ``i``, channel ``j``: angle ``i / 10000 ** (2 * (j // 2) / width)``; even
  channels hold its sine, odd channels its cosine (interleaved, not concatenated).
  Built in float64 like the reference, which then rounds it to float32.
  """
  pos = np.arange(n, dtype=np.float64)[:, None]
  j = np.arange(width)
  angle = pos / np.power(10000.0, 2 * (j // 2) / width)[None]
  return np.where(j % 2 == 0, np.sin(angle), np.cos(angle))


class _VideoMAE(nn.Module):
  """VideoMAE: ``__call__(videos (B, T, H, W, 3) in [-1, 1], *, train=False) ->
  (output, aux)``.

  ``output`` is the logits ``(B, num_classes)`` (the pooled ``(B, D)`` without a
  head). ``aux`` holds what ``vit.Model``'s does: ``stem`` ``(B, T', H', W', D)``,
  ``with_posemb``, ``block{i:02d}``, ``pre_ln``, ``encoded``, ``head_input``,
  ``pre_logits``, ``logits``, ``tokens_per_block`` int32 ``(B, depth)`` and, with a
  merge, the final ``token_mask`` and ``size``.

  ``image_size`` and ``num_frames`` are the input the checkpoint was trained on
  (the default of helpers that need one); the sinusoid table fits any input.
  The other attributes are ``vit.Model``'s.
  """

  num_classes: Optional[int] = None
  patch_size: Sequence[int] = (16, 16)
  tubelet_size: int = 2
  width: int = 768
  depth: int = 12
  mlp_dim: Optional[int] = None
  num_heads: int = 12
  use_mean_pooling: bool = True
  ln_eps: float = DEFAULT_LN_EPS
  fc_norm_eps: float = FC_NORM_EPS
  gelu_approximate: bool = False  # transformers' hidden_act="gelu" is the erf GELU
  input_norm: Optional[tuple] = (checkpoints.IMAGENET_MEAN, checkpoints.IMAGENET_STD)
  image_size: Sequence[int] = (224, 224)
  num_frames: int = 16
  dropout: float = 0.0
  scan: bool = False
  remat_policy: str = "nothing_saveable"
  dtype_mm: Any = "float32"
  dtype: Any = "float32"
  prop_attn: bool = False
  merge: Any = None
  attention: str = "auto"
  attention_bias: str = "add"
  attention_mask: str = "auto"

  has_class_token = False  # what code written for vit.Model asks
  num_special = 0
  pool_type = property(lambda self: "gap" if self.use_mean_pooling else "tok")
  # The ViT's rule, one definition: MaMe / ToMe keep the real tokens first.
  mask_is_prefix = vit._Model.mask_is_prefix  # pylint: disable=protected-access

  def token_grid(self, input_shape) -> tuple[int, int, int]:
    """``(T', H', W')`` of the tokens made of a video ``input_shape = (T, H, W)``."""
    t, h, w = (int(v) for v in input_shape)
    return (t // self.tubelet_size, *vit.patch_grid(self, (h, w)))

  def sequence_lengths(self, input_shape) -> tuple[int, int]:
    """``(tokens entering block 0, num_special = 0)`` for ``input_shape = (T, H, W)``
    (what ``mame_jax.eval.runner.sequence_lengths`` asks)."""
    return int(np.prod(self.token_grid(input_shape))), 0

  def check_inputs(self, params_or_size, videos) -> None:
    """Raises ``ValueError`` unless ``videos`` suit the model (shapes and dtype only;
    ``mame_jax.models.inputs.check_images`` hands video models here).
    ``params_or_size`` is accepted for that signature: the sinusoid table fits
    any number of tokens, so no size is imposed."""
    del params_or_size
    shape = tuple(getattr(videos, "shape", np.shape(videos)))
    dtype = getattr(videos, "dtype", None)
    dtype = np.dtype(np.asarray(videos).dtype if dtype is None else dtype)
    if len(shape) != 5 or shape[-1] != 3:
      hint = " (one video? add a batch axis: videos[None])" if len(shape) == 4 else ""
      if len(shape) == 5 and shape[2] == 3:
        hint = (" (transformers' (B, T, 3, H, W) pixel_values? transpose: "
                "videos.transpose(0, 1, 3, 4, 2))")
      raise ValueError(f"videos must have shape (B, T, H, W, 3), channels last; got "
                       f"shape {shape}{hint}")
    if not np.issubdtype(dtype, np.floating):
      raise ValueError(f"videos must be float values in [-1, 1]; got dtype {dtype}. "
                       "For 8-bit pixels: x.astype(np.float32) / 127.5 - 1")
    (ph, pw), ts = vit.pair(self.patch_size), self.tubelet_size
    if shape[1] < ts or shape[2] < ph or shape[3] < pw:
      raise ValueError(f"videos of {shape[1]} frames of {shape[2]}x{shape[3]} px are "
                       f"smaller than one tubelet of {ts} frames x {ph}x{pw} px; "
                       f"shape {shape}")

  @nn.compact
  def __call__(self, videos, *, train=False):
    out = {}
    x = jnp.asarray(videos, jnp.float32)
    if self.input_norm is not None:
      mean, std = (jnp.asarray(v, jnp.float32) for v in self.input_norm)
      x = ((x + 1.0) / 2.0 - mean) / std
    kernel = (self.tubelet_size, *vit.pair(self.patch_size))
    x = out["stem"] = nn.Conv(
        self.width, kernel, strides=kernel, padding="VALID", name="embedding",
        dtype=self.dtype_mm, param_dtype=jnp.float32)(x)  # (B, T', H', W', D)
    n, t, h, w, d = x.shape
    # Row-major reshape: time slowest, then y, then x -- transformers' order.
    x = x.reshape(n, t * h * w, d).astype(self.dtype)
    # The reference rounds the float64 table to float32 before adding it.
    pos = jnp.asarray(sinusoid_table(t * h * w, d).astype(np.float32))
    x = out["with_posemb"] = x + pos[None].astype(self.dtype)
    x = nn.Dropout(rate=self.dropout)(x, not train)

    token_mask = size = None
    if self.merge is not None:
      token_mask = jnp.ones(x.shape[:2], bool)
      size = jnp.ones(x.shape[:2], jnp.float32)
    x, token_mask, size, enc = vit.Encoder(
        depth=self.depth, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
        dropout=self.dropout, scan=self.scan, remat_policy=self.remat_policy,
        dtype_mm=self.dtype_mm, gelu_approximate=self.gelu_approximate,
        prop_attn=self.prop_attn, merge=self.merge,
        final_norm=not self.use_mean_pooling, num_special=0, dtype=self.dtype,
        attention=self.attention, attention_bias=self.attention_bias,
        mask_is_prefix=self.mask_is_prefix, ln_eps=self.ln_eps, use_key_bias=False,
        name="Transformer")(x, token_mask, size, deterministic=not train)
    out.update(enc)
    if token_mask is not None:
      out["token_mask"], out["size"] = token_mask, size
    out["encoded"] = x
    x = x.astype(jnp.float32)  # pooling and head in float32, as in vit.Model
    if self.use_mean_pooling:
      x = vit.masked_mean(x, token_mask)
      x = nn.LayerNorm(epsilon=self.fc_norm_eps, name="fc_norm")(x)
    else:
      # transformers takes token 0, the first patch token. Merges keep the real
      # tokens first, so after one row 0 is still a real token (MaMe: the first
      # destination, which patch 0 may have merged into).
      x = x[:, 0]
    out["head_input"] = out["pre_logits"] = x
    if self.num_classes:
      x = out["logits"] = nn.Dense(self.num_classes, name="head")(x)
    return x, out


def Model(num_classes=None, **kw):  # pylint: disable=invalid-name
  """``Model(400, width=768, depth=12, ...)`` -> ``_VideoMAE`` (hashable attributes)."""
  for key in ("patch_size", "image_size"):
    if key in kw:
      kw[key] = vit.pair(kw[key])
  if kw.get("input_norm") is not None:
    kw["input_norm"] = tuple(tuple(float(c) for c in np.ravel(v)) for v in kw["input_norm"])
  return _VideoMAE(num_classes, **kw)


# ------------------------------------------------------------------------------------
# transformers' folder layout <-> canonical params.

_LAYER_RE = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
# Inside a transformers layer -> (canonical path inside encoderblock_{i}, kind).
_LAYER_MAP = {
    "layernorm_before": ("LayerNorm_0", "norm"),
    "attention.attention.query": ("MultiHeadDotProductAttention_0/query", "in"),
    "attention.attention.key": ("MultiHeadDotProductAttention_0/key", "in"),
    "attention.attention.value": ("MultiHeadDotProductAttention_0/value", "in"),
    "attention.output.dense": ("MultiHeadDotProductAttention_0/out", "out"),
    "layernorm_after": ("LayerNorm_1", "norm"),
    "intermediate.dense": ("MlpBlock_0/Dense_0", "dense"),
    "output.dense": ("MlpBlock_0/Dense_1", "dense"),
}
_TOP_MAP = {"embeddings.patch_embeddings.projection": ("embedding", "conv"),
            "layernorm": ("Transformer/encoder_norm", "norm"),
            "fc_norm": ("fc_norm", "norm"), "classifier": ("head", "dense")}
# The pre-training decoder (VideoMAEForPreTraining) is not part of the encoder.
_IGNORED = ("decoder.", "encoder_to_decoder.", "mask_token", "position_embeddings")


def _problem(source, what) -> ValueError:
  return ValueError(f"{source}: {what}")


def find_files(folder) -> tuple[pathlib.Path, list]:
  """``(config.json, [safetensors files])`` of a transformers folder
  (``checkpoints.transformers_files``: missing files and pickle-only folders are
  refused with a message naming them)."""
  return checkpoints.transformers_files(folder, "VideoMAE",
                                        "VideoMAEForVideoClassification")


def read_config(path) -> dict:
  """``config.json`` as a dict; ``ValueError`` naming the file if it is no JSON
  object or not a VideoMAE config."""
  config = checkpoints.read_json(path)
  if config.get("model_type", "videomae") != "videomae":
    raise _problem(path, f"model_type is {config['model_type']!r}, expected 'videomae'")
  return config


read_weights = checkpoints.read_transformers_weights


def _strip(state: Mapping, names: Optional[dict] = None) -> dict:
  """Drops the ``videomae.`` prefix of VideoMAEFor* files, and the pre-training
  decoder's entries; ``names`` (if given) collects stripped -> stored key."""
  out = {}
  for key, v in state.items():
    k = key[len("videomae."):] if key.startswith("videomae.") else key
    if not k.startswith(_IGNORED):
      out[k] = np.asarray(v)
      if names is not None:
        names[k] = key
  return out


_leaf = checkpoints.torch_leaf  # one torch tensor -> (canonical leaf, array)


def infer_architecture(config: Mapping, state: Mapping, source="checkpoint") -> dict:
  """``Model`` keyword arguments from ``config.json`` and the state dict's shapes.

  The weights give width, tubelet and patch size, depth, mlp_dim, ``num_classes``
  (``classifier``; ``None`` without one) and the pooling (``layernorm`` present ->
  token 0, else mean pooling); the config gives what weights cannot show: heads,
  ``layer_norm_eps``, ``hidden_act``, and the trained ``image_size`` /
  ``num_frames``. Disagreements between the two raise ``ValueError``.
  """
  state = _strip(state)
  proj = state.get("embeddings.patch_embeddings.projection.weight")
  if proj is None or proj.ndim != 5:
    raise _problem(source, "no embeddings.patch_embeddings.projection.weight of shape "
                   "(D, 3, tubelet, p, p): not a VideoMAE state dict")
  width, channels, ts, ph, pw = proj.shape
  if channels != 3 or config.get("num_channels", 3) != 3:
    raise _problem(source, f"{channels} input channels; only RGB (3) is supported")
  layers = {int(m.group(1)) for m in map(_LAYER_RE.match, state) if m}
  depth = max(layers) + 1 if layers else 0
  if layers != set(range(depth)) or depth == 0:
    raise _problem(source, f"encoder layers {sorted(layers)}: expected 0..depth-1")
  num_heads = int(config.get("num_attention_heads", 12))
  if width % num_heads:
    raise _problem(source, f"hidden size {width} is not divisible by "
                   f"num_attention_heads={num_heads}")
  for key, value in (("hidden_size", width), ("num_hidden_layers", depth),
                     ("tubelet_size", ts)):
    if key in config and int(config[key]) != value:
      raise _problem(source, f"config.json says {key}={config[key]} but the weights "
                     f"have {value}")
  act = config.get("hidden_act", "gelu")
  if act not in HIDDEN_ACTS:
    raise _problem(source, f"config.json hidden_act={act!r}; supported: "
                   f"{sorted(HIDDEN_ACTS)}")
  mean_pooling = "layernorm.weight" not in state and "layernorm.gamma" not in state
  if "use_mean_pooling" in config and bool(config["use_mean_pooling"]) != mean_pooling:
    raise _problem(source, f"config.json says use_mean_pooling="
                   f"{config['use_mean_pooling']} but the weights "
                   f"{'lack' if mean_pooling else 'have'} the final layernorm")
  head = state.get("classifier.weight")
  return dict(
      num_classes=None if head is None else int(head.shape[0]),
      patch_size=(int(ph), int(pw)), tubelet_size=int(ts), width=int(width),
      depth=depth, num_heads=num_heads,
      mlp_dim=int(state["encoder.layer.0.intermediate.dense.weight"].shape[0]),
      use_mean_pooling=mean_pooling,
      ln_eps=float(config.get("layer_norm_eps", DEFAULT_LN_EPS)),
      gelu_approximate=HIDDEN_ACTS[act],
      image_size=vit.pair(config.get("image_size", 224)),
      num_frames=int(config.get("num_frames", 16)))


def _qv_bias_flag(config: Mapping) -> bool:
  """transformers 4.x writes ``qkv_bias``, 5.x ``qv_bias``; both mean q and v biases."""
  return bool(config.get("qv_bias", config.get("qkv_bias", True)))


def canonicalize(config: Mapping, state: Mapping, source="checkpoint") -> tuple[dict, dict]:
  """``(flat canonical params, Model kwargs)`` from a transformers config and state
  dict. Keys it does not know raise ``ValueError`` naming them."""
  kwargs = infer_architecture(config, state, source)
  stored = {}
  state = _strip(state, stored)
  heads, width = kwargs["num_heads"], kwargs["width"]
  flat, unknown = {}, []
  for key, a in state.items():
    module, _, name = key.rpartition(".")
    m = _LAYER_RE.match(module + ".")
    if name in ("q_bias", "v_bias") and m:
      attn = f"Transformer/encoderblock_{m.group(1)}/MultiHeadDotProductAttention_0"
      flat[f"{attn}/{'query' if name == 'q_bias' else 'value'}/bias"] = \
          a.reshape(heads, -1)
      continue
    m = _LAYER_RE.match(module)
    if m and m.group(2) in _LAYER_MAP:
      path, kind = _LAYER_MAP[m.group(2)]
      path = f"Transformer/encoderblock_{m.group(1)}/{path}"
    elif module in _TOP_MAP:
      path, kind = _TOP_MAP[module]
    else:
      unknown.append(key)
      continue
    if kind == "in" and name == "bias":
      unknown.append(key)  # transformers keeps the q / v biases apart (q_bias, v_bias)
      continue
    leaf, value = _leaf(kind, name, a, heads)
    flat[f"{path}/{leaf}"] = value
  if unknown:
    raise _problem(source, "keys a VideoMAE encoder does not have: "
                   f"{sorted(stored[k] for k in unknown)[:8]}")
  has_bias = any(k.endswith("query/bias") for k in flat)
  if _qv_bias_flag(config) != has_bias:
    raise _problem(source, f"config.json says qkv_bias / qv_bias={_qv_bias_flag(config)} "
                   f"but the weights {'have' if has_bias else 'lack'} q_bias / v_bias")
  if not has_bias:  # no q / v biases at all: zeros compute the same
    for i in range(kwargs["depth"]):
      for proj in ("query", "value"):
        flat[f"Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/{proj}/bias"] = \
            np.zeros((heads, width // heads), np.float32)
  return flat, kwargs


def load_files(config_path, weight_paths, *, merge=None, image_size=None,
               num_frames=None, source=None, **overrides):
  """``(model, params)`` from a ``config.json`` and its safetensors file(s)."""
  source = source or os.fspath(pathlib.Path(config_path).parent)
  flat, kwargs = canonicalize(read_config(config_path), read_weights(weight_paths), source)
  if image_size is not None:
    kwargs["image_size"] = vit.pair(image_size)
  if num_frames is not None:
    kwargs["num_frames"] = int(num_frames)
  model = Model(merge=merge, **{**kwargs, **overrides})
  # The ViT loader's check: every key present, of the model's shape, cast, stacked
  # for scan=True. Its probe input is (1, *input_shape, 3): here (1, T, H, W, 3).
  shape = (model.num_frames, *model.image_size)
  return model, checkpoints._fit(flat, model, shape, source)  # pylint: disable=protected-access


def load_model(folder, *, merge=None, image_size=None, num_frames=None, **overrides):
  """``(model, params)`` from a transformers VideoMAE folder (``config.json`` +
  ``model.safetensors``). ``image_size`` / ``num_frames`` change only the model's
  default input (the sinusoid table fits any); ``overrides`` are ``Model``
  attributes (``dtype_mm``, ``scan``, ...). Raises ``ValueError`` naming the file
  and what was expected."""
  config, weights = find_files(folder)
  return load_files(config, weights, merge=merge, image_size=image_size,
                    num_frames=num_frames, source=os.fspath(folder), **overrides)


def hub_urls(name_or_repo: str) -> dict:
  """``{file: url}`` of a :data:`KNOWN_FOLDERS` name's (or a hub repo's) config and
  weights."""
  repo = KNOWN_FOLDERS.get(name_or_repo, name_or_repo)
  return {f: HUB.format(repo=repo, file=f) for f in (CONFIG_FILE, WEIGHTS_FILE)}


def to_transformers(params, model) -> dict:
  """The inverse of :func:`canonicalize`: a transformers state dict (NumPy)."""
  flat = checkpoints._flatten(params)  # pylint: disable=protected-access
  flat = {k: np.asarray(v, np.float32) for k, v in flat.items()}
  top = "videomae." if model.num_classes else ""
  sd = {}
  inv_top = {v[0]: k for k, v in _TOP_MAP.items()}
  inv_layer = {v[0]: k for k, v in _LAYER_MAP.items()}
  for key, a in flat.items():
    path, _, leaf = key.rpartition("/")
    m = re.match(r"^Transformer/encoderblock_(\d+)/(.+)$", path)
    if m:
      sub = m.group(2)
      module, kind = f"encoder.layer.{m.group(1)}.{inv_layer[sub]}", _LAYER_MAP[inv_layer[sub]][1]
    else:
      module, kind = inv_top[path], _TOP_MAP[inv_top[path]][1]
    prefix = "" if module in ("fc_norm", "classifier") else top
    if kind == "in" and leaf == "bias":
      name = {"query": "q_bias", "value": "v_bias"}[sub.rpartition("/")[2]]
      sd[f"{prefix}{module.rpartition('.')[0]}.{name}"] = a.reshape(-1)
      continue
    if kind == "norm":
      name = {"scale": "weight", "bias": "bias"}[leaf]
    elif leaf == "bias":
      name = "bias"
    else:
      name = "weight"
      if kind == "conv":
        a = a.transpose(4, 3, 0, 1, 2)
      elif kind == "dense":
        a = a.T
      elif kind == "in":
        a = a.reshape(a.shape[0], -1).T
      else:
        a = a.reshape(-1, a.shape[-1]).T
    sd[f"{prefix}{module}.{name}"] = np.ascontiguousarray(a)
  return sd


def save_transformers(params, folder, model, *, bias_flag: str = "qkv_bias",
                      config: Optional[Mapping] = None) -> pathlib.Path:
  """Writes ``params`` of ``model`` as a transformers VideoMAE folder
  (``config.json`` + ``model.safetensors``), the layout :func:`load_model` reads.
  ``bias_flag``: ``"qkv_bias"`` (transformers 4.x files) or ``"qv_bias"`` (5.x);
  ``config`` entries are added to (or replace) the written config."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  if bias_flag not in ("qkv_bias", "qv_bias"):
    raise ValueError(f"bias_flag must be 'qkv_bias' or 'qv_bias'; got {bias_flag!r}")
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  act = {v: k for k, v in reversed(list(HIDDEN_ACTS.items()))}[model.gelu_approximate]
  cfg = {
      "model_type": "videomae",
      "architectures": ["VideoMAEForVideoClassification" if model.num_classes
                        else "VideoMAEModel"],
      "image_size": int(model.image_size[0]), "patch_size": int(model.patch_size[0]),
      "num_channels": 3, "num_frames": int(model.num_frames),
      "tubelet_size": int(model.tubelet_size), "hidden_size": int(model.width),
      "num_hidden_layers": int(model.depth), "num_attention_heads": int(model.num_heads),
      "intermediate_size": int(model.mlp_dim or 4 * model.width), "hidden_act": act,
      "layer_norm_eps": float(model.ln_eps), bias_flag: True,
      "use_mean_pooling": bool(model.use_mean_pooling),
  }
  if model.num_classes:
    cfg["id2label"] = {str(i): f"class_{i}" for i in range(model.num_classes)}
  cfg.update(config or {})
  (folder / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
  save_file(to_transformers(params, model), str(folder / WEIGHTS_FILE))
  return folder
