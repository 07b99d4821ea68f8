"""Specification of the SigLIP / SigLIP 2 two towers (mame_jax.models.text, two_towers,
siglip): files in big_vision's layouts (unscanned and scanned, every wrapper, with and
without b) load with both architectures inferred, the text tower matches an independent
NumPy forward (padding attended to, the last position pooled), the logits are
zimg @ ztxt.T * exp(t) + b, MaMe goes into the image tower, and missing towers fail
clearly."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mame_jax
from mame_jax.models import merging, siglip, text, two_towers, vit

IMAGE, LENGTH, VOCAB, EMBED = 16, 6, 40, 32
IMG = vit.Model(None, width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=(8, 8),
                pool_type="map", class_token=False)
TXT = text.Model(EMBED, width=32, depth=2, mlp_dim=48, num_heads=4, vocab_size=VOCAB,
                 max_len=LENGTH, normalize=False)

_jit = functools.partial(jax.jit, static_argnums=0,
                         compiler_options={"xla_backend_optimization_level": 0})


@_jit
def apply(model, params, *args):
  return model.apply({"params": params}, *args)


embed = apply  # two towers: (images | None, texts | None) -> (zimg, ztxt, out)


def random_tree(shapes, seed):
  rng = np.random.default_rng(seed)

  def fill(path, s):
    a = rng.normal(0.0, 0.3, s.shape).astype(np.float32)
    return a + 1.0 if path[-1].key == "scale" else a
  return jax.tree_util.tree_map_with_path(fill, shapes)


def two_tower_params(bias=True, seed=0):
  model = two_towers.Model(img=IMG, txt=TXT, bias_init=0.0 if bias else None)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, IMAGE, IMAGE, 3), jnp.float32),
                          jax.ShapeDtypeStruct((1, LENGTH), jnp.int32))["params"]
  params = random_tree(shapes, seed)
  params["t"] = np.asarray([math.log(10.0)], np.float32)
  if bias:
    params["b"] = np.asarray([-3.0], np.float32)
  return model, params


def inputs(seed=1):
  rng = np.random.default_rng(seed)
  images = rng.uniform(-1, 1, (2, IMAGE, IMAGE, 3)).astype(np.float32)
  # Sticky-EOS style: content, EOS (1), then padding (1 for SigLIP, 0 for SigLIP 2).
  texts = np.asarray([[5, 9, 1, 1, 1, 1], [7, 8, 12, 30, 3, 1], [4, 1, 0, 0, 0, 0]],
                     np.int32)
  return images, texts


def assert_same_tree(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ------------------------------------------------------------- NumPy reference, float64


def _ln(x, p):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def _gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def reference_text(p, texts):
  """big_vision's text transformer written out: embed + posemb, pre-LN blocks with
  unmasked attention over every position (padding included), encoder_norm, the last
  position, head, then z / (|z| + 1e-8)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  x = p["Embed_0"]["embedding"][texts] + p["pos_embedding"]
  for i in range(2):
    blk = p["Encoder_0"][f"encoderblock_{i}"]
    a = blk["MultiHeadDotProductAttention_0"]
    y = _ln(x, blk["LayerNorm_0"])
    q, k, v = (np.einsum("bld,dhk->blhk", y, a[n]["kernel"]) + a[n]["bias"]
               for n in ("query", "key", "value"))
    logits = np.einsum("bqhk,blhk->bhql", q, k) / np.sqrt(q.shape[-1])
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    o = np.einsum("bhql,blhk->bqhk", w, v)
    x = x + np.einsum("bqhk,hkd->bqd", o, a["out"]["kernel"]) + a["out"]["bias"]
    m = blk["MlpBlock_0"]
    y = _ln(x, blk["LayerNorm_1"])
    y = _gelu_tanh(y @ m["Dense_0"]["kernel"] + m["Dense_0"]["bias"])
    x = x + y @ m["Dense_1"]["kernel"] + m["Dense_1"]["bias"]
  x = _ln(x, p["Encoder_0"]["encoder_norm"])[:, -1]
  z = x @ p["head"]["kernel"] + p["head"]["bias"]
  return z / (np.linalg.norm(z, axis=-1, keepdims=True) + 1e-8)


# -------------------------------------------------------------------------- the model


def test_outputs_are_normalised_and_logits_follow_the_formula():
  model, params = two_tower_params()
  images, texts = inputs()
  zimg, ztxt, out = embed(model, params, images, texts)
  assert zimg.shape == (2, 32) and ztxt.shape == (3, EMBED)
  np.testing.assert_allclose(np.linalg.norm(zimg, axis=-1), 1, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(ztxt, axis=-1), 1, rtol=1e-5)
  np.testing.assert_allclose(out["t"], [10.0], rtol=1e-6)  # exp(t)
  np.testing.assert_array_equal(out["b"], [-3.0])
  np.testing.assert_allclose(two_towers.logits(zimg, ztxt, out),
                             np.asarray(zimg) @ np.asarray(ztxt).T * 10.0 - 3.0,
                             rtol=1e-5, atol=1e-5)
  # The image embedding is the ViT's output, normalised.
  raw, _ = apply(IMG, params["img"], images)
  np.testing.assert_allclose(zimg, raw / np.linalg.norm(raw, axis=-1, keepdims=True),
                             rtol=1e-5, atol=1e-6)
  # Either tower alone.
  zi, zt, _ = apply(model, params, images, None)
  assert zt is None and np.allclose(zi, zimg, atol=1e-6)
  zi, zt, _ = apply(model, params, None, texts)
  assert zi is None and np.allclose(zt, ztxt, atol=1e-6)


def test_text_tower_matches_numpy_with_padding_attended_and_last_position_pooled():
  model, params = two_tower_params()
  images, texts = inputs()
  _, ztxt, _ = embed(model, params, images, texts)
  np.testing.assert_allclose(ztxt, reference_text(params["txt"], texts), atol=2e-5)
  # No padding mask: the pad ids are tokens like any other (SigLIP pads with 1,
  # SigLIP 2 with 0), so the same words padded differently embed differently.
  padded = texts.copy()
  padded[0, 3:] = 0
  _, z2, _ = embed(model, params, images, padded)
  np.testing.assert_allclose(z2[0], reference_text(params["txt"], padded)[0], atol=2e-5)
  assert not np.allclose(z2[0], ztxt[0], atol=1e-3)


@pytest.mark.parametrize("pool", ["first", "gap", "max", "map"])
def test_other_pool_types_of_big_vision(pool):
  model = TXT.clone(pool_type=pool, normalize=True)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, LENGTH), jnp.int32))["params"]
  assert ("MAPHead_0" in shapes) == (pool == "map")
  z, aux = apply(model, random_tree(shapes, 3), inputs()[1])
  x = np.asarray(aux["transformed"])
  want = {"first": x[:, 0], "gap": x.mean(1), "max": x.max(1)}.get(pool)
  if want is not None:
    np.testing.assert_allclose(aux["pre_logits"], want, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(z, axis=-1), 1, rtol=1e-5)


def test_texts_of_the_wrong_length_or_dtype_fail_clearly():
  model, params = two_tower_params()
  images, texts = inputs()
  with pytest.raises(ValueError, match="takes exactly 6"):
    model.apply({"params": params}, None, texts[:, :4])
  with pytest.raises(ValueError, match="integer token ids"):
    model.apply({"params": params}, None, texts.astype(np.float32))
  with pytest.raises(ValueError, match=r"shape \(B, L\)"):
    model.apply({"params": params}, None, texts[0])


# ------------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("layout,wrapper,bias", [
    ("current", "params", True),      # SigLIP release files
    ("scanned", "params", True),      # SigLIP 2 release files (scanned towers)
    ("scanned", None, False),         # bare, no bias
    ("current", "opt/target", False),
])
def test_files_load_with_both_architectures_inferred(tmp_path, layout, wrapper, bias):
  model, params = two_tower_params(bias)
  path = tmp_path / "siglip.npz"
  siglip.save_npz(params, path, layout=layout, wrapper=wrapper)
  with np.load(path) as f:
    prefix = f"{wrapper}/" if wrapper else ""
    block = ("txt/Encoder_0/encoderblock/" if layout == "scanned"
             else "txt/Encoder_0/encoderblock_1/")
    assert any(k.startswith(prefix + block) for k in f.files)
    assert (prefix + "b" in f.files) == bias
  loaded_model, loaded = mame_jax.load_model(path)
  assert loaded_model == model
  assert_same_tree(loaded, jax.tree.map(np.asarray, params))
  arch = siglip.architecture(dict(np.load(path)))
  assert arch["txt"] == dict(width=32, depth=2, mlp_dim=48, num_heads=4,
                             vocab_size=VOCAB, max_len=LENGTH, pool_type="last",
                             num_classes=EMBED)
  assert arch["bias"] == bias and arch["image_size"] == (IMAGE, IMAGE)


def test_towers_alone_and_scanned_text(tmp_path):
  model, params = two_tower_params()
  path = tmp_path / "siglip.npz"
  siglip.save_npz(params, path)
  images, texts = inputs()
  zimg, ztxt, _ = embed(model, params, images, texts)

  img_model, img_params = mame_jax.load_model(path, tower="img")
  assert img_model == IMG and "txt" not in img_params
  raw, _ = apply(img_model, img_params, images)
  np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=-1, keepdims=True), zimg,
                             atol=1e-6)

  txt_model, txt_params = mame_jax.load_model(path, tower="txt")
  assert txt_model == TXT.clone(normalize=True)
  np.testing.assert_allclose(apply(txt_model, txt_params, texts)[0], ztxt,
                             atol=1e-6)
  scan_model, scan_params = mame_jax.load_model(path, tower="txt", scan=True)
  assert scan_params["Encoder_0"]["encoderblock"]["LayerNorm_0"]["scale"].shape == (2, 32)
  np.testing.assert_allclose(apply(scan_model, scan_params, texts)[0], ztxt,
                             atol=1e-5)


def test_old_text_tower_with_a_second_posemb_adds_them(tmp_path):
  _, params = two_tower_params()
  path = tmp_path / "old.npz"
  siglip.save_npz(params, path)
  arrays = dict(np.load(path))
  half = arrays["params/txt/pos_embedding"] / 2
  arrays["params/txt/pos_embedding"] = half
  arrays["params/txt/Encoder_0/pos_embedding"] = half
  np.savez(path, **arrays)
  _, loaded = mame_jax.load_model(path)
  np.testing.assert_allclose(loaded["txt"]["pos_embedding"], params["txt"]["pos_embedding"],
                             rtol=1e-6)


def test_mame_goes_into_the_image_tower(tmp_path):
  model, params = two_tower_params()
  path = tmp_path / "siglip.npz"
  siglip.save_npz(params, path)
  images, texts = inputs()
  zimg, ztxt, _ = embed(model, params, images, texts)
  # tau >= 1 merges nothing: exactly the plain image tower.
  off, p = mame_jax.load_model(path, merge=merging.MergeConfig(tau=1.0, layers=(0, 1)))
  assert off.img.merge is not None and off.txt.num_classes == EMBED
  zi, zt, _ = embed(off, p, images, texts)
  np.testing.assert_allclose(zi, zimg, atol=1e-6)
  np.testing.assert_array_equal(zt, ztxt)
  # A low tau merges (no class token: num_special=0), and the masked MAP head pools.
  on, p = mame_jax.load_model(path, merge=merging.MergeConfig(tau=-1.0, layers=(0,)))
  zi, zt, out = embed(on, p, images, texts)
  assert int(out["img/tokens_per_block"][0, 0]) < (IMAGE // 8) ** 2
  np.testing.assert_allclose(np.linalg.norm(zi, axis=-1), 1, rtol=1e-5)
  np.testing.assert_array_equal(zt, ztxt)


def test_missing_towers_fail_clearly(tmp_path):
  _, params = two_tower_params()
  vit_only = tmp_path / "vit.npz"
  mame_jax.models.checkpoints.save_npz(params["img"], vit_only, wrapper="params/img")
  # Without a text tower the file is a ViT ...
  model, _ = mame_jax.load_model(vit_only)
  assert isinstance(model, vit._Model)  # pylint: disable=protected-access
  # ... and asking for the text (or both) names what is missing.
  with pytest.raises(ValueError, match="no text tower 'txt/...'.*tower='img'"):
    mame_jax.load_model(vit_only, tower="both")
  with pytest.raises(ValueError, match="no text tower"):
    mame_jax.load_model(vit_only, tower="txt")
  with pytest.raises(ValueError, match="tower must be one of"):
    mame_jax.load_model(vit_only, tower="text")
  # A text tower that does not fit names the key and both shapes.
  path = tmp_path / "siglip.npz"
  siglip.save_npz(params, path)
  arrays = dict(np.load(path))
  arrays["params/txt/Encoder_0/encoderblock_1/MlpBlock_0/Dense_1/bias"] = np.zeros(7)
  np.savez(path, **arrays)
  with pytest.raises(ValueError, match=r"(?s)text tower.*Dense_1/bias.*\(7,\).*\(32,\)"):
    mame_jax.load_model(path)


# ------------------------------------------------------------------------- zero-shot


def test_zero_shot_averages_prompts_per_class_and_caches_them(tmp_path):
  from mame_jax.eval import zeroshot  # pylint: disable=import-outside-toplevel
  from mame_jax.tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
  from tests.test_tokenizers import train_spm  # pylint: disable=import-outside-toplevel
  spm = train_spm(tmp_path, "spm", vocab_size=VOCAB, pad_id=0, eos_id=1, unk_id=2,
                  bos_id=-1)
  tok = Tokenizer(spm, LENGTH, "siglip")
  model, params = two_tower_params()
  path = tmp_path / "siglip.npz"
  siglip.save_npz(params, path)
  model, params = mame_jax.load_model(path, merge=merging.MergeConfig(tau=1.0, layers=(0,)))
  templates = ("a photo of a {}.", "a {} sitting")
  zs = zeroshot.ZeroShot(model, params, tok, templates=templates)
  names = ["cat", "red car", "tree"]
  images = inputs()[0]
  probs = zs.classify(images, names)
  assert probs.shape == (2, 3)
  # By hand: each class's prompts embedded, averaged, renormalised; SigLIP's sigmoid.
  _, ztxt, out = embed(model, params, None, tok([t.format(c) for c in names
                                                 for t in templates]))
  zcls = np.asarray(ztxt).reshape(3, 2, -1).mean(1)
  zcls /= np.linalg.norm(zcls, axis=-1, keepdims=True)
  zimg, _, _ = embed(model, params, images, None)
  want = 1 / (1 + np.exp(-(np.asarray(zimg) @ zcls.T * 10.0 - 3.0)))
  np.testing.assert_allclose(probs, want, rtol=1e-4, atol=1e-5)
  assert zs.class_embeddings(names) is zs.class_embeddings(list(names))  # cached
  np.testing.assert_allclose(zs.classify(images, names, "softmax").sum(-1), 1, rtol=1e-5)
  with pytest.raises(ValueError, match="pieces"):
    zeroshot.ZeroShot(model, params, Tokenizer(train_spm(tmp_path, "big", vocab_size=48,
                                                         pad_id=0, eos_id=1, unk_id=2,
                                                         bos_id=-1), LENGTH))
