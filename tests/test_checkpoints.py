"""Specification of mame_jax.models.checkpoints: every format round-trips, architectures are
inferred from weights alone, timm numerics match an independent NumPy forward, and bad
files fail with clear errors."""

import functools
import math
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from mame_jax.models import checkpoints, vit

TINY = dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=(8, 8))
IMAGE = 32
IMAGENET = (checkpoints.IMAGENET_MEAN, checkpoints.IMAGENET_STD)

# The models each writer's files must load back as (every attribute inferred).
TOK = vit.Model(10, **TINY, pool_type="tok", class_token=True)
DEIT = TOK.clone(gelu_approximate=False, input_norm=IMAGENET)
MAE = vit.Model(10, **TINY, pool_type="gap", class_token=True, fc_norm=True,
                gelu_approximate=False, input_norm=IMAGENET)

_jit = functools.partial(jax.jit, static_argnums=0,
                         compiler_options={"xla_backend_optimization_level": 0})


@_jit
def logits(model, params, x):
  return model.apply({"params": params}, x)[0]


def images(n=2, size=IMAGE, seed=1):
  return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def param_shapes(model, size=IMAGE):
  return jax.eval_shape(model.init, jax.random.key(0),
                        jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))["params"]


def random_params(model, seed=0, size=IMAGE):
  rng = np.random.default_rng(seed)

  def fill(path, s):
    a = rng.normal(0.0, 0.2, s.shape).astype(np.float32)
    return a + 1.0 if path[-1].key == "scale" else a

  return jax.tree_util.tree_map_with_path(fill, param_shapes(model, size))


def zero_params(model, size=IMAGE):
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), param_shapes(model, size))


def assert_same_tree(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("layout,wrapper", [
    ("current", None), ("old", None), ("scanned", None),
    ("current", "params"), ("current", "opt/target"), ("scanned", "params")])
def test_npz_round_trips(tmp_path, layout, wrapper):
  params = random_params(TOK)
  path = tmp_path / "vit.npz"
  checkpoints.save_npz(params, path, layout=layout, wrapper=wrapper)
  model, loaded = checkpoints.load_model(path)
  assert model == TOK
  assert_same_tree(loaded, params)
  np.testing.assert_array_equal(logits(model, loaded, images()), logits(TOK, params, images()))


@pytest.mark.parametrize("kind,model", [("deit", DEIT), ("mae", MAE)])
def test_timm_safetensors_round_trips(tmp_path, kind, model):
  params = random_params(model)
  path = tmp_path / f"{kind}.safetensors"
  checkpoints.save_timm(params, path, kind=kind)
  loaded_model, loaded = checkpoints.load_model(path, num_heads=2)
  assert loaded_model == model
  assert_same_tree(loaded, params)
  np.testing.assert_array_equal(logits(loaded_model, loaded, images()),
                                logits(model, params, images()))


def test_scanned_checkpoint_unstacks_by_default_and_stacks_on_request(tmp_path):
  params = random_params(TOK)
  checkpoints.save_npz(params, tmp_path / "scan.npz", layout="scanned")
  model, loaded = checkpoints.load_model(tmp_path / "scan.npz")
  assert not model.scan and "encoderblock_1" in loaded["Transformer"]
  model, stacked = checkpoints.load_model(tmp_path / "scan.npz", scan=True)
  assert stacked["Transformer"]["encoderblock"]["LayerNorm_0"]["scale"].shape == (2, 32)
  np.testing.assert_allclose(logits(model, stacked, images()), logits(TOK, params, images()),
                             atol=1e-5)


def test_convert_timm_to_npz_keeps_the_model(tmp_path):
  params = random_params(MAE)
  checkpoints.save_timm(params, tmp_path / "mae.safetensors", kind="mae")
  checkpoints.convert(tmp_path / "mae.safetensors", tmp_path / "mae.npz", num_heads=2)
  with np.load(tmp_path / "mae.npz", allow_pickle=False) as f:
    assert f["meta/gelu_approximate"].shape == () and not f["meta/gelu_approximate"]
    np.testing.assert_array_equal(f["meta/input_norm"], IMAGENET)
    assert "fc_norm/scale" in f.files and "pos_embedding" in f.files
  model, loaded = checkpoints.load_model(tmp_path / "mae.npz")
  assert model == MAE
  assert_same_tree(loaded, params)


def test_siglip_image_tower_is_extracted(tmp_path):
  img = vit.Model(None, **TINY, pool_type="map")
  flat = checkpoints.canonicalize(zero_params(img))[0]
  arrays = {f"params/img/{k}": v for k, v in flat.items()}
  arrays.update({"params/txt/Embed_0/embedding": np.zeros((7, 32), np.float32),
                 "params/t": np.zeros((1,), np.float32), "params/b": np.zeros((1,), np.float32)})
  np.savez(tmp_path / "siglip.npz", **arrays)
  model, loaded = checkpoints.load_model(tmp_path / "siglip.npz")
  assert model == img.clone(class_token=False)
  assert "MAPHead_0" in loaded and "head" not in loaded


# ------------------------------------------------------------------ architecture inference


@pytest.mark.parametrize("kw,writer", [
    (dict(num_classes=10, pool_type="tok"), "old"),
    (dict(num_classes=10, pool_type="tok", rep_size=16), "current"),
    (dict(num_classes=None, pool_type="gap"), "current"),
    (dict(num_classes=7, pool_type="gap", posemb="sincos2d"), "scanned"),
    (dict(num_classes=None, pool_type="map"), "params"),
    (dict(num_classes=5, pool_type="map", posemb="sincos2d", rep_size=24), "current"),
    (dict(num_classes=3, pool_type="tok", posemb="sincos2d"), "opt/target"),
    (dict(num_classes=4, pool_type="tok", gelu_approximate=False, input_norm=IMAGENET), "deit"),
    (dict(num_classes=4, pool_type="gap", class_token=True, fc_norm=True,
          gelu_approximate=False, input_norm=IMAGENET), "mae"),
])
def test_architecture_is_inferred_from_the_weights(tmp_path, kw, writer):
  tiny = {**TINY, "depth": 3, "mlp_dim": 48, "patch_size": (4, 4)}
  kw = {"class_token": kw["pool_type"] == "tok", "rep_size": False, **kw}
  model = vit.Model(**tiny, **kw)
  params = zero_params(model, size=24)  # shapes are all that inference reads
  if writer in ("deit", "mae"):
    path = tmp_path / "w.safetensors"
    checkpoints.save_timm(params, path, kind=writer)
    loaded, _ = checkpoints.load_model(path, image_size=24, num_heads=2)
  else:
    path = tmp_path / "w.npz"
    layout = writer if writer in ("old", "scanned") else "current"
    wrapper = writer if writer in ("params", "opt/target") else None
    checkpoints.save_npz(params, path, layout=layout, wrapper=wrapper)
    loaded, _ = checkpoints.load_model(path, image_size=24)
  assert loaded == model
  arch = checkpoints.infer_architecture(checkpoints.read_arrays(path), num_heads=2)
  assert arch["image_size"] == (None if kw.get("posemb") == "sincos2d" else (24, 24))


def test_timm_heads_come_from_the_standard_table_unless_given():
  def timm_shapes(width):
    return {"patch_embed.proj.weight": np.zeros((width, 3, 16, 16), np.float32),
            "blocks.0.attn.qkv.weight": np.zeros((3 * width, width), np.float32),
            "blocks.0.attn.qkv.bias": np.zeros((3 * width,), np.float32)}
  assert checkpoints.infer_architecture(timm_shapes(192))["num_heads"] == 3
  assert checkpoints.infer_architecture(timm_shapes(384))["num_heads"] == 6
  assert checkpoints.infer_architecture(timm_shapes(1024))["num_heads"] == 16
  assert checkpoints.infer_architecture(timm_shapes(512))["num_heads"] == 8  # width // 64
  assert checkpoints.infer_architecture(timm_shapes(192), num_heads=4)["num_heads"] == 4


# ------------------------------------------------------------------------------ numerics


def timm_state_dict(kind, width=32, depth=2, mlp=64, patch=8, grid=4, classes=10, seed=0):
  """A timm ViT state dict with random values, written directly in timm's layout."""
  rng = np.random.default_rng(seed)
  r = lambda *shape: rng.normal(0.0, 0.2, shape).astype(np.float32)
  sd = {"cls_token": r(1, 1, width), "pos_embed": r(1, 1 + grid * grid, width),
        "patch_embed.proj.weight": r(width, 3, patch, patch), "patch_embed.proj.bias": r(width)}
  for i in range(depth):
    b = f"blocks.{i}."
    sd.update({b + "norm1.weight": 1 + r(width), b + "norm1.bias": r(width),
               b + "attn.qkv.weight": r(3 * width, width), b + "attn.qkv.bias": r(3 * width),
               b + "attn.proj.weight": r(width, width), b + "attn.proj.bias": r(width),
               b + "norm2.weight": 1 + r(width), b + "norm2.bias": r(width),
               b + "mlp.fc1.weight": r(mlp, width), b + "mlp.fc1.bias": r(mlp),
               b + "mlp.fc2.weight": r(width, mlp), b + "mlp.fc2.bias": r(width)})
  final = "norm" if kind == "deit" else "fc_norm"
  sd.update({final + ".weight": 1 + r(width), final + ".bias": r(width),
             "head.weight": r(classes, width), "head.bias": r(classes)})
  return sd


def numpy_timm_forward(sd, image, num_heads, kind):
  """timm's ViT forward in float64 NumPy; ``image (B, H, W, 3)`` in [-1, 1]."""
  sd = {k: v.astype(np.float64) for k, v in sd.items()}
  ln = lambda x, n: ((x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
                     * sd[n + ".weight"] + sd[n + ".bias"])
  lin = lambda x, n: x @ sd[n + ".weight"].T + sd[n + ".bias"]
  erf = np.vectorize(math.erf)
  gelu = lambda x: 0.5 * x * (1 + erf(x / math.sqrt(2)))

  x = ((image.astype(np.float64) + 1) / 2 - np.array(checkpoints.IMAGENET_MEAN)) \
      / np.array(checkpoints.IMAGENET_STD)
  w = sd["patch_embed.proj.weight"]
  d, _, p, _ = w.shape
  b, h, wd, c = x.shape
  patches = x.reshape(b, h // p, p, wd // p, p, c).transpose(0, 1, 3, 5, 2, 4)
  tokens = patches.reshape(b, -1, c * p * p) @ w.reshape(d, -1).T + sd["patch_embed.proj.bias"]
  x = np.concatenate([np.repeat(sd["cls_token"], b, 0), tokens], 1) + sd["pos_embed"]
  n, hd = x.shape[1], d // num_heads
  for i in range(sum(k.endswith("attn.qkv.weight") for k in sd)):
    blk = f"blocks.{i}."
    qkv = lin(ln(x, blk + "norm1"), blk + "attn.qkv").reshape(b, n, 3, num_heads, hd)
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # each (B, heads, N, hd)
    a = q @ k.transpose(0, 1, 3, 2) * hd ** -0.5
    a = np.exp(a - a.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    x = x + lin((a @ v).transpose(0, 2, 1, 3).reshape(b, n, d), blk + "attn.proj")
    x = x + lin(gelu(lin(ln(x, blk + "norm2"), blk + "mlp.fc1")), blk + "mlp.fc2")
  pooled = ln(x, "norm")[:, 0] if kind == "deit" else ln(x[:, 1:].mean(1), "fc_norm")
  return lin(pooled, "head")


@pytest.mark.parametrize("kind", ["deit", "mae"])
def test_timm_weights_match_a_numpy_timm_forward(tmp_path, kind):
  sd = timm_state_dict(kind)
  save_file(sd, str(tmp_path / "timm.safetensors"))
  model, params = checkpoints.load_model(tmp_path / "timm.safetensors", num_heads=2)
  x = images()
  np.testing.assert_allclose(logits(model, params, x), numpy_timm_forward(sd, x, 2, kind),
                             atol=1e-4, rtol=1e-4)


def test_old_layout_class_slot_is_folded_into_the_class_token(tmp_path):
  params = random_params(TOK)
  checkpoints.save_npz(params, tmp_path / "old.npz", layout="old")
  with np.load(tmp_path / "old.npz", allow_pickle=False) as f:
    arrays = {k: f[k] for k in f.files}
  assert arrays["Transformer/posembed_input/pos_embedding"].shape == (1, 17, 32)
  assert "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel" in arrays
  assert "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel" in arrays
  slot = np.random.default_rng(3).normal(size=(1, 1, 32)).astype(np.float32)
  arrays["Transformer/posembed_input/pos_embedding"][:, :1] = slot
  np.savez(tmp_path / "old_slot.npz", **arrays)

  model, loaded = checkpoints.load_model(tmp_path / "old_slot.npz")
  current = dict(params, cls=params["cls"] + slot)
  np.testing.assert_allclose(loaded["cls"], current["cls"], atol=1e-6)
  np.testing.assert_allclose(logits(model, loaded, images()), logits(TOK, current, images()),
                             atol=1e-6)


def test_posemb_is_resampled_for_another_image_size(tmp_path):
  params = random_params(TOK)
  checkpoints.save_npz(params, tmp_path / "vit.npz")
  model, loaded = checkpoints.load_model(tmp_path / "vit.npz", image_size=48)
  assert loaded["pos_embedding"].shape == (1, 36, 32)
  np.testing.assert_allclose(loaded["pos_embedding"],
                             vit.resample_posemb(params["pos_embedding"], 6), atol=1e-6)
  assert logits(model, loaded, images(size=48)).shape == (2, 10)
  _, same = checkpoints.load_model(tmp_path / "vit.npz", image_size=IMAGE)
  np.testing.assert_array_equal(same["pos_embedding"], params["pos_embedding"])


def test_load_params_into_an_existing_model(tmp_path):
  params = random_params(TOK)
  checkpoints.save_npz(params, tmp_path / "vit.npz", wrapper="opt/target")
  assert_same_tree(checkpoints.load_params(tmp_path / "vit.npz", TOK), params)


# --------------------------------------------------------------------------- bad files


def write_tok(tmp_path, edit):
  flat = checkpoints.canonicalize(zero_params(TOK))[0]
  edit(flat)
  np.savez(tmp_path / "bad.npz", **flat)
  return tmp_path / "bad.npz"


def test_missing_key_is_reported_with_its_shape(tmp_path):
  key = "Transformer/encoderblock_1/LayerNorm_0/scale"
  path = write_tok(tmp_path, lambda f: f.pop(key))
  with pytest.raises(ValueError, match=rf"missing key '{key}'.*\(32,\)"):
    checkpoints.load_model(path)


def test_unexpected_key_is_reported_with_its_shape(tmp_path):
  path = write_tok(tmp_path, lambda f: f.update({"Transformer/extra/kernel": np.zeros((3, 4))}))
  with pytest.raises(ValueError, match=r"unexpected key 'Transformer/extra/kernel'.*\(3, 4\)"):
    checkpoints.load_model(path)


def test_shape_mismatch_names_the_key_and_both_shapes(tmp_path):
  key = "Transformer/encoderblock_0/MlpBlock_0/Dense_0/bias"
  path = write_tok(tmp_path, lambda f: f.update({key: np.zeros((65,), np.float32)}))
  with pytest.raises(ValueError, match=rf"shape mismatch for '{key}': checkpoint \(65,\), "
                                       r"model \(64,\)"):
    checkpoints.load_model(path)
  with pytest.raises(ValueError, match=r"shape mismatch for '.*query/kernel'.*\(32, 2, 16\).*"
                                       r"\(32, 4, 8\)"):
    checkpoints.load_model(write_tok(tmp_path, lambda f: None), num_heads=4)


def test_truncated_files_are_reported(tmp_path):
  good = write_tok(tmp_path, lambda f: None).read_bytes()
  (tmp_path / "cut.npz").write_bytes(good[: len(good) // 2])
  with pytest.raises(ValueError, match=r"cut\.npz.*truncated"):
    checkpoints.load_model(tmp_path / "cut.npz")
  save_file(timm_state_dict("deit"), str(tmp_path / "full.safetensors"))
  data = (tmp_path / "full.safetensors").read_bytes()
  (tmp_path / "cut.safetensors").write_bytes(data[:-100])
  with pytest.raises(ValueError, match=r"cut\.safetensors.*truncated"):
    checkpoints.load_model(tmp_path / "cut.safetensors")


def test_non_checkpoint_files_are_reported(tmp_path):
  (tmp_path / "notes.npz").write_text("these are not weights\n")
  with pytest.raises(ValueError, match=r"notes\.npz is not a checkpoint"):
    checkpoints.load_model(tmp_path / "notes.npz")
  np.savez(tmp_path / "other.npz", labels=np.arange(3))
  with pytest.raises(ValueError, match=r"other\.npz: no ViT weights found"):
    checkpoints.load_model(tmp_path / "other.npz")


def test_pth_without_torch_says_how_to_convert(tmp_path, monkeypatch):
  with zipfile.ZipFile(tmp_path / "deit.pth", "w") as z:  # torch.save's zip layout
    z.writestr("archive/data.pkl", b"never unpickled")
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
  with pytest.raises(ImportError, match=r"deit\.pth.*needs torch.*safetensors"):
    checkpoints.load_model(tmp_path / "deit.pth")


@pytest.mark.parametrize("protocol", [2, 4])  # GLOBAL (torch.save's) and STACK_GLOBAL
@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_pth_with_more_than_tensors_is_not_a_safe_checkpoint(tmp_path, monkeypatch, protocol,
                                                             layout):
  # A training script's checkpoint: the state dict next to its argparse args. The
  # pickle is only written here (pickle.dumps), never loaded, by the test or the
  # library; the message is the same with and without torch installed.
  import argparse
  import pickle
  payload = pickle.dumps({"model": {}, "args": argparse.Namespace(lr=0.1)}, protocol=protocol)
  path = tmp_path / "mae_pretrain.pth"
  if layout == "zip":
    with zipfile.ZipFile(path, "w") as z:
      z.writestr("archive/data.pkl", payload)
  else:  # the pre-1.6 layout: consecutive pickles (magic, protocol, sys info, object)
    path.write_bytes(b"".join(pickle.dumps(v, protocol=2) for v in (0x1950a86a20f9469cfc6c, 1001,
                                                                   {"little_endian": True}))
                     + payload)
  monkeypatch.setitem(sys.modules, "torch", None)  # torch is never needed to say so
  with pytest.raises(ValueError, match=r"mae_pretrain\.pth is not a safe checkpoint: its pickle "
                     r"imports argparse\.Namespace.*weights_only=True.*safetensors"
                     r".*mame-jax convert"):
    checkpoints.load_model(path)


def test_pickle_scan_reads_torch_globals_without_importing_them():
  import io
  import pickletools
  # GLOBAL 'torch._utils _rebuild_tensor_v2', GLOBAL 'collections OrderedDict',
  # GLOBAL 'os system': opcodes written by hand, as torch.save's protocol 2 does.
  data = (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nq\x00ccollections\nOrderedDict\nq\x01"
          b"cos\nsystem\nq\x02\x87q\x03.")
  pickletools.dis(data, out=io.StringIO())  # well-formed
  assert checkpoints._pickle_globals(io.BytesIO(data)) == [
      ("torch._utils", "_rebuild_tensor_v2"), ("collections", "OrderedDict"), ("os", "system")]
