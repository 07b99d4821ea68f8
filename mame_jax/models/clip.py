"""CLIP (Radford et al., 2021) from transformers folders, run by this project's towers.

A Hugging Face ``CLIPModel`` folder (``config.json`` + ``model.safetensors``, as
``save_pretrained`` writes it; e.g. ``openai/clip-vit-large-patch14``,
``-base-patch16``, ``clip-vit-large-patch14-336``) holds:

    vision_model.embeddings.class_embedding (D,)
    vision_model.embeddings.patch_embedding.weight (D, 3, p, p)      no bias
    vision_model.embeddings.position_embedding.weight (1 + h*w, D)   class slot first
    vision_model.pre_layrnorm.{weight, bias}                         (sic)
    vision_model.encoder.layers.{i}.{layer_norm1, self_attn.{q,k,v,out}_proj,
                                     layer_norm2, mlp.fc1, mlp.fc2}.{weight, bias}
    vision_model.post_layernorm.{weight, bias}
    visual_projection.weight (E, D)                                  no bias
    text_model.embeddings.token_embedding.weight (V, D)
    text_model.embeddings.position_embedding.weight (L, D)
    text_model.encoder.layers.{i}...                                 as above
    text_model.final_layer_norm.{weight, bias}
    text_projection.weight (E, D)                                    no bias
    logit_scale ()                                                   log of the logit scale

:func:`load_model` maps it onto the project's models, so that the image tower is a
``vit.Model`` whose blocks carry the one merge hook (MaMe / ToMe work in it as in
every ViT) and the two towers are a ``two_towers.Model``:
``zimg, ztxt, out = model.apply({"params": params}, images, texts)`` with
``out["t"] = exp(logit_scale)`` and no bias; the logits are
``zimg @ ztxt.T * out["t"]`` (``two_towers.logits``) and CLIP was trained with a
softmax over them (``two_towers.Model.activation = "softmax"``).

What CLIP does differently, and how each is followed exactly:

* image side: the class token and the patches get position embeddings together,
  so the class slot is folded into ``cls`` (``cls + pos[0]``, what the model adds)
  and ``pos_embedding`` keeps the patch rows; the patch convolution has no bias
  (a zero one computes the same); the pre-encoder LayerNorm is ``vit.Model``'s
  ``pre_norm``; ``post_layernorm`` is applied to the class token only, which equals
  ``encoder_norm`` on every token followed by ``pool_type="tok"``; the projection
  is the ``head`` with a zero bias.
* text side: causal self-attention, ``final_layer_norm`` as ``encoder_norm``, and
  pooling at the end-of-text token by the rule of the installed transformers'
  ``CLIPTextTransformer``: configs with the legacy ``eos_token_id == 2`` (OpenAI's
  files) pool at the largest id (the end-of-text token is the vocabulary's last),
  others at the first position holding ``eos_token_id`` (``text.POOL_TYPES``).
  Texts of any length from 1 to ``max_position_embeddings`` (77 for OpenAI's)
  are taken, with position ids ``0..L-1``, as ``CLIPTextModel`` takes them
  (``text.Model(fixed_length=False)``): ids padded to the longest text of a batch
  give each text the embedding it has alone; longer texts are an error.
* both: LayerNorm eps from ``layer_norm_eps`` (1e-5), the MLP activation from
  ``hidden_act`` (``quick_gelu`` for OpenAI's, ``gelu`` for others), heads from
  ``num_attention_heads``.
* images arrive in [-1, 1] as everywhere here and are mapped to CLIP's
  mean / std inside the model (``input_norm``; the folder's
  ``preprocessor_config.json`` wins when present); the resize and crop are
  ``mame_jax.eval.data``'s ``"clip"`` preprocessing.

Nothing is ever unpickled: a folder with only ``pytorch_model.bin`` is refused
(``checkpoints.transformers_files``).
"""

from __future__ import annotations

import os
import pathlib
import re
from typing import Mapping, Optional

import jax.numpy as jnp
import numpy as np

from mame_jax.models import checkpoints, siglip, text, two_towers, vit

# OpenAI CLIP's pixel statistics (transformers' OPENAI_CLIP_MEAN / _STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_LN_EPS = 1e-5
DEFAULT_EOS = 49407  # transformers' CLIPTextConfig.eos_token_id
LEGACY_EOS = 2       # OpenAI's configs: pool at argmax(ids)
MODEL_TYPES = ("clip", "clip_vision_model")
PREPROCESSOR_FILE = "preprocessor_config.json"
TOKENIZER_FILE = "tokenizer.json"
# hidden_act -> (vit activation, gelu_approximate)
HIDDEN_ACTS = {"quick_gelu": ("quick_gelu", False), "gelu": ("gelu", False),
               "gelu_new": ("gelu", True), "gelu_pytorch_tanh": ("gelu", True)}
# Public CLIPModel folders (the paper's Table 3 model and LLaVA-1.5's encoder).
HUB = "https://huggingface.co/{repo}/resolve/main/{file}"
KNOWN_FOLDERS = {
    "clip_l14": "openai/clip-vit-large-patch14",
    "clip_l14_336": "openai/clip-vit-large-patch14-336",
    "clip_b16": "openai/clip-vit-base-patch16",
}
TOWERS = ("both", "img", "txt")

_ATTN = "MultiHeadDotProductAttention_0"
_LAYER_RE = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")
# Inside a transformers CLIPEncoderLayer -> (canonical path inside encoderblock_{i}, kind).
_LAYER_MAP = {
    "layer_norm1": ("LayerNorm_0", "norm"),
    "self_attn.q_proj": (f"{_ATTN}/query", "in"),
    "self_attn.k_proj": (f"{_ATTN}/key", "in"),
    "self_attn.v_proj": (f"{_ATTN}/value", "in"),
    "self_attn.out_proj": (f"{_ATTN}/out", "out"),
    "layer_norm2": ("LayerNorm_1", "norm"),
    "mlp.fc1": ("MlpBlock_0/Dense_0", "dense"),
    "mlp.fc2": ("MlpBlock_0/Dense_1", "dense"),
}
# Buffers some transformers versions saved; they are arange()s, not weights.
_IGNORED = ("vision_model.embeddings.position_ids", "text_model.embeddings.position_ids")


def _problem(source, what) -> ValueError:
  return ValueError(f"{source}: {what}")


# ------------------------------------------------------------------------------------
# config.json


def read_config(path) -> dict:
  """``config.json`` as a dict; ``ValueError`` naming the file unless it is a CLIP
  config (``model_type`` ``"clip"``, or ``"clip_vision_model"`` for an image tower
  alone)."""
  config = checkpoints.read_json(path)
  kind = config.get("model_type")
  if kind not in MODEL_TYPES:
    raise _problem(path, f"model_type is {kind!r}, expected one of {MODEL_TYPES}: not a "
                   "transformers CLIP folder")
  return config


def is_clip_folder(folder) -> bool:
  """Whether ``folder`` holds a ``config.json`` of a CLIP model."""
  return checkpoints.folder_model_type(folder) in MODEL_TYPES


def _tower_configs(config: Mapping) -> tuple[dict, dict]:
  """``(vision config, text config)`` of a CLIP or CLIP-vision config."""
  if config.get("model_type") == "clip_vision_model":
    return dict(config), {}
  return dict(config.get("vision_config") or {}), dict(config.get("text_config") or {})


def _activation(cfg: Mapping, source, tower) -> dict:
  act = cfg.get("hidden_act", "quick_gelu")
  if act not in HIDDEN_ACTS:
    raise _problem(source, f"config.json {tower}_config.hidden_act={act!r}; supported: "
                   f"{sorted(HIDDEN_ACTS)}")
  activation, approximate = HIDDEN_ACTS[act]
  return dict(activation=activation, gelu_approximate=approximate)


# ------------------------------------------------------------------------------------
# state dict -> canonical, per tower


def _split(state: Mapping, source) -> dict:
  """``{"img": {...}, "txt": {...}, "visual_projection": a, ...}`` by prefix."""
  out = {"img": {}, "txt": {}}
  unknown = []
  for key, a in state.items():
    if key in _IGNORED:
      continue
    a = np.asarray(a)
    if key.startswith("vision_model."):
      out["img"][key[len("vision_model."):]] = a
    elif key.startswith("text_model."):
      out["txt"][key[len("text_model."):]] = a
    elif key in ("visual_projection.weight", "text_projection.weight", "logit_scale"):
      out[key] = a
    else:
      unknown.append(key)
  if "embeddings.patch_embedding.weight" not in out["img"]:
    shown = sorted(state)[:5]
    raise _problem(source, "no vision_model.embeddings.patch_embedding.weight: not a "
                   f"transformers CLIP state dict (keys: {shown})")
  if unknown:
    raise _problem(source, f"keys a CLIP model does not have: {sorted(unknown)[:8]}")
  return out


def _blocks(sub: Mapping, prefix: str, heads: int, source, tower) -> tuple[dict, list, int]:
  """The encoder layers of one tower -> canonical ``{prefix}/encoderblock_{i}/...``,
  the keys left over, and the depth."""
  flat, rest, layers = {}, [], set()
  for key, a in sub.items():
    module, _, name = key.rpartition(".")
    m = _LAYER_RE.match(module)
    if m and m.group(2) in _LAYER_MAP:
      path, kind = _LAYER_MAP[m.group(2)]
      leaf, value = checkpoints.torch_leaf(kind, name, a, heads)
      flat[f"{prefix}/encoderblock_{m.group(1)}/{path}/{leaf}"] = value
      layers.add(int(m.group(1)))
    else:
      rest.append(key)
  depth = max(layers) + 1 if layers else 0
  if layers != set(range(depth)) or depth == 0:
    raise _problem(source, f"{tower} encoder layers {sorted(layers)}: expected 0..depth-1")
  return flat, rest, depth


def _heads(cfg: Mapping, width: int, source, tower) -> int:
  heads = int(cfg.get("num_attention_heads", max(1, width // 64)))
  if width % heads:
    raise _problem(source, f"{tower} hidden size {width} is not divisible by "
                   f"num_attention_heads={heads}")
  for key, value in (("hidden_size", width),):
    if key in cfg and int(cfg[key]) != value:
      raise _problem(source, f"config.json {tower}_config.{key}={cfg[key]} but the "
                     f"weights have {value}")
  return heads


def _check_depth(cfg, depth, source, tower):
  if "num_hidden_layers" in cfg and int(cfg["num_hidden_layers"]) != depth:
    raise _problem(source, f"config.json {tower}_config.num_hidden_layers="
                   f"{cfg['num_hidden_layers']} but the weights have {depth} layers")


def _norm(sub, name, path, flat, used):
  for torch_name, leaf in (("weight", "scale"), ("bias", "bias")):
    flat[f"{path}/{leaf}"] = sub[f"{name}.{torch_name}"]
    used.add(f"{name}.{torch_name}")


def canonical_image(config: Mapping, parts: Mapping, source="checkpoint",
                    input_norm=(CLIP_MEAN, CLIP_STD)) -> tuple[dict, dict]:
  """``(flat canonical params, vit.Model kwargs)`` of the image tower."""
  vcfg, _ = _tower_configs(config)
  sub = parts["img"]
  proj = sub["embeddings.patch_embedding.weight"]
  if proj.ndim != 4 or proj.shape[1] != 3:
    raise _problem(source, f"vision_model.embeddings.patch_embedding.weight has shape "
                   f"{proj.shape}; expected (D, 3, p, p)")
  width, _, ph, pw = proj.shape
  heads = _heads(vcfg, width, source, "vision")
  flat, rest, depth = _blocks(sub, "Transformer", heads, source, "vision")
  _check_depth(vcfg, depth, source, "vision")
  used = {"embeddings.patch_embedding.weight"}
  flat["embedding/kernel"] = checkpoints.torch_leaf("conv", "weight", proj, heads)[1]
  flat["embedding/bias"] = np.zeros((width,), proj.dtype)  # CLIP's conv has none
  try:
    cls = sub["embeddings.class_embedding"]
    pos = sub["embeddings.position_embedding.weight"]
    used |= {"embeddings.class_embedding", "embeddings.position_embedding.weight"}
    _norm(sub, "pre_layrnorm", "pre_norm", flat, used)
    _norm(sub, "post_layernorm", "Transformer/encoder_norm", flat, used)
  except KeyError as e:
    raise _problem(source, f"no vision_model.{e.args[0]}: not a CLIP image tower") from e
  side = int(round(np.sqrt(pos.shape[0] - 1)))
  if side * side != pos.shape[0] - 1:
    raise _problem(source, f"vision_model.embeddings.position_embedding has {pos.shape[0]} "
                   "rows; expected 1 + a square number of patches")
  # The class slot is added to the class token once here: the same network.
  flat["cls"] = (cls + pos[0]).reshape(1, 1, width)
  flat["pos_embedding"] = pos[None, 1:]
  leftover = [k for k in rest if k not in used]
  if leftover:
    raise _problem(source, "keys a CLIP image tower does not have: "
                   f"{sorted('vision_model.' + k for k in leftover)[:8]}")
  kw = dict(patch_size=(int(ph), int(pw)), width=int(width), depth=depth, num_heads=heads,
            mlp_dim=int(flat["Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"].shape[1]),
            pool_type="tok", class_token=True, pre_norm=True,
            ln_eps=float(vcfg.get("layer_norm_eps", DEFAULT_LN_EPS)),
            input_norm=input_norm, **_activation(vcfg, source, "vision"))
  image_size = side * int(ph)
  if "image_size" in vcfg and int(vcfg["image_size"]) != image_size:
    raise _problem(source, f"config.json vision_config.image_size={vcfg['image_size']} but "
                   f"the position embeddings are a {side}x{side} grid of {ph} px patches "
                   f"({image_size} px)")
  if "visual_projection.weight" in parts:
    flat["head/kernel"] = parts["visual_projection.weight"].T
    flat["head/bias"] = np.zeros((parts["visual_projection.weight"].shape[0],), np.float32)
    kw["num_classes"] = int(parts["visual_projection.weight"].shape[0])
  return flat, kw


def canonical_text(config: Mapping, parts: Mapping, source="checkpoint") -> tuple[dict, dict]:
  """``(flat canonical params, text.Model kwargs)`` of the text tower."""
  _, tcfg = _tower_configs(config)
  sub = parts["txt"]
  if "embeddings.token_embedding.weight" not in sub:
    raise _problem(source, "no text tower: expected text_model.embeddings.token_embedding."
                   "weight (a CLIPModel folder; this one holds the image tower only: "
                   "load it with tower='img')")
  vocab, width = sub["embeddings.token_embedding.weight"].shape
  heads = _heads(tcfg, width, source, "text")
  flat, rest, depth = _blocks(sub, siglip.TEXT_ENCODER, heads, source, "text")
  _check_depth(tcfg, depth, source, "text")
  used = {"embeddings.token_embedding.weight", "embeddings.position_embedding.weight"}
  flat["Embed_0/embedding"] = sub["embeddings.token_embedding.weight"]
  try:
    flat["pos_embedding"] = sub["embeddings.position_embedding.weight"][None]
    _norm(sub, "final_layer_norm", f"{siglip.TEXT_ENCODER}/encoder_norm", flat, used)
  except KeyError as e:
    raise _problem(source, f"no text_model.{e.args[0]}: not a CLIP text tower") from e
  leftover = [k for k in rest if k not in used]
  if leftover:
    raise _problem(source, "keys a CLIP text tower does not have: "
                   f"{sorted('text_model.' + k for k in leftover)[:8]}")
  if "vocab_size" in tcfg and int(tcfg["vocab_size"]) != vocab:
    raise _problem(source, f"config.json text_config.vocab_size={tcfg['vocab_size']} but "
                   f"the token embedding has {vocab} rows")
  eos = int(tcfg.get("eos_token_id", DEFAULT_EOS))
  kw = dict(width=int(width), depth=depth, num_heads=heads, vocab_size=int(vocab),
            mlp_dim=int(flat[f"{siglip.TEXT_ENCODER}/encoderblock_0/MlpBlock_0/Dense_0/"
                             "kernel"].shape[1]),
            max_len=int(flat["pos_embedding"].shape[1]), fixed_length=False, causal=True,
            pool_type="argmax" if eos == LEGACY_EOS else "eos", eos_id=eos,
            ln_eps=float(tcfg.get("layer_norm_eps", DEFAULT_LN_EPS)),
            **_activation(tcfg, source, "text"))
  if "text_projection.weight" in parts:
    flat["head/kernel"] = parts["text_projection.weight"].T
    flat["head/bias"] = np.zeros((parts["text_projection.weight"].shape[0],), np.float32)
    kw["num_classes"] = int(parts["text_projection.weight"].shape[0])
  return flat, kw


def infer_architecture(config: Mapping, state: Mapping, source="checkpoint") -> dict:
  """``{"img": vit.Model kwargs, "txt": text.Model kwargs | None, "image_size": S}``
  from ``config.json`` and the state dict's shapes (width, patch, depth, MLP width,
  vocabulary, text length and projection size come from the weights; heads,
  LayerNorm eps, activation and the end-of-text id from the config)."""
  parts = _split(state, source)
  img_flat, img_kw = canonical_image(config, parts, source)
  txt_kw = canonical_text(config, parts, source)[1] if parts["txt"] else None
  side = int(np.sqrt(img_flat["pos_embedding"].shape[1])) * img_kw["patch_size"][0]
  return {"img": img_kw, "txt": txt_kw, "image_size": side}


def _input_norm(folder) -> tuple:
  """The folder's ``preprocessor_config.json`` mean / std, else OpenAI's."""
  path = pathlib.Path(folder) / PREPROCESSOR_FILE if folder is not None else None
  if path is None or not path.is_file():
    return (CLIP_MEAN, CLIP_STD)
  cfg = checkpoints.read_json(path)
  mean, std = cfg.get("image_mean", CLIP_MEAN), cfg.get("image_std", CLIP_STD)
  if len(mean) != 3 or len(std) != 3:
    raise _problem(path, f"image_mean / image_std must have 3 entries; got {mean}, {std}")
  return (tuple(float(v) for v in mean), tuple(float(v) for v in std))


# ------------------------------------------------------------------------------------
# Loading.


def load_files(config_path, weight_paths, *, tower: str = "both", merge=None,
               image_size=None, img_overrides: Optional[dict] = None,
               txt_overrides: Optional[dict] = None, source=None, folder=None,
               **overrides):
  """``(model, params)`` from a CLIP ``config.json`` and its safetensors file(s);
  see :func:`load_model`."""
  source = source or os.fspath(pathlib.Path(config_path).parent)
  if tower not in TOWERS:
    raise ValueError(f"tower must be one of {TOWERS}; got {tower!r}")
  if merge is not None and tower == "txt":
    raise ValueError("merge applies to the image tower; the text tower has none")
  config = read_config(config_path)
  parts = _split(checkpoints.read_transformers_weights(weight_paths), source)
  img_kw, txt_kw = siglip._split_overrides(overrides, img_overrides, txt_overrides)  # pylint: disable=protected-access

  def text_tower():
    flat, kw = canonical_text(config, parts, source)
    model = text.Model(**{**kw, **txt_kw})
    return model, siglip._fit_text(flat, model.clone(normalize=False), source)  # pylint: disable=protected-access

  if tower == "txt":
    model, params = text_tower()
    return model, params
  flat, kw = canonical_image(config, parts, source, _input_norm(folder))
  img_model = vit.Model(merge=merge, **{**kw, **img_kw})
  size = vit.pair(image_size or (math_side(flat) * kw["patch_size"][0]))
  img_params = checkpoints._fit(flat, img_model, size, f"{source} (image tower)")  # pylint: disable=protected-access
  if tower == "img":
    return img_model, img_params
  if "logit_scale" not in parts:
    raise _problem(source, "no logit_scale: tower='both' needs a CLIPModel folder "
                   "(this one holds no two towers; load it with tower='img')")
  txt_model, txt_params = text_tower()
  scale = np.asarray(parts["logit_scale"], np.float32).reshape(-1)
  if scale.shape != (1,):
    raise _problem(source, f"logit_scale has shape {parts['logit_scale'].shape}; expected ()")
  model = two_towers.Model(img=img_model, txt=txt_model.clone(normalize=False),
                           bias_init=None, activation="softmax")
  return model, {"img": img_params, "txt": txt_params, "t": jnp.asarray(scale)}


def math_side(flat) -> int:
  """The side of the (square) patch grid of canonical image params."""
  return int(round(np.sqrt(flat["pos_embedding"].shape[1])))


def load_model(folder, *, tower: str = "both", merge=None, image_size=None, **overrides):
  """``(model, params)`` from a transformers CLIP folder.

  Args:
    folder: holding ``config.json`` and ``model.safetensors`` (or a sharded index);
      ``preprocessor_config.json``, when there, gives the pixel mean / std.
    tower: ``"both"`` (a ``two_towers.Model``, params ``{img, txt, t}``),
      ``"img"`` (the image tower alone, a ``vit.Model`` returning the projected
      embedding, unnormalised) or ``"txt"`` (the text tower, L2-normalised output).
    merge: the image tower's ``MergeConfig`` / ``ToMeConfig`` (class token kept:
      ``num_special = 1``).
    image_size: the image tower's resolution (position embeddings resampled).
    **overrides: model attributes, as ``siglip.load_model`` takes them
      (``img_overrides`` / ``txt_overrides`` for one tower).

  Raises ``ValueError`` naming the file and what was expected for a folder that is
  not CLIP, holds only pickles, or does not fit.
  """
  config, weights = checkpoints.transformers_files(folder, "CLIP", "CLIPModel")
  return load_files(config, weights, tower=tower, merge=merge, image_size=image_size,
                    source=os.fspath(folder), folder=folder, **overrides)


def hub_urls(name_or_repo: str) -> dict:
  """``{file: url}`` of a :data:`KNOWN_FOLDERS` name's (or a hub repo's) config,
  weights and tokenizer."""
  repo = KNOWN_FOLDERS.get(name_or_repo, name_or_repo)
  return {f: HUB.format(repo=repo, file=f) for f in (
      checkpoints.TRANSFORMERS_CONFIG, checkpoints.TRANSFORMERS_WEIGHTS, TOKENIZER_FILE)}


def tokenizer_file(source, *, cache_dir=None) -> pathlib.Path:
  """The ``tokenizer.json`` behind ``source``: the file itself, the one in a CLIP
  folder, or a :data:`KNOWN_FOLDERS` name's (downloaded once into the cache)."""
  path = pathlib.Path(os.fspath(source))
  if path.is_dir():
    path = path / TOKENIZER_FILE
  if path.is_file():
    return path
  if isinstance(source, str) and source in KNOWN_FOLDERS:
    from mame_jax.models import load  # pylint: disable=import-outside-toplevel
    return load.download(hub_urls(source)[TOKENIZER_FILE], cache_dir=cache_dir)
  raise FileNotFoundError(f"CLIP tokenizer {os.fspath(source)!r}: no such file; expected "
                          f"a {TOKENIZER_FILE}, a CLIP folder holding one or a known name: "
                          f"{', '.join(sorted(KNOWN_FOLDERS))}")
