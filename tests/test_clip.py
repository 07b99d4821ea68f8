"""CLIP in the transformers layout, its tokenizer, zero-shot and the vision-token API.

The checkpoints are small random CLIPModel folders written here in the transformers
layout (config.json + model.safetensors, torch shapes), with a byte-level BPE
tokenizer.json trained here. The reference is a float64 NumPy transcription of
transformers' CLIP forward over the torch-layout state dict itself (so the key
mapping is checked too): class slot in the position table, pre-encoder LayerNorm,
quick-GELU, causal text attention, end-of-text pooling (both rules),
post-LayerNorm on the class token, projections without bias.
"""

import json
import pickle

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file
from scipy.special import erf

import mame_jax
from mame_jax import tokenizers
from mame_jax.buckets import TraceCounter
from mame_jax.eval import zeroshot
from mame_jax.models import clip, load, merging, two_towers, vit

CORPUS = ["a photo of a cat", "a photo of a dog", "a bad photo of the small bird",
          "itap of a red car", "a close-up photo of a large fish", "the dog and the cat"]

# Two architectures: widths, heads, text lengths, activations and end-of-text rules.
ARCHS = {
    "quick_gelu": dict(v_width=32, v_heads=2, v_mlp=64, patch=8, image=32, t_width=32,
                       t_heads=2, t_mlp=64, length=16, proj=24, act="quick_gelu",
                       legacy_eos=False),
    "gelu_legacy": dict(v_width=48, v_heads=3, v_mlp=96, patch=8, image=40, t_width=40,
                        t_heads=2, t_mlp=80, length=12, proj=16, act="gelu",
                        legacy_eos=True),
}
DEPTH = 2
EPS = 1e-5


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
  """A BPE tokenizer.json (CLIP's ``</w>`` word ends) trained on CORPUS, specials
  first (ids 0, 1)."""
  from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>"))
  tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.decoder = decoders.BPEDecoder(suffix="</w>")
  trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=[
      "<|startoftext|>", "<|endoftext|>"], end_of_word_suffix="</w>")
  tok.train_from_iterator(CORPUS, trainer)
  path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
  tok.save(str(path))
  return path


def _layer_state(rng, prefix, width, mlp, depth):
  sd = {}
  for i in range(depth):
    p = f"{prefix}encoder.layers.{i}."
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
      sd[p + f"self_attn.{name}.weight"] = rng.normal(0, width ** -0.5, (width, width))
      sd[p + f"self_attn.{name}.bias"] = rng.normal(0, 0.1, (width,))
    for n in ("layer_norm1", "layer_norm2"):
      sd[p + f"{n}.weight"] = 1 + rng.normal(0, 0.1, (width,))
      sd[p + f"{n}.bias"] = rng.normal(0, 0.1, (width,))
    sd[p + "mlp.fc1.weight"] = rng.normal(0, width ** -0.5, (mlp, width))
    sd[p + "mlp.fc1.bias"] = rng.normal(0, 0.1, (mlp,))
    sd[p + "mlp.fc2.weight"] = rng.normal(0, mlp ** -0.5, (width, mlp))
    sd[p + "mlp.fc2.bias"] = rng.normal(0, 0.1, (width,))
  return sd


def write_clip_folder(folder, arch, vocab, eos_id, seed=0, vision_only=False):
  """A random CLIPModel folder in the transformers layout; returns its float64
  state dict (torch shapes) and config."""
  a = arch
  rng = np.random.default_rng(seed)
  grid = a["image"] // a["patch"]
  sd = {"vision_model.embeddings.class_embedding": rng.normal(0, 0.5, (a["v_width"],)),
        "vision_model.embeddings.patch_embedding.weight":
            rng.normal(0, 0.1, (a["v_width"], 3, a["patch"], a["patch"])),
        "vision_model.embeddings.position_embedding.weight":
            rng.normal(0, 0.5, (grid * grid + 1, a["v_width"])),
        "vision_model.embeddings.position_ids": np.arange(grid * grid + 1)[None]}
  for n in ("pre_layrnorm", "post_layernorm"):
    sd[f"vision_model.{n}.weight"] = 1 + rng.normal(0, 0.1, (a["v_width"],))
    sd[f"vision_model.{n}.bias"] = rng.normal(0, 0.1, (a["v_width"],))
  sd.update(_layer_state(rng, "vision_model.", a["v_width"], a["v_mlp"], DEPTH))
  sd["visual_projection.weight"] = rng.normal(0, a["v_width"] ** -0.5, (a["proj"], a["v_width"]))
  if not vision_only:
    sd["text_model.embeddings.token_embedding.weight"] = rng.normal(0, 0.5, (vocab, a["t_width"]))
    sd["text_model.embeddings.position_embedding.weight"] = rng.normal(
        0, 0.2, (a["length"], a["t_width"]))
    sd["text_model.final_layer_norm.weight"] = 1 + rng.normal(0, 0.1, (a["t_width"],))
    sd["text_model.final_layer_norm.bias"] = rng.normal(0, 0.1, (a["t_width"],))
    sd.update(_layer_state(rng, "text_model.", a["t_width"], a["t_mlp"], DEPTH))
    sd["text_projection.weight"] = rng.normal(0, a["t_width"] ** -0.5, (a["proj"], a["t_width"]))
    sd["logit_scale"] = np.asarray(np.log(1 / 0.07))
  vcfg = dict(hidden_size=a["v_width"], num_attention_heads=a["v_heads"],
              num_hidden_layers=DEPTH, intermediate_size=a["v_mlp"], patch_size=a["patch"],
              image_size=a["image"], hidden_act=a["act"], layer_norm_eps=EPS)
  tcfg = dict(hidden_size=a["t_width"], num_attention_heads=a["t_heads"],
              num_hidden_layers=DEPTH, intermediate_size=a["t_mlp"], vocab_size=vocab,
              max_position_embeddings=a["length"], hidden_act=a["act"], layer_norm_eps=EPS,
              eos_token_id=2 if a["legacy_eos"] else eos_id)
  config = ({"model_type": "clip_vision_model", **vcfg} if vision_only else
            {"model_type": "clip", "architectures": ["CLIPModel"], "projection_dim": a["proj"],
             "vision_config": vcfg, "text_config": tcfg})
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "config.json").write_text(json.dumps(config))
  save_file({k: np.ascontiguousarray(v, np.int64 if k.endswith("position_ids") else np.float32)
             for k, v in sd.items()}, str(folder / "model.safetensors"))
  return {k: np.asarray(v, np.float64) for k, v in sd.items()}, config


# ------------------------------------------------------------------------------------
# The NumPy transcription of transformers' CLIP (float64).


def ln(x, sd, name):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + EPS) * sd[name + ".weight"] + sd[name + ".bias"]


def act(x, kind):
  if kind == "quick_gelu":
    return x / (1 + np.exp(-1.702 * x))
  return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def lin(x, sd, name):
  return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def ref_layer(x, sd, p, heads, kind, causal):
  b, n, d = x.shape
  h = ln(x, sd, p + "layer_norm1")
  q, k, v = (lin(h, sd, p + f"self_attn.{m}_proj").reshape(b, n, heads, -1)
             for m in "qkv")
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // heads)
  if causal:
    logits = np.where(np.tril(np.ones((n, n), bool)), logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  y = np.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, n, d)
  x = x + lin(y, sd, p + "self_attn.out_proj")
  h = act(lin(ln(x, sd, p + "layer_norm2"), sd, p + "mlp.fc1"), kind)
  return x + lin(h, sd, p + "mlp.fc2")


def ref_vision(sd, images, arch):
  """-> (image_embeds (B, E) unnormalised, hidden_states [after each layer])."""
  p = arch["patch"]
  x = ((np.asarray(images, np.float64) + 1) / 2 - np.asarray(clip.CLIP_MEAN)) / \
      np.asarray(clip.CLIP_STD)
  b, h, w, _ = x.shape
  patches = x.reshape(b, h // p, p, w // p, p, 3).transpose(0, 1, 3, 5, 2, 4)
  patches = patches.reshape(b, (h // p) * (w // p), 3 * p * p)
  w_patch = sd["vision_model.embeddings.patch_embedding.weight"]
  emb = patches @ w_patch.reshape(w_patch.shape[0], -1).T
  cls = np.broadcast_to(sd["vision_model.embeddings.class_embedding"], (b, 1, emb.shape[-1]))
  x = np.concatenate([cls, emb], 1) + sd["vision_model.embeddings.position_embedding.weight"]
  x = ln(x, sd, "vision_model.pre_layrnorm")
  hidden = []
  for i in range(DEPTH):
    x = ref_layer(x, sd, f"vision_model.encoder.layers.{i}.", arch["v_heads"], arch["act"],
                  causal=False)
    hidden.append(x)
  pooled = ln(x[:, 0], sd, "vision_model.post_layernorm")
  return pooled @ sd["visual_projection.weight"].T, hidden


def ref_text(sd, ids, arch, eos_id):
  x = sd["text_model.embeddings.token_embedding.weight"][ids]
  x = x + sd["text_model.embeddings.position_embedding.weight"][:ids.shape[1]]
  for i in range(DEPTH):
    x = ref_layer(x, sd, f"text_model.encoder.layers.{i}.", arch["t_heads"], arch["act"],
                  causal=True)
  x = ln(x, sd, "text_model.final_layer_norm")
  at = ids.argmax(-1) if arch["legacy_eos"] else (ids == eos_id).argmax(-1)
  return x[np.arange(len(ids)), at] @ sd["text_projection.weight"].T


def unit(z):
  return z / np.linalg.norm(z, axis=-1, keepdims=True)


def smooth_images(n, size, seed=0):
  """Blocky images (neighbouring patches alike, so MaMe finds merges), [-1, 1]."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(-1, 1, (n, 2, 2, 3))
  img = np.repeat(np.repeat(coarse, size // 2 + 1, 1), size // 2 + 1, 2)[:, :size, :size]
  return (img + rng.normal(0, 0.02, img.shape)).astype(np.float32)


def _case(name, tmp_path_factory, tokenizer_json):
  arch = ARCHS[name]
  tok = tokenizers.CLIPTokenizer(tokenizer_json, length=arch["length"])
  folder = tmp_path_factory.mktemp(f"clip_{name}")
  sd, config = write_clip_folder(folder, arch, tok.vocab_size, tok.eos_id)
  model, params = mame_jax.load_model(str(folder))
  return dict(arch=arch, tok=tok, folder=folder, sd=sd, config=config, model=model,
              params=params, images=smooth_images(3, arch["image"]))


@pytest.fixture(scope="module", params=sorted(ARCHS))
def case(request, tmp_path_factory, tokenizer_json):
  """Each architecture: for what depends on it (loading, the forward)."""
  return _case(request.param, tmp_path_factory, tokenizer_json)


@pytest.fixture(scope="module")
def one(tmp_path_factory, tokenizer_json):
  """One architecture: for what does not (tokenizer, errors, vision tokens)."""
  return _case("quick_gelu", tmp_path_factory, tokenizer_json)


# ------------------------------------------------------------------------------------
# Loading, architecture, the forward against the transcription.


def test_architecture_inferred(case):
  a, model = case["arch"], case["model"]
  assert isinstance(model, two_towers.Model) and model.bias_init is None
  assert model.activation == "softmax"
  img, txt = model.img, model.txt
  assert (img.width, img.depth, img.num_heads, img.mlp_dim, vit.pair(img.patch_size)) == (
      a["v_width"], DEPTH, a["v_heads"], a["v_mlp"], (a["patch"],) * 2)
  assert img.pre_norm and img.pool_type == "tok" and img.num_classes == a["proj"]
  assert img.activation == ("quick_gelu" if a["act"] == "quick_gelu" else "gelu")
  assert img.ln_eps == EPS and vit.image_size_of(img, case["params"]["img"]) == a["image"]
  assert (txt.width, txt.num_heads, txt.max_len, txt.num_classes, txt.causal) == (
      a["t_width"], a["t_heads"], a["length"], a["proj"], True)
  assert txt.pool_type == ("argmax" if a["legacy_eos"] else "eos")
  assert txt.vocab_size == case["tok"].vocab_size


def test_two_towers_match_transcription(case):
  """Both end-of-text rules are pinned here: the texts are padded with EOS, so the
  first EOS (eos_token_id set) and the largest id (legacy 2) are different
  positions, and a wrong rule gives other text embeddings."""
  a, sd, tok = case["arch"], case["sd"], case["tok"]
  ids = tok(CORPUS[:4])
  zimg, ztxt, out = jax.jit(case["model"].apply)({"params": case["params"]}, case["images"],
                                                 ids)
  ref_img, _ = ref_vision(sd, case["images"], a)
  ref_txt = ref_text(sd, ids, a, tok.eos_id)
  np.testing.assert_allclose(zimg, unit(ref_img), atol=2e-5)
  np.testing.assert_allclose(ztxt, unit(ref_txt), atol=2e-5)
  assert "b" not in out
  np.testing.assert_allclose(out["t"], [1 / 0.07], rtol=1e-6)
  ref_logits = unit(ref_img) @ unit(ref_txt).T / 0.07
  np.testing.assert_allclose(two_towers.logits(zimg, ztxt, out), ref_logits, atol=3e-4)
  # The image tower's own output: the projected class token, unnormalised.
  np.testing.assert_allclose(zimg * out["img/norm"], ref_img, rtol=1e-4, atol=1e-4)
  img_model, img_params = mame_jax.load_model(str(case["folder"]), tower="img")
  assert img_model == case["model"].img
  jax.tree.map(np.testing.assert_array_equal, img_params, case["params"]["img"])


def short_ids(n, vocab, eos_id, seed=0):
  """``(4, n)`` ids as a tokenizer padding to the batch's longest text gives them,
  and then some: random ids, the first row ending in EOS, the second with EOS in
  the middle and EOS padding after it, the third with EOS twice and other ids
  between, the last with no EOS at all (both rules then read position 0, the
  argmax one wherever the largest id is)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, vocab, (4, n))
  ids[ids == eos_id] = (eos_id + 1) % vocab
  ids[0, -1] = eos_id
  ids[1, n // 2:] = eos_id
  ids[2, [n // 3, n - 1]] = eos_id
  return ids.astype(np.int32)


@pytest.mark.parametrize("n", [1, 5, "full"])
def test_texts_of_any_length_up_to_the_table_match_transcription(case, n):
  """transformers' CLIPTextModel takes ``input_ids`` of any length up to
  ``max_position_embeddings`` (position ids ``0..n-1``); so does the text tower,
  with both end-of-text rules (the two architectures), and refuses longer ones."""
  a, sd, tok = case["arch"], case["sd"], case["tok"]
  n = a["length"] if n == "full" else n
  ids = short_ids(n, tok.vocab_size, tok.eos_id)
  _, ztxt, _ = case["model"].apply({"params": case["params"]}, None, ids)
  np.testing.assert_allclose(ztxt, unit(ref_text(sd, ids, a, tok.eos_id)), atol=2e-5)
  if n == a["length"]:
    with pytest.raises(ValueError, match=f"texts have {n + 1} tokens but the text tower "
                       f"takes at most {n}"):
      case["model"].apply({"params": case["params"]}, None, short_ids(n + 1, 10, 1))
    shorter = tokenizers.CLIPTokenizer(tok.path, length=n - 3)
    zeroshot.ZeroShot(case["model"], case["params"], shorter)  # accepted
    with pytest.raises(ValueError, match=f"tokenizer length {n + 1}: the text tower takes "
                       f"at most {n}"):
      zeroshot.ZeroShot(case["model"], case["params"],
                        tokenizers.CLIPTokenizer(tok.path, length=n + 1))


# ------------------------------------------------------------------------------------
# Tokenizer and zero-shot.


def test_tokenizer_layout_and_truncation(one):
  tok, length = one["tok"], one["arch"]["length"]
  ids = tok(["a photo of a cat", "the dog " * 40])
  assert ids.shape == (2, length) and ids.dtype == np.int32
  assert (ids[:, 0] == tok.bos_id).all()
  n = len(tok.encode("a photo of a cat"))
  assert ids[0, n - 1] == tok.eos_id and (ids[0, n:] == tok.pad_id).all()
  assert ids[1, -1] == tok.eos_id and tok.eos_id not in ids[1, :-1]


def test_zero_shot_softmax(one):
  model, params, tok = one["model"], one["params"], one["tok"]
  zs = zeroshot.ZeroShot(model, params, tok, templates=("a photo of a {}.", "itap of a {}."))
  assert zs.activation == "softmax"
  p = np.asarray(zs.classify(one["images"], ["cat", "dog", "fish"]))
  assert p.shape == (3, 3)
  np.testing.assert_allclose(p.sum(-1), 1, rtol=1e-5)


def test_vocab_mismatch_and_non_clip_fail_clearly(one, tmp_path):
  # A tokenizer of another vocabulary than the embedding table.
  case, config = one, dict(one["config"])
  other = tmp_path / "other"
  write_clip_folder(other, ARCHS["quick_gelu"], vocab=case["tok"].vocab_size + 5, eos_id=1)
  model, params = mame_jax.load_model(str(other))
  with pytest.raises(ValueError, match=r"has \d+ pieces but .* \d+ rows"):
    tokenizers.check_vocab(case["tok"], params)
  # Not a CLIP folder.
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "config.json").write_text(json.dumps({"model_type": "bert"}))
  save_file({"x": np.zeros(2, np.float32)}, str(bad / "model.safetensors"))
  with pytest.raises(ValueError, match="model_type is 'bert'.*CLIP"):
    clip.load_model(bad)
  # A CLIP config over weights that are not CLIP's.
  (bad / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="not a transformers CLIP state dict"):
    mame_jax.load_model(str(bad))
  # Only pickles: refused without unpickling.
  pk = tmp_path / "pickled"
  pk.mkdir()
  (pk / "config.json").write_text(json.dumps(config))
  (pk / "pytorch_model.bin").write_bytes(pickle.dumps({"never": "read"}))
  with pytest.raises(ValueError, match=r"pytorch_model\.bin.*CLIPModel"):
    mame_jax.load_model(str(pk))
  # An image tower alone loads as a ViT and refuses tower="both".
  vis = tmp_path / "vision"
  write_clip_folder(vis, ARCHS["quick_gelu"], vocab=10, eos_id=1, vision_only=True)
  assert isinstance(mame_jax.load_model(str(vis), tower="img")[0], vit._Model)  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="tower='img'"):
    mame_jax.load_model(str(vis))
  with pytest.raises(FileNotFoundError, match="CLIP tokenizer"):
    tokenizers.CLIPTokenizer(tmp_path / "nope.json")
  del model


# ------------------------------------------------------------------------------------
# The vision-token API.


def _with_merge(case, merge, tower="both"):
  return mame_jax.load_model(str(case["folder"]), merge=merge, tower=tower)


def test_vision_tokens_unmerged_equal_hidden_states(one):
  case = one
  a = case["arch"]
  _, hidden = ref_vision(case["sd"], case["images"], a)
  patches = (a["image"] // a["patch"]) ** 2
  plain = mame_jax.vision_tokens(case["model"], case["params"], case["images"], layer=-2)
  tokens, sizes, mask = plain  # LLaVA-1.5's: the penultimate layer, no class token
  assert tokens.shape == (3, patches, a["v_width"]) and bool(mask.all())
  np.testing.assert_allclose(tokens, hidden[-2][:, 1:], atol=5e-5)
  np.testing.assert_array_equal(sizes, np.ones((3, patches)))
  # tau >= 1: exactly the unmerged encoder's tokens, with the class token if asked.
  model, params = _with_merge(case, merging.MergeConfig(tau=1.0, layers=(0, 1)))
  merged = mame_jax.vision_tokens(model, params, case["images"], layer=-2)
  for got, want in zip(merged, plain):
    np.testing.assert_array_equal(got, want)
  with_cls = mame_jax.vision_tokens(model, params, case["images"], layer=0, drop_special=False)
  np.testing.assert_allclose(with_cls[0], hidden[0], atol=5e-5)
  assert float(with_cls[1][0, 0]) == 0.0
  with pytest.raises(ValueError, match="layer=2"):
    mame_jax.vision_tokens(model, params, case["images"], layer=2)


@pytest.mark.parametrize("method", ["mame", "tome"])
def test_vision_tokens_merged_sizes_and_padding(one, method):
  case = one
  a = case["arch"]
  patches = (a["image"] // a["patch"]) ** 2
  merge = (merging.MergeConfig(tau=0.5, layers=(0,)) if method == "mame"
           else merging.ToMeConfig(r=4))
  model, params = _with_merge(case, merge, tower="img")
  tokens, sizes, mask = mame_jax.vision_tokens(model, params, case["images"], layer=-1)
  real = np.asarray(mask.sum(-1))
  assert (real < patches).all(), real
  np.testing.assert_allclose(np.asarray(sizes).sum(-1), patches, rtol=1e-5)
  assert (np.asarray(sizes)[np.asarray(mask)] >= 1 - 1e-6).all()
  assert not np.asarray(tokens)[~np.asarray(mask)].any()
  assert not np.asarray(sizes)[~np.asarray(mask)].any()
  # pad_to packs the batch to one length; the real tokens do not change.
  packed = mame_jax.vision_tokens(model, params, case["images"], layer=-1, pad_to=patches + 3)
  assert packed[0].shape[1] == patches + 3
  for got, want in zip(packed, (tokens, sizes, mask)):
    np.testing.assert_array_equal(np.asarray(got)[:, :want.shape[1]], want)
  assert not np.asarray(packed[2])[:, want.shape[1]:].any()
  tight = mame_jax.vision_tokens(model, params, case["images"], layer=-1, pad_to=int(real.max()))
  np.testing.assert_array_equal(tight[0], np.asarray(tokens)[:, :int(real.max())])
  if method == "mame":
    # Padding left by a larger capacity is invisible: a capacity that just fits
    # gives the same real tokens.
    # r preserved sources (batch-wide) beside the M = P // 2 destinations.
    r = int(real.max()) - patches // 2
    fit, fit_params = _with_merge(case, merge.replace(capacities=(r,), mode="fixed"), "img")
    small = mame_jax.vision_tokens(fit, fit_params, case["images"], layer=-1)
    assert small[0].shape[1] < tokens.shape[1]
    n = small[0].shape[1]
    np.testing.assert_allclose(small[0], np.asarray(tokens)[:, :n], atol=1e-5)
    np.testing.assert_allclose(small[1], np.asarray(sizes)[:, :n], atol=1e-6)
    np.testing.assert_array_equal(small[2], np.asarray(mask)[:, :n])


def test_vision_tokens_one_program_per_capacity(one):
  case, counter = one, TraceCounter()
  model, params = _with_merge(case, merging.MergeConfig(tau=0.5, layers=(0,)), tower="img")
  run = jax.jit(counter(lambda p, x, *, cap: mame_jax.vision_tokens(
      model.clone(merge=model.merge.replace(capacities=(cap,), mode="fixed")), p, x,
      layer=-1, pad_to=40)), static_argnames="cap")
  images = case["images"]
  shapes = set()
  for cap in (2, 4, 2, 4, 2):
    tokens, _, mask = run(params, images, cap=cap)
    shapes.add(tokens.shape)
  assert counter.count == 2 and shapes == {(3, 40, case["arch"]["v_width"])}
  with pytest.raises(ValueError, match="pad_to=3 is less than the static length"):
    jax.jit(lambda p, x: mame_jax.vision_tokens(model, p, x, pad_to=3))(params, images)


def test_vision_tokens_siglip_like_tower():
  """A SigLIP-style tower (no class token, MAP head): the last block's tokens, no
  pooling; norm=True is the encoder_norm on them."""
  model, params = load.random_vit(32, depth=2, width=32, patch_size=8, pool_type="map")
  images = smooth_images(2, 32)
  _, aux = jax.jit(model.apply)({"params": params}, images)
  tokens, sizes, mask = mame_jax.vision_tokens(model, params, images, norm=True)
  assert tokens.shape == (2, 16, 32) and bool(mask.all())
  np.testing.assert_array_equal(sizes, np.ones((2, 16)))
  np.testing.assert_allclose(tokens, aux["encoded"], atol=1e-5)
