"""Specification of mame_jax.models.videomae: transformers' VideoMAE folders (config.json +
model.safetensors) load into the ViT's blocks with the architecture inferred, the
tubelet order, sinusoid table and logits match an independent NumPy transcription of
transformers' model, merging through the one hook keeps tau >= 1 exact and padding
invisible, and bad folders fail clearly without unpickling anything."""

import functools
import json
import math
import pathlib
import pickle

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import mame_jax as mj
from mame_jax.eval.runner import Runner
from mame_jax.models import videomae

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])

# Two shapes of tiny model: (frames, tubelet, image, patch), pooling, and which
# transformers version's bias flag the config carries.
SETTINGS = {
    "mean": dict(frames=4, tubelet=2, image=32, patch=8, mean_pooling=True,
                 flag="qkv_bias", eps=1e-12),
    "token0": dict(frames=3, tubelet=1, image=24, patch=8, mean_pooling=False,
                   flag="qv_bias", eps=1e-6),
}
WIDTH, DEPTH, MLP, HEADS, CLASSES = 32, 2, 64, 2, 5

_jit = functools.partial(jax.jit, static_argnums=0,
                         compiler_options={"xla_backend_optimization_level": 0})


@_jit
def forward(model, params, x):
  return model.apply({"params": params}, x)


def videos(s, n=2, seed=1):
  shape = (n, s["frames"], s["image"], s["image"], 3)
  return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def state_dict(s, seed=0):
  """A random VideoMAEForVideoClassification state dict, transformers' key names
  and (out, in) / (D, 3, t, p, p) layouts."""
  rng = np.random.default_rng(seed)
  w = lambda *shape: rng.normal(0, 0.3, shape).astype(np.float32)
  sd = {"videomae.embeddings.patch_embeddings.projection.weight":
            w(WIDTH, 3, s["tubelet"], s["patch"], s["patch"]),
        "videomae.embeddings.patch_embeddings.projection.bias": w(WIDTH),
        "classifier.weight": w(CLASSES, WIDTH), "classifier.bias": w(CLASSES)}
  for i in range(DEPTH):
    b = f"videomae.encoder.layer.{i}."
    for ln in ("layernorm_before", "layernorm_after"):
      sd[b + ln + ".weight"], sd[b + ln + ".bias"] = 1 + w(WIDTH), w(WIDTH)
    for proj in ("query", "key", "value"):
      sd[b + f"attention.attention.{proj}.weight"] = w(WIDTH, WIDTH)
    sd[b + "attention.attention.q_bias"] = w(WIDTH)
    sd[b + "attention.attention.v_bias"] = w(WIDTH)
    sd[b + "attention.output.dense.weight"], sd[b + "attention.output.dense.bias"] = \
        w(WIDTH, WIDTH), w(WIDTH)
    sd[b + "intermediate.dense.weight"], sd[b + "intermediate.dense.bias"] = w(MLP, WIDTH), w(MLP)
    sd[b + "output.dense.weight"], sd[b + "output.dense.bias"] = w(WIDTH, MLP), w(WIDTH)
  final = "fc_norm" if s["mean_pooling"] else "videomae.layernorm"
  sd[final + ".weight"], sd[final + ".bias"] = 1 + w(WIDTH), w(WIDTH)
  return sd


def write_folder(path, s, sd=None, **config):
  """A transformers folder written by hand (not by mame_jax's writer)."""
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  cfg = {"model_type": "videomae", "image_size": s["image"], "patch_size": s["patch"],
         "num_channels": 3, "num_frames": s["frames"], "tubelet_size": s["tubelet"],
         "hidden_size": WIDTH, "num_hidden_layers": DEPTH, "num_attention_heads": HEADS,
         "intermediate_size": MLP, "hidden_act": "gelu", "layer_norm_eps": s["eps"],
         s["flag"]: True, "use_mean_pooling": s["mean_pooling"], **config}
  (path / "config.json").write_text(json.dumps(cfg))
  save_file(sd if sd is not None else state_dict(s), str(path / "model.safetensors"))
  return path


# ------------------------------------------------- an independent NumPy transcription


def numpy_sinusoid(n, d):
  """transformers' get_sinusoid_encoding_table, written out loop by loop."""
  table = np.zeros((n, d))
  for pos in range(n):
    for j in range(d):
      angle = pos / 10000 ** (2 * (j // 2) / d)
      table[pos, j] = math.sin(angle) if j % 2 == 0 else math.cos(angle)
  return table


def numpy_tubelets(sd, video, s):
  """Conv3d with stride = kernel on (B, 3, T, H, W) pixels, flattened (t, y, x)."""
  x = (((video.astype(np.float64) + 1) / 2 - IMAGENET_MEAN) / IMAGENET_STD)
  x = x.transpose(0, 4, 1, 2, 3)  # (B, 3, T, H, W), transformers' pixel order
  b, c, t, h, w = x.shape
  ts, p = s["tubelet"], s["patch"]
  x = x.reshape(b, c, t // ts, ts, h // p, p, w // p, p)
  kern = sd["videomae.embeddings.patch_embeddings.projection.weight"].astype(np.float64)
  y = np.einsum("bcTtHhWw,dcthw->bTHWd", x, kern)
  y = y + sd["videomae.embeddings.patch_embeddings.projection.bias"]
  return y.reshape(b, -1, y.shape[-1])


def numpy_forward(sd, video, s):
  sd = {k: v.astype(np.float64) for k, v in sd.items()}
  erf = np.vectorize(math.erf)
  gelu = lambda x: 0.5 * x * (1 + erf(x / math.sqrt(2)))

  def ln(x, name, eps):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * sd[name + ".weight"] + sd[name + ".bias"]

  x = numpy_tubelets(sd, video, s)
  x = x + numpy_sinusoid(x.shape[1], WIDTH)[None]
  hd = WIDTH // HEADS
  for i in range(DEPTH):
    b = f"videomae.encoder.layer.{i}."
    y = ln(x, b + "layernorm_before", s["eps"])
    a = b + "attention.attention."
    q = y @ sd[a + "query.weight"].T + sd[a + "q_bias"]
    k = y @ sd[a + "key.weight"].T  # no key bias
    v = y @ sd[a + "value.weight"].T + sd[a + "v_bias"]
    split = lambda z: z.reshape(*z.shape[:2], HEADS, hd).transpose(0, 2, 1, 3)
    logits = split(q) @ split(k).transpose(0, 1, 3, 2) / math.sqrt(hd)
    att = np.exp(logits - logits.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    o = (att @ split(v)).transpose(0, 2, 1, 3).reshape(x.shape)
    x = x + o @ sd[b + "attention.output.dense.weight"].T + sd[b + "attention.output.dense.bias"]
    y = ln(x, b + "layernorm_after", s["eps"])
    y = gelu(y @ sd[b + "intermediate.dense.weight"].T + sd[b + "intermediate.dense.bias"])
    x = x + y @ sd[b + "output.dense.weight"].T + sd[b + "output.dense.bias"]
  if s["mean_pooling"]:
    pooled = ln(x.mean(1), "fc_norm", 1e-5)
  else:
    pooled = ln(x, "videomae.layernorm", s["eps"])[:, 0]
  return pooled @ sd["classifier.weight"].T + sd["classifier.bias"]


@pytest.fixture(scope="module", params=sorted(SETTINGS))
def loaded(request, tmp_path_factory):
  s = SETTINGS[request.param]
  sd = state_dict(s)
  folder = write_folder(tmp_path_factory.mktemp(request.param), s, sd)
  model, params = mj.load_model(str(folder))  # the one loading path
  return s, sd, folder, model, params


# --------------------------------------------------------------------------- the tests


def test_architecture_is_inferred_from_config_and_weights(loaded):
  s, _, _, model, _ = loaded
  assert model == videomae.Model(
      CLASSES, patch_size=s["patch"], tubelet_size=s["tubelet"], width=WIDTH, depth=DEPTH,
      mlp_dim=MLP, num_heads=HEADS, use_mean_pooling=s["mean_pooling"], ln_eps=s["eps"],
      gelu_approximate=False, image_size=s["image"], num_frames=s["frames"])


def test_sinusoid_table_is_transformers_interleaved_float64_table():
  table = videomae.sinusoid_table(7, 12)
  assert table.dtype == np.float64
  np.testing.assert_allclose(table, numpy_sinusoid(7, 12), rtol=0, atol=1e-15)
  np.testing.assert_array_equal(table[0, 0::2], 0.0)  # sin(0) on even channels
  np.testing.assert_array_equal(table[0, 1::2], 1.0)  # cos(0) on odd channels


def test_tubelets_flatten_in_t_y_x_order_and_get_the_sinusoid(loaded):
  s, sd, _, model, params = loaded
  x = videos(s)
  _, aux = forward(model, params, x)
  stem = np.asarray(aux["stem"])
  n = stem.shape[1] * stem.shape[2] * stem.shape[3]
  assert stem.shape[1:4] == (s["frames"] // s["tubelet"], s["image"] // s["patch"],
                             s["image"] // s["patch"])
  np.testing.assert_allclose(stem.reshape(len(x), n, WIDTH), numpy_tubelets(sd, x, s),
                             rtol=1e-4, atol=1e-4)
  added = np.asarray(aux["with_posemb"]) - stem.reshape(len(x), n, WIDTH)
  np.testing.assert_allclose(added, np.broadcast_to(numpy_sinusoid(n, WIDTH), added.shape),
                             atol=1e-5)


def test_logits_match_a_numpy_transcription_of_transformers(loaded):
  s, sd, _, model, params = loaded
  x = videos(s)
  got = np.asarray(forward(model, params, x)[0])
  np.testing.assert_allclose(got, numpy_forward(sd, x, s), rtol=1e-4, atol=1e-4)


def test_writer_writes_back_the_same_folder(loaded, tmp_path):
  s, sd, _, model, params = loaded
  out = videomae.save_transformers(params, tmp_path / "out", model, bias_flag=s["flag"])
  back = load_file(str(out / "model.safetensors"))
  assert sorted(back) == sorted(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
  model2, _ = mj.load_model(str(out))
  assert model2 == model


def test_tau_of_one_is_exactly_the_plain_model(loaded):
  s, _, _, model, params = loaded
  x = videos(s)
  plain, _ = Runner(model, params)(x)
  merged = model.clone(merge=mj.MergeConfig(tau=1.0, layers=(0, 1)))
  y, aux = Runner(merged, params)(x)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(plain))
  n = model.sequence_lengths(x.shape[1:4])[0]
  np.testing.assert_array_equal(np.asarray(aux["tokens_per_block"]), n)


def test_padding_is_invisible_to_the_blocks_and_the_pooling(loaded):
  # Fixed mode at full capacity (every unused slot padded), fixed mode at the
  # tightest capacities that drop nothing, and exact mode must give the same
  # logits: padded rows change neither attention nor pooling.
  s, _, _, model, params = loaded
  x = videos(s, n=3)
  cfg = mj.MergeConfig(tau=0.2, layers=(0, 1), mode="fixed", capacities=(None, None))
  y_full, aux_full = Runner(model.clone(merge=cfg), params).full(x)
  real = np.asarray(aux_full["tokens_per_block"])
  assert (real[:, -1] < real[:, 0]).any(), "tau=0.2 must merge something"
  assert (real[:, -1] < aux_full["token_mask"].shape[1]).all(), "no padding to test"
  tight = tuple(int(c) for c in aux_full["num_preserved"])
  y_tight, aux_tight = Runner(model.clone(merge=cfg.replace(capacities=tight)), params)(x)
  assert not np.asarray(aux_tight["dropped"]).any()
  y_exact, aux_exact = Runner(model.clone(merge=cfg.replace(mode="exact", capacities=None)),
                              params)(x)
  assert not np.asarray(aux_exact["dropped"]).any() and "capacities" in aux_exact
  for y, aux in ((y_tight, aux_tight), (y_exact, aux_exact)):
    np.testing.assert_array_equal(np.asarray(aux["tokens_per_block"]), real)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_full), rtol=1e-4, atol=1e-4)
  records = mj.models.merging.merge_records(aux_full)  # the ViT's accessor works
  assert len(records) == DEPTH and all("info" in r for r in records)


def test_tome_merges_through_the_same_hook(loaded):
  s, _, _, model, params = loaded
  x = videos(s)
  n = model.sequence_lengths(x.shape[1:4])[0]
  y, aux = Runner(model.clone(merge=mj.ToMeConfig(r=2, layers=(0, 1))), params)(x)
  np.testing.assert_array_equal(np.asarray(aux["tokens_per_block"]), [[n - 2, n - 4]] * 2)
  assert np.isfinite(np.asarray(y)).all()


def test_a_folder_without_config_json_is_refused_naming_it(tmp_path):
  s = SETTINGS["mean"]
  folder = write_folder(tmp_path / "m", s)
  (folder / "config.json").unlink()
  with pytest.raises(ValueError, match="no config.json"):
    mj.load_model(str(folder))


class _Tripwire:
  """Unpickling this creates the file ``path``: proof that something unpickled."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return pathlib.Path.touch, (pathlib.Path(self.path),)


def test_a_pickle_only_folder_is_refused_without_unpickling(tmp_path):
  folder = tmp_path / "torch_only"
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps({"model_type": "videomae"}))
  marker = tmp_path / "unpickled"
  (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Tripwire(str(marker))))
  with pytest.raises(ValueError, match=r"pytorch_model\.bin.*safe_serialization=True"):
    mj.load_model(str(folder))
  assert not marker.exists()


def test_mismatched_config_and_unknown_keys_name_the_problem(tmp_path):
  s = SETTINGS["mean"]
  with pytest.raises(ValueError, match="use_mean_pooling"):
    mj.load_model(str(write_folder(tmp_path / "a", s, use_mean_pooling=False)))
  with pytest.raises(ValueError, match="hidden_act"):
    mj.load_model(str(write_folder(tmp_path / "b", s, hidden_act="relu")))
  sd = {**state_dict(s), "videomae.extra.weight": np.zeros(3, np.float32)}
  with pytest.raises(ValueError, match="videomae.extra.weight"):
    mj.load_model(str(write_folder(tmp_path / "c", s, sd)))


def test_videos_are_checked_at_the_runners_door(loaded):
  s, _, _, model, params = loaded
  runner = Runner(model, params)
  with pytest.raises(ValueError, match=r"\(B, T, H, W, 3\).*transpose"):
    runner(videos(s).transpose(0, 1, 4, 2, 3))
  with pytest.raises(ValueError, match="float"):
    runner((videos(s) * 100).astype(np.int32))


def test_known_hub_names_fetch_the_folder_files(tmp_path, monkeypatch):
  # The hub is stood in for by file:// URLs with the same {repo}/{file} layout.
  s = SETTINGS["mean"]
  write_folder(tmp_path / "hub" / videomae.KNOWN_FOLDERS["videomae_b_k400"], s)
  monkeypatch.setattr(videomae, "HUB", (tmp_path / "hub").as_uri() + "/{repo}/{file}")
  monkeypatch.setenv("MAME_JAX_CACHE", str(tmp_path / "cache"))
  model, _ = mj.load_model("videomae_b_k400")
  assert model.width == WIDTH and model.num_classes == CLASSES
  assert len(list((tmp_path / "cache").iterdir())) == 2
