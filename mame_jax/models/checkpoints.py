"""Checkpoint formats for ``mame_jax.models.vit``: reading, writing, architecture inference.

Every format is read into one *canonical* form: a flat dict of NumPy arrays whose keys
are the ``/``-joined paths of the unscanned, current big_vision tree, exactly what
``vit.Model(scan=False).init`` creates (``embedding/kernel``, ``cls``, ``pos_embedding``
without a class slot, ``Transformer/encoderblock_{i}/...``, ``head/kernel``, ...).

Formats read (the file's content decides, not its name):

* big_vision / AugReg ``.npz``, flat ``/``-joined keys, loaded with
  ``allow_pickle=False``:
    - current layout;
    - old AugReg layout: ``Transformer/posembed_input/pos_embedding (1, 1+h*w, D)``
      (also ``Transformer/pos_embedding``), whose class slot is folded into the class
      token (``cls + posemb[:, :1]``, which is what the old model added to it), and
      pre-linen block names ``LayerNorm_0, MultiHeadDotProductAttention_1,
      LayerNorm_2, MlpBlock_3``;
    - scanned: one ``Transformer/encoderblock/...`` subtree with a leading layer axis,
      unstacked into ``encoderblock_{i}`` so that blocks can merge (``load_model(...,
      scan=True)`` stacks them again);
    - wrappers: bare (AugReg), ``params/...`` (SigLIP; when the tree holds
      ``img/...`` the image tower is taken and ``txt``, ``t``, ``b`` are ignored) and
      ``opt/target/...`` (optimizer state beside it is ignored);
    - ``meta/...``: model attributes that the weights cannot show, written by
      ``convert`` / ``save_npz(meta=...)``: ``meta/gelu_approximate`` (bool scalar)
      and ``meta/input_norm`` (float64 ``(2, C)``: mean row, std row).
* timm ViT (DeiT, MAE, DINOv2) state dicts: ``.safetensors`` (the ``safetensors`` package,
  NumPy backend) or PyTorch ``.pth`` (only through ``torch.load(...,
  weights_only=True)``, and only when torch is importable). A timm model always gets
  exact (erf) GELU and ImageNet ``input_norm``, since timm feeds the weights
  ImageNet-normalised pixels while ``vit.Model`` takes [-1, 1]. DINOv2's extras map
  onto ``vit.Model``'s: ``blocks.{i}.ls1.gamma`` / ``ls2.gamma`` -> LayerScale,
  ``reg_token`` -> ``registers``; their position embeddings are resampled by
  timm's own rule for them (antialiased bicubic, :func:`resampling`).

Architecture inference (``infer_architecture``) reads everything from shapes: width,
patch size, depth, mlp_dim, heads (the query kernel ``(D, heads, head_dim)``), image
size (position-embedding grid side x patch), class token, pooling (``MAPHead_0`` ->
``map``; ``fc_norm`` -> ``gap`` + ``fc_norm``; a class token -> ``tok``; else ``gap``),
``num_classes`` (``head``; ``None`` without one) and ``rep_size`` (``pre_logits``).
timm does not store the head count: it comes from the standard table
``TIMM_NUM_HEADS`` (``width // 64`` for other widths) unless ``num_heads`` is given.
"""

from __future__ import annotations

import math
import os
import re
import zipfile
from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mame_jax.models import vit

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Heads of the standard timm ViTs (Ti, S, B, L, H) by width; not stored in their weights.
TIMM_NUM_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}

_ATTN = "MultiHeadDotProductAttention_0"
_BLOCK_RE = re.compile(r"^Transformer/encoderblock_(\d+)/")
# Pre-linen (old AugReg) module numbering inside a block -> linen numbering.
_PRE_LINEN = {"LayerNorm_0": "LayerNorm_0", "MultiHeadDotProductAttention_1": _ATTN,
              "LayerNorm_2": "LayerNorm_1", "MlpBlock_3": "MlpBlock_0"}


# ------------------------------------------------------------------------------------
# Files -> flat dicts of arrays.


def _sniff(path: str) -> str:
  """``"npz"``, ``"safetensors"`` or ``"pth"`` from the file's first bytes."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(16)
  if head[:2] == b"PK":  # a zip archive: .npz, or a PyTorch >= 1.6 .pth
    try:
      with zipfile.ZipFile(path) as z:
        names = z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
      raise ValueError(f"{path}: zip archive (.npz / .pth) that cannot be opened, "
                       f"probably truncated or corrupt ({e})") from e
    if any(n.endswith(".npy") for n in names):
      return "npz"
    if any(n.endswith("data.pkl") for n in names):
      return "pth"
    raise ValueError(f"{path}: zip archive holding neither .npy arrays nor a PyTorch "
                     "state dict; not a checkpoint")
  if len(head) >= 9 and head[8:9] == b"{":  # safetensors: u64 header length, JSON
    if 8 + int.from_bytes(head[:8], "little") > size:
      raise ValueError(f"{path}: safetensors file shorter than its header says; "
                       "probably truncated")
    return "safetensors"
  if head[:1] == b"\x80":  # a pickle: PyTorch's legacy .pth
    return "pth"
  raise ValueError(f"{path} is not a checkpoint: expected a big_vision .npz, a "
                   ".safetensors or a PyTorch .pth file")


# Globals a plain state dict's pickle may name: torch's own (tensor rebuilders,
# storages, dtypes, Size, Parameter -- torch.load(weights_only=True) has the final
# word on those) and the few builtins that torch.save writes for dicts and bytes.
# Anything else (argparse.Namespace from a training script's `args`, NumPy
# scalars, a class from __main__) means the file holds more than weights.
_SAFE_PICKLE_GLOBALS = {("collections", "OrderedDict"), ("collections", "Counter"),
                        ("_codecs", "encode"), ("builtins", "set"),
                        ("builtins", "frozenset"), ("builtins", "bytearray"),
                        ("builtins", "complex"), ("builtins", "slice")}
_PICKLE_STRINGS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE",
                   "SHORT_BINSTRING", "BINSTRING", "STRING"}


def _pickle_globals(f, max_pickles: int = 4) -> list:
  """``(module, name)`` of every global the pickle(s) in ``f`` would import, read
  with ``pickletools.genops`` -- a disassembler that only parses opcodes, so
  nothing is imported or executed. A legacy ``.pth`` is several pickles in a
  row (magic, protocol, sys info, the object, then storage keys and raw storage
  bytes): the first ``max_pickles`` are scanned -- the raw bytes never are --
  and the scan stops at the first thing that does not parse. ``STACK_GLOBAL`` (protocol 4+) takes its two
  names from the strings pushed before it, also through the memo."""
  import pickletools  # pylint: disable=import-outside-toplevel
  found = []
  for _ in range(max_pickles):
    strings, memo = [], {}
    try:
      for op, arg, _ in pickletools.genops(f):
        if op.name == "GLOBAL" or op.name == "INST":
          module, _, name = str(arg).partition(" ")
          found.append((module, name))
        elif op.name in _PICKLE_STRINGS:
          strings.append(arg)
        elif op.name == "MEMOIZE":
          memo[len(memo)] = strings[-1] if strings else None
        elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
          memo[arg] = strings[-1] if strings else None
        elif op.name in ("BINGET", "LONG_BINGET", "GET"):
          strings.append(memo.get(arg))
        elif op.name == "STACK_GLOBAL":
          module, name = strings[-2:] if len(strings) >= 2 else (None, None)
          if isinstance(module, str) and isinstance(name, str):  # else torch.load judges
            found.append((module, name))
    except Exception:  # pylint: disable=broad-except  # not (or no more) pickle data
      break
  return found


def _unsafe_globals(path: str) -> list:
  """The ``module.name`` globals in ``path``'s pickle that a plain state dict
  has no use for (see ``_SAFE_PICKLE_GLOBALS``); ``[]`` when there are none or
  the pickle cannot be parsed (then ``torch.load`` judges)."""
  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as z:
      pkl = [n for n in z.namelist() if n.endswith("data.pkl")]
      if not pkl:
        return []
      with z.open(pkl[0]) as f:
        found = _pickle_globals(f)
  else:
    with open(path, "rb") as f:
      found = _pickle_globals(f)
  bad = [f"{m}.{n}" for m, n in found
         if not (m == "torch" or m.startswith("torch.") or (m, n) in _SAFE_PICKLE_GLOBALS)]
  return sorted(set(bad))


def _unsafe_pth_error(path: str, why: str) -> ValueError:
  return ValueError(
      f"{path} is not a safe checkpoint: {why}. mame-jax reads .pth files only through "
      "torch.load(weights_only=True) and never unpickles anything else. If you trust "
      "the file, convert it once in a trusted Python session: `import torch, "
      "safetensors.torch; sd = torch.load(p, weights_only=False, map_location='cpu'); "
      "sd = sd.get('model', sd); safetensors.torch.save_file({k: v.contiguous() for k, v "
      "in sd.items() if torch.is_tensor(v)}, 'model.safetensors')`, then load "
      "model.safetensors (or `mame-jax convert model.safetensors model.npz`).")


def _first_line(e: Exception) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


def _read_pth(path: str) -> dict:
  """A PyTorch ``.pth`` state dict -> flat ``{key: np.ndarray}``. The pickle is
  first scanned (never run) for globals other than torch's tensor machinery, so
  a checkpoint holding e.g. a training script's ``argparse.Namespace`` fails
  with one clear ``ValueError`` -- with or without torch installed -- instead of
  torch's unpickler message; then ``torch.load(weights_only=True)`` reads it."""
  bad = _unsafe_globals(path)
  if bad:
    raise _unsafe_pth_error(path, f"its pickle imports {', '.join(bad[:5])}"
                            f"{' ...' if len(bad) > 5 else ''}, not only tensors")
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        f"{path} is a PyTorch .pth checkpoint and reading it needs torch, which is not "
        "installed. Install it (`pip install torch`; the CPU build is enough) or "
        "convert the file to safetensors once where torch is installed: "
        "`sd = torch.load(p, weights_only=True, map_location='cpu'); "
        "safetensors.torch.save_file(sd.get('model', sd), 'model.safetensors')`."
    ) from e
  import pickle  # pylint: disable=import-outside-toplevel  # for its exception type only
  try:
    obj = torch.load(path, weights_only=True, map_location="cpu")
  except pickle.UnpicklingError as e:  # weights_only refused a global
    raise _unsafe_pth_error(path, f"torch.load(weights_only=True) refused it "
                            f"({_first_line(e)})") from e
  except (RuntimeError, EOFError, OSError) as e:
    raise ValueError(f"{path}: torch.load(weights_only=True) cannot read it "
                     f"({_first_line(e)}); probably truncated or not a state dict") from e
  for wrapper in ("model", "state_dict"):  # DeiT / MAE releases nest the weights
    if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
      obj = obj[wrapper]
      break
  if not isinstance(obj, dict):
    raise ValueError(f"{path}: expected a state dict, found {type(obj).__name__}")
  arrays = {}
  for k, v in obj.items():
    if not isinstance(v, torch.Tensor):
      raise ValueError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
    v = v.detach().cpu()
    arrays[k] = (v.float() if v.dtype == torch.bfloat16 else v).numpy()
  return arrays


def read_arrays(path) -> dict:
  """Reads any supported checkpoint file into a flat ``{key: np.ndarray}`` dict, keys
  as stored. Raises ``ValueError`` naming the file when it is not a readable one."""
  path = os.fspath(path)
  kind = _sniff(path)
  if kind == "pth":
    return _read_pth(path)
  try:
    if kind == "npz":
      with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    return dict(load_file(path))
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{path}: cannot read this {kind} file, probably truncated or "
                     f"corrupt ({type(e).__name__}: {e})") from e


# ------------------------------------------------------------------------------------
# Any layout -> canonical.


def _flatten(tree, prefix="") -> dict:
  if not isinstance(tree, Mapping):
    return {prefix[:-1]: tree}
  out = {}
  for k, v in tree.items():
    out.update(_flatten(v, f"{prefix}{k}/"))
  return out


def _unflatten(flat: Mapping) -> dict:
  tree: dict = {}
  for key, value in flat.items():
    *parents, leaf = key.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def _subtree(flat, prefix):
  return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}


def _fold_class_slot(p: dict) -> None:
  """``pos_embedding (1, 1+h*w, D)`` -> ``(1, h*w, D)``, its first row added to ``cls``.

  Models that prepended the class token before adding position embeddings gave the
  class token ``cls + posemb[0]``; adding the two once here gives the same network.
  Without a class token the slot was never used and is dropped (as big_vision does).
  """
  pe = p.get("pos_embedding")
  if pe is None:
    return
  n = pe.shape[1]
  if n < 2 or math.isqrt(n) ** 2 == n or math.isqrt(n - 1) ** 2 != n - 1:
    return
  slot, p["pos_embedding"] = pe[:, :1], pe[:, 1:]
  if "cls" in p:
    p["cls"] = (p["cls"] + slot).astype(p["cls"].dtype)


def _from_big_vision(flat: dict) -> dict:
  p = dict(flat)
  # Scanned: Transformer/encoderblock/... (L, ...) -> Transformer/encoderblock_{i}/...
  for key in [k for k in p if k.startswith("Transformer/encoderblock/")]:
    stacked = p.pop(key)
    rest = key[len("Transformer/encoderblock/"):]
    for i in range(stacked.shape[0]):
      p[f"Transformer/encoderblock_{i}/{rest}"] = stacked[i]
  # Pre-linen numbering of the modules inside a block (old AugReg).
  if any(_BLOCK_RE.match(k) and "/MultiHeadDotProductAttention_1/" in k for k in p):
    renamed = {}
    for k, v in p.items():
      m = _BLOCK_RE.match(k)
      if m:
        module, _, rest = k[m.end():].partition("/")
        k = f"{m.group(0)}{_PRE_LINEN.get(module, module)}/{rest}"
      renamed[k] = v
    p = renamed
  # Old homes of the position embeddings.
  for old in ("Transformer/posembed_input/pos_embedding", "Transformer/pos_embedding"):
    if old in p:
      p["pos_embedding"] = p.pop(old)
  _fold_class_slot(p)
  # MAP head parameters inlined at the top (early ViT-G checkpoints).
  if "probe" in p:
    for k in [k for k in p if k.split("/")[0] in (
            "probe", "MultiHeadDotProductAttention_0", "LayerNorm_0", "MlpBlock_0")]:
      p[f"MAPHead_0/{k}"] = p.pop(k)
  return p


def _timm_pairs(blocks) -> list:
  """``(timm key, canonical key, transposed)`` for every weight that maps one to
  one between timm and big_vision. The loader reads the table left to right and
  ``save_timm`` right to left (a transpose -- torch Linear ``(out, in)`` against a
  flax Dense kernel ``(in, out)`` -- is its own inverse). The class slot, the
  patch embedding and the fused ``qkv`` need reshaping and are handled apart."""
  pairs = [("patch_embed.proj.bias", "embedding/bias", False), ("cls_token", "cls", False),
           ("reg_token", "registers", False)]
  for i in blocks:
    b, t = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
    for tn, bn in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_1")):
      pairs += [(f"{b}{tn}.weight", f"{t}{bn}/scale", False),
                (f"{b}{tn}.bias", f"{t}{bn}/bias", False)]
    pairs.append((f"{b}attn.proj.bias", f"{t}{_ATTN}/out/bias", False))
    for tn, bn in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
      pairs += [(f"{b}mlp.{tn}.weight", f"{t}MlpBlock_0/{bn}/kernel", True),
                (f"{b}mlp.{tn}.bias", f"{t}MlpBlock_0/{bn}/bias", False)]
    # DINOv2's LayerScale (timm's ls1 / ls2)
    pairs += [(f"{b}ls1.gamma", f"{t}LayerScale_0/scale", False),
              (f"{b}ls2.gamma", f"{t}LayerScale_1/scale", False)]
  for tn, bn in (("norm", "Transformer/encoder_norm"), ("fc_norm", "fc_norm")):
    pairs += [(f"{tn}.weight", f"{bn}/scale", False), (f"{tn}.bias", f"{bn}/bias", False)]
  return pairs + [("head.weight", "head/kernel", True), ("head.bias", "head/bias", False)]


def _from_timm(flat: dict, num_heads: Optional[int]) -> dict:
  """timm ViT state dict -> canonical; keys it does not know are kept as they are
  (so that the model check reports them as unexpected)."""
  src = dict(flat)
  width = src["patch_embed.proj.weight"].shape[0]
  heads = num_heads or TIMM_NUM_HEADS.get(width, max(width // 64, 1))
  if width % heads:
    raise ValueError(f"timm width {width} is not divisible by num_heads={heads}")
  head_dim = width // heads
  out = {}

  def move(src_key, dst_key, fn=lambda a: a):
    if src_key in src:
      out[dst_key] = fn(src.pop(src_key))

  move("patch_embed.proj.weight", "embedding/kernel", lambda a: a.transpose(2, 3, 1, 0))
  move("pos_embed", "pos_embedding")
  blocks = sorted({int(k.split(".")[1]) for k in src if k.startswith("blocks.")})
  for timm_key, key, transposed in _timm_pairs(blocks):
    move(timm_key, key, (lambda a: a.T) if transposed else (lambda a: a))
  for i in blocks:
    b, t = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
    # qkv rows are [q; k; v], each head-major (heads, head_dim).
    if f"{b}attn.qkv.weight" in src:
      w = src.pop(f"{b}attn.qkv.weight").reshape(3, width, width)
      for j, name in enumerate(("query", "key", "value")):
        out[f"{t}{_ATTN}/{name}/kernel"] = w[j].T.reshape(width, heads, head_dim)
    if f"{b}attn.qkv.bias" in src:
      bias = src.pop(f"{b}attn.qkv.bias").reshape(3, heads, head_dim)
      for j, name in enumerate(("query", "key", "value")):
        out[f"{t}{_ATTN}/{name}/bias"] = bias[j]
    move(f"{b}attn.proj.weight", f"{t}{_ATTN}/out/kernel",
         lambda a: a.T.reshape(heads, head_dim, width))
  _fold_class_slot(out)
  out.update(src)
  return out


def _meta_kwargs(meta: dict, source) -> dict:
  kw = {}
  for k, v in meta.items():
    if k == "gelu_approximate":
      kw[k] = bool(v)
    elif k == "input_norm":
      kw[k] = tuple(tuple(float(c) for c in row) for row in np.asarray(v))
    else:
      raise ValueError(f"{source}: unknown metadata key 'meta/{k}'")
  return kw


def unwrap(flat: dict) -> dict:
  """A flat dict without its wrapper: ``opt/target/...`` (the optimizer state
  beside it dropped) or ``params/...`` (when every key has it); else as it is."""
  if any(k.startswith("opt/target/") for k in flat):
    return _subtree(flat, "opt/target/")
  if flat and all(k.startswith("params/") for k in flat):
    return _subtree(flat, "params/")
  return flat


def canonicalize(params, *, num_heads: Optional[int] = None, source="checkpoint"):
  """Any supported layout -> ``(canonical flat dict, model kwargs from the format)``.

  ``params``: a flat dict as read from a file, or a nested tree (a model's params,
  scanned or not). The kwargs are ``gelu_approximate`` / ``input_norm`` for timm
  weights or from ``meta/`` keys, else empty.
  """
  flat = _flatten(params) if any(isinstance(v, Mapping) for v in params.values()) \
      else dict(params)
  meta = _subtree(flat, "meta/")
  flat = {k: v for k, v in flat.items() if not k.startswith("meta/")}
  kwargs = _meta_kwargs(meta, source)
  flat = unwrap(flat)
  if "embedding/kernel" not in flat and "img/embedding/kernel" in flat:
    flat = _subtree(flat, "img/")  # SigLIP: the image tower

  if "patch_embed.proj.weight" in flat:
    kwargs = {"gelu_approximate": False, "input_norm": (IMAGENET_MEAN, IMAGENET_STD),
              **kwargs}
    return _from_timm(flat, num_heads), kwargs
  if "embedding/kernel" not in flat:
    shown = ", ".join(sorted(flat)[:5]) or "none"
    raise ValueError(f"{source}: no ViT weights found (neither big_vision "
                     f"'embedding/kernel' nor timm 'patch_embed.proj.weight'); "
                     f"keys: {shown}")
  return _from_big_vision(flat), kwargs


# ------------------------------------------------------------------------------------
# Canonical -> architecture.


def _architecture(p: dict) -> dict:
  if "embedding/kernel" not in p:
    raise ValueError("no patch embedding 'embedding/kernel' to infer the model from")
  ph, pw, _, width = p["embedding/kernel"].shape
  layers = sorted({int(m.group(1)) for k in p if (m := _BLOCK_RE.match(k))})
  first = f"Transformer/encoderblock_{layers[0]}/" if layers else None
  kw = dict(width=width, depth=(layers[-1] + 1) if layers else 0, patch_size=(ph, pw),
            posemb="learn" if "pos_embedding" in p else "sincos2d",
            class_token="cls" in p)
  if first and f"{first}LayerScale_0/scale" in p:  # DINOv2
    kw["layer_scale"] = True
  if "registers" in p:  # DINOv2-reg
    kw["num_registers"] = int(p["registers"].shape[1])
  if first and f"{first}MlpBlock_0/Dense_0/kernel" in p:
    kw["mlp_dim"] = p[f"{first}MlpBlock_0/Dense_0/kernel"].shape[-1]
  if first and f"{first}{_ATTN}/query/kernel" in p:
    kw["num_heads"] = p[f"{first}{_ATTN}/query/kernel"].shape[1]
  if "MAPHead_0/probe" in p:
    kw["pool_type"] = "map"
  elif "fc_norm/scale" in p:
    kw["pool_type"], kw["fc_norm"] = "gap", True
  else:
    kw["pool_type"] = "tok" if "cls" in p else "gap"
  kw["num_classes"] = p["head/kernel"].shape[-1] if "head/kernel" in p else None
  kw["rep_size"] = int(p["pre_logits/kernel"].shape[-1]) if "pre_logits/kernel" in p \
      else False
  return kw


def _image_size(p: dict) -> Optional[tuple]:
  pe = p.get("pos_embedding")
  if pe is None or math.isqrt(pe.shape[1]) ** 2 != pe.shape[1]:
    return None
  ph, pw = p["embedding/kernel"].shape[:2]
  side = math.isqrt(pe.shape[1])
  return (side * ph, side * pw)


def infer_architecture(params, *, num_heads: Optional[int] = None) -> dict:
  """``vit.Model`` keyword arguments for a checkpoint's arrays or a params tree.

  Returns ``width, depth, mlp_dim, num_heads, patch_size, posemb, class_token,
  pool_type, num_classes, rep_size`` (``fc_norm`` for MAE-style weights;
  ``gelu_approximate`` and ``input_norm`` for timm weights or ``meta/`` keys) and
  ``image_size``: the resolution the position embeddings were trained at, ``(H, W)``,
  or ``None`` with sin-cos embeddings. See the module docstring for the rules.
  """
  flat, kwargs = canonicalize(params, num_heads=num_heads)
  return {**_architecture(flat), **kwargs, "image_size": _image_size(flat)}


# ------------------------------------------------------------------------------------
# Canonical -> a model's params, checked.


def _expected(model, image_size) -> dict:
  """Canonical flat ``{key: ShapeDtypeStruct}`` of ``model``'s params (no allocation)."""
  probe = model.clone(merge=None, scan=False)
  image = jax.ShapeDtypeStruct((1, *image_size, 3), jnp.float32)
  tree = jax.eval_shape(probe.init, jax.random.key(0), image)["params"]
  return _flatten(tree)


def _fit(flat: dict, model, image_size, source, resample: str = "bilinear") -> dict:
  """Resamples posemb to the model's grid (``vit.resample_posemb``'s ``resample``
  method), checks keys and shapes, casts, stacks."""
  expected = _expected(model, image_size)
  flat = dict(flat)
  pe, want = flat.get("pos_embedding"), expected.get("pos_embedding")
  if pe is not None and want is not None and pe.shape != want.shape:
    if math.isqrt(pe.shape[1]) ** 2 == pe.shape[1] and pe.shape[2] == want.shape[2]:
      grid = vit.patch_grid(model, image_size)
      flat["pos_embedding"] = np.asarray(vit.resample_posemb(pe, grid, resample))
  params = check_fit(flat, expected, source)
  if model.scan:
    params = _stack_blocks(params)
  return _unflatten(params)


def check_fit(flat: dict, expected: dict, source) -> dict:
  """``flat`` cast to ``expected``'s dtypes (flat ``{key: ShapeDtypeStruct}``), after
  checking keys and shapes; raises one ``ValueError`` naming ``source`` and every
  missing, unexpected and mismatched key with both shapes."""
  problems = []
  for k in sorted(expected.keys() - flat.keys()):
    problems.append(f"missing key {k!r}: the model expects shape {expected[k].shape}, "
                    "the checkpoint has none")
  for k in sorted(flat.keys() - expected.keys()):
    problems.append(f"unexpected key {k!r} with shape {tuple(np.shape(flat[k]))}: "
                    "the model has no such parameter")
  for k in sorted(flat.keys() & expected.keys()):
    if tuple(np.shape(flat[k])) != tuple(expected[k].shape):
      problems.append(f"shape mismatch for {k!r}: checkpoint "
                      f"{tuple(np.shape(flat[k]))}, model {tuple(expected[k].shape)}")
  if problems:
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    raise ValueError(f"{source} does not fit the model:\n  "
                     + "\n  ".join(problems[:20]) + more)

  return {k: jnp.asarray(v, expected[k].dtype) for k, v in flat.items()}


def _stack_blocks(flat: dict, encoder: str = "Transformer") -> dict:
  """``{encoder}/encoderblock_{i}/...`` -> ``{encoder}/encoderblock/...`` (L, ...);
  ``encoder`` is the encoder module's name (the text tower's is ``Encoder_0``)."""
  block_re = re.compile(rf"^{re.escape(encoder)}/encoderblock_(\d+)/")
  out, per_layer = {}, {}
  for k, v in flat.items():
    m = block_re.match(k)
    if m:
      per_layer.setdefault(k[m.end():], {})[int(m.group(1))] = v
    else:
      out[k] = v
  for rest, layers in per_layer.items():
    stack = jnp.stack if any(isinstance(a, jax.Array) for a in layers.values()) \
        else np.stack
    out[f"{encoder}/encoderblock/{rest}"] = stack([layers[i] for i in sorted(layers)])
  return out


def _read(path, num_heads):
  return canonicalize(read_arrays(path), num_heads=num_heads, source=os.fspath(path))


def load_model(path, *, merge=None, image_size=None, **overrides):
  """Builds the ``vit.Model`` a checkpoint file describes and loads its weights.

  Args:
    path: ``.npz`` (big_vision / AugReg / SigLIP, any layout and wrapper),
      ``.safetensors`` or ``.pth`` (timm DeiT / MAE); the content decides.
    merge: merge configuration passed through to the model.
    image_size: resolution to run at, ``S`` or ``(H, W)``; learned position
      embeddings are resampled bilinearly when their grid differs. Defaults to the
      checkpoint's own (224 for sin-cos embeddings).
    **overrides: ``vit.Model`` attributes that win over the inferred ones (for
      example ``num_heads`` for a timm model off the standard table, ``scan=True``,
      ``dtype_mm="bfloat16"``).

  Returns:
    ``(model, params)``. Raises ``ValueError`` naming the key and both shapes when a
    key is missing, unexpected or of another shape, and naming the file when it is
    not a readable checkpoint.
  """
  flat, kwargs = _read(path, overrides.get("num_heads"))
  kwargs = {**_architecture(flat), **kwargs, **overrides}
  model = vit.Model(merge=merge, **kwargs)
  size = vit.pair(image_size or _image_size(flat) or 224)
  return model, _fit(flat, model, size, os.fspath(path), resampling(kwargs))


def resampling(arch: dict) -> str:
  """How a file's position embeddings are resampled (``vit.POSEMB_RESAMPLING``):
  DINOv2 weights (LayerScale) by timm's rule for them, antialiased bicubic
  (``resample_abs_pos_embed``'s default); every other ViT bilinearly."""
  return "bicubic_aa" if arch.get("layer_scale") else "bilinear"


def load_params(path, model, *, image_size=None) -> dict:
  """Loads a checkpoint file into an existing ``model``'s params tree (checked as in
  ``load_model``; a timm file uses ``model.num_heads`` to split its heads)."""
  flat, _ = _read(path, model.num_heads)
  size = vit.pair(image_size or _image_size(flat) or 224)
  return _fit(flat, model, size, os.fspath(path), resampling({"layer_scale": model.layer_scale}))


# ------------------------------------------------------------------------------------
# Writers: each the exact inverse of reading.


def _to_numpy(flat):
  return {k: np.asarray(v) for k, v in flat.items()}


def save_npz(params, path, *, layout: str = "current", wrapper: Optional[str] = None,
             meta: Optional[dict] = None) -> None:
  """Writes big_vision ``.npz`` weights.

  Args:
    params: a model's params tree (scanned or not) or a canonical flat dict.
    layout: ``"current"``, ``"old"`` (AugReg: pre-linen block names and
      ``Transformer/posembed_input/pos_embedding`` with a zero class slot, so that
      folding it back is exact) or ``"scanned"`` (blocks stacked on a layer axis).
    wrapper: key prefix, e.g. ``"params"`` (SigLIP style) or ``"opt/target"``.
    meta: ``{"gelu_approximate": bool, "input_norm": (mean, std)}`` to record under
      ``meta/`` (never wrapped).
  """
  flat, _ = canonicalize(params)
  flat = _to_numpy(flat)
  if layout == "old":
    old = {}
    for k, v in flat.items():
      m = _BLOCK_RE.match(k)
      if m:
        module, _, rest = k[m.end():].partition("/")
        module = {new: pre for pre, new in _PRE_LINEN.items()}.get(module, module)
        k = f"{m.group(0)}{module}/{rest}"
      elif k == "pos_embedding":
        k = "Transformer/posembed_input/pos_embedding"
        if "cls" in flat:
          v = np.concatenate([np.zeros_like(v[:, :1]), v], axis=1)
      old[k] = v
    flat = old
  elif layout == "scanned":
    flat = _stack_blocks(flat)
  elif layout != "current":
    raise ValueError(f"Unknown npz layout {layout!r}: 'current', 'old' or 'scanned'")
  if wrapper:
    flat = {f"{wrapper.strip('/')}/{k}": v for k, v in flat.items()}
  for k, v in (meta or {}).items():
    if k == "gelu_approximate":
      flat["meta/gelu_approximate"] = np.asarray(bool(v))
    elif k == "input_norm" and v is not None:
      flat["meta/input_norm"] = np.asarray(v, np.float64)
    elif k != "input_norm":
      raise ValueError(f"Unknown meta key {k!r}: 'gelu_approximate' or 'input_norm'")
  with open(path, "wb") as f:  # a file object: np.savez would append ".npz" to a name
    np.savez(f, **flat)


def save_timm(params, path, *, kind: str = "deit") -> None:
  """Writes timm ViT weights as ``.safetensors``.

  ``kind="deit"``: final ``norm``, class-token pooling; ``kind="mae"``: MAE
  fine-tuned, ``fc_norm`` after global average pooling and no ``norm``. The class
  token goes to ``cls_token`` and ``pos_embed`` gets a zero class slot. Loading
  always assumes erf GELU and ImageNet normalisation, as timm does.
  """
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel

  p = _to_numpy(canonicalize(params)[0])
  if kind not in ("deit", "mae"):
    raise ValueError(f"Unknown timm kind {kind!r}: 'deit' or 'mae'")
  need, forbid = (("Transformer/encoder_norm/scale", "fc_norm/scale") if kind == "deit"
                  else ("fc_norm/scale", "Transformer/encoder_norm/scale"))
  if need not in p or forbid in p:
    raise ValueError(f"timm kind={kind!r} needs {need!r} and no {forbid!r}")
  if "cls" not in p or "pos_embedding" not in p:
    raise ValueError("timm layout needs a class token and learned position embeddings")
  width = p["embedding/kernel"].shape[-1]
  out = {}

  def move(src_key, dst_key, fn=lambda a: a):
    if src_key in p:
      out[dst_key] = fn(p.pop(src_key))

  move("embedding/kernel", "patch_embed.proj.weight", lambda a: a.transpose(3, 2, 0, 1))
  move("pos_embedding", "pos_embed",
       lambda a: np.concatenate([np.zeros_like(a[:, :1]), a], axis=1))
  layers = sorted({int(m.group(1)) for k in p if (m := _BLOCK_RE.match(k))})
  for timm_key, key, transposed in _timm_pairs(layers):
    move(key, timm_key, (lambda a: a.T) if transposed else (lambda a: a))
  for i in layers:
    b, t = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
    qkv = [f"{t}{_ATTN}/{name}/" for name in ("query", "key", "value")]
    out[f"{b}attn.qkv.weight"] = np.concatenate(
        [p.pop(q + "kernel").reshape(width, width).T for q in qkv], axis=0)
    out[f"{b}attn.qkv.bias"] = np.concatenate([p.pop(q + "bias").reshape(-1) for q in qkv])
    move(f"{t}{_ATTN}/out/kernel", f"{b}attn.proj.weight",
         lambda a: a.reshape(width, width).T)
  if p:
    raise ValueError(f"timm layout has no place for {sorted(p)[:5]}")
  # safetensors writes an array's memory as is: make every one C-ordered first.
  save_file({k: np.ascontiguousarray(v) for k, v in out.items()}, os.fspath(path))


def convert(src, dst, *, layout: str = "current", num_heads: Optional[int] = None):
  """Converts any readable checkpoint (typically timm ``.safetensors`` / ``.pth``) to a
  big_vision ``.npz`` at ``dst``.

  What the npz weights cannot show is kept under ``meta/``: ``gelu_approximate``
  (``False`` for timm) and ``input_norm`` (ImageNet mean/std for timm), so that
  ``load_model(dst)`` builds the same model as ``load_model(src)``. Returns ``dst``.
  """
  flat, kwargs = _read(src, num_heads)
  save_npz(flat, dst, layout=layout, meta=kwargs)
  return dst


# ------------------------------------------------------------------------------------
# transformers' folder layout (config.json + model.safetensors), shared by the
# VideoMAE and CLIP readers.

TRANSFORMERS_CONFIG = "config.json"
TRANSFORMERS_WEIGHTS = "model.safetensors"
TRANSFORMERS_INDEX = "model.safetensors.index.json"
TRANSFORMERS_PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def transformers_files(folder, family: str = "transformers",
                       model_class: str = "AutoModel") -> tuple:
  """``(config.json, [safetensors files])`` of a transformers folder holding a
  ``family`` model (named in messages). Raises ``ValueError`` naming the folder and
  the missing file; a folder whose weights are only pickles (``pytorch_model.bin``)
  is refused without opening them, with a conversion recipe through
  ``model_class``."""
  import json  # pylint: disable=import-outside-toplevel
  import pathlib  # pylint: disable=import-outside-toplevel
  folder = pathlib.Path(folder)
  config = folder / TRANSFORMERS_CONFIG
  index, single = folder / TRANSFORMERS_INDEX, folder / TRANSFORMERS_WEIGHTS
  if single.exists():
    weights = [single]
  elif index.exists():
    try:
      shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"{index}: not a safetensors index ({e})") from e
    weights = [folder / s for s in shards]
  elif any((folder / p).exists() for p in TRANSFORMERS_PICKLES):
    raise ValueError(
        f"{folder}: holds only PyTorch pickle weights (pytorch_model.bin), which "
        "mame-jax never unpickles. Convert the folder once, in a trusted Python session "
        f"with transformers: `from transformers import {model_class} as M; "
        "M.from_pretrained(folder).save_pretrained(out, safe_serialization=True)`, "
        f"and load `out` (it holds {TRANSFORMERS_CONFIG} and {TRANSFORMERS_WEIGHTS})")
  else:
    raise ValueError(f"{folder}: no {TRANSFORMERS_WEIGHTS}: expected a transformers "
                     f"{family} folder holding {TRANSFORMERS_CONFIG} and "
                     f"{TRANSFORMERS_WEIGHTS} (as save_pretrained(..., "
                     "safe_serialization=True) writes it)")
  if not config.exists():
    raise ValueError(f"{folder}: no {TRANSFORMERS_CONFIG}: a transformers {family} "
                     f"folder needs its {TRANSFORMERS_CONFIG} beside "
                     f"{TRANSFORMERS_WEIGHTS} (the head count, LayerNorm eps and "
                     "activation are only stored there)")
  return config, weights


def folder_model_type(folder) -> Optional[str]:
  """The ``model_type`` of a transformers folder's ``config.json``; ``None`` when
  there is no readable one (how the loader tells CLIP, DINOv2 and VideoMAE
  folders apart)."""
  import pathlib  # pylint: disable=import-outside-toplevel
  path = pathlib.Path(folder) / TRANSFORMERS_CONFIG
  if not path.is_file():
    return None
  try:
    return read_json(path).get("model_type")
  except ValueError:
    return None


def read_json(path) -> dict:
  """A JSON object file (``config.json``) as a dict; ``ValueError`` naming the file
  if it is no JSON object."""
  import json  # pylint: disable=import-outside-toplevel
  import pathlib  # pylint: disable=import-outside-toplevel
  try:
    config = json.loads(pathlib.Path(path).read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not a JSON file ({e})") from e
  if not isinstance(config, dict):
    raise ValueError(f"{path}: expected a JSON object")
  return config


def read_transformers_weights(paths) -> dict:
  """The state dict of one or several safetensors files, ``{key: np.ndarray}``."""
  state = {}
  for p in paths:
    if not os.path.exists(p):
      raise ValueError(f"{p}: missing: the safetensors index names it")
    state.update(read_arrays(p))
  return state


def torch_leaf(kind: str, name: str, a, num_heads: int):
  """One torch tensor -> ``(canonical leaf name, array)``, by the ``kind`` of module
  it belongs to: ``"norm"`` (LayerNorm ``weight``/``bias``, old files ``gamma``/
  ``beta``), ``"conv"`` (``(D, 3, [t,] p, p)`` -> ``([t,] p, p, 3, D)``),
  ``"dense"`` (``(out, in)`` -> ``(in, out)``), ``"in"`` (an attention input
  projection ``(D, D)`` -> ``(D, heads, head_dim)``; its bias ``(D,)`` ->
  ``(heads, head_dim)``) or ``"out"`` (``(D, D)`` -> ``(heads, head_dim, D)``)."""
  if kind == "norm":
    return {"weight": "scale", "gamma": "scale", "bias": "bias", "beta": "bias"}[name], a
  if name == "bias":
    return "bias", (a.reshape(num_heads, -1) if kind == "in" else a)
  if kind == "conv":
    return "kernel", a.transpose(*range(2, a.ndim), 1, 0)
  if kind == "dense":
    return "kernel", a.T
  if kind == "in":
    return "kernel", a.T.reshape(a.shape[1], num_heads, -1)
  return "kernel", a.T.reshape(num_heads, -1, a.shape[0])
