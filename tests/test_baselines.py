"""EViT and DiffRate, Table 1's other baselines, against transcriptions of their
reference code's rules (youweiliang/evit ``evit.py``; OpenGVLab/DiffRate
``DiffRate/patch/deit.py`` and ``DiffRate/merge.py``), written here in float64
NumPy, and inside the ViT."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mame_jax as mj
from mame_jax import diffrate as diffrate_lib
from mame_jax import evit as evit_lib
from mame_jax.models import vit
from mame_jax.models.merging import DiffRateConfig, EViTConfig

TINY = dict(width=32, depth=4, num_heads=2, mlp_dim=64, patch_size=8)


def _attention_rows(rng, b, length):
  logits = rng.normal(size=(b, length)) * 2
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


# --------------------------- transcriptions ---------------------------------

def evit_reference(x, attn_row, keep_rate, fuse):
  """EViT's Block.forward after attention, one sample at a time."""
  out = []
  for xb, ab in zip(x, attn_row):
    n = xb.shape[0] - 1
    left = math.ceil(keep_rate * n)
    if left == n:
      out.append(xb)
      continue
    cls_attn = ab[1:]
    idx = sorted(range(n), key=lambda j: (-cls_attn[j], j))[:left]   # topk, sorted
    kept = xb[1:][idx]
    rows = [xb[:1], kept]
    if fuse:
      compl = sorted(set(range(n)) - set(idx))                         # complement_idx
      rows.append((xb[1:][compl] * cls_attn[compl][:, None]).sum(0, keepdims=True))
    out.append(np.concatenate(rows))
  return np.stack(out)


def diffrate_reference(x, attn_row, size, prune, merge):
  """DiffRateBlock.forward (inference) after attention, one sample at a time:
  sort by class attention, slice to ``prune``, ``get_merge_func(x, merge)``."""
  xs_out, ss_out = [], []
  for xb, ab, sb in zip(x, attn_row, size):
    idx = [0] + [1 + j for j in sorted(range(len(ab) - 1), key=lambda j: (-ab[1 + j], j))]
    xb, sb = xb[idx][:prune], sb[idx][:prune]
    if merge < prune:
      metric = xb / np.linalg.norm(xb, axis=-1, keepdims=True)
      sim = metric[merge:] @ metric[:merge].T
      sim[:, 0] = -np.inf
      node_idx, node_max = sim.argmax(-1), sim.max(-1)
      dst, cnt = xb[:merge].copy(), np.ones(merge)
      dsize = sb[:merge].copy()
      for s, d in enumerate(node_idx):   # scatter_reduce "mean", include_self
        dst[d] += xb[merge + s]
        cnt[d] += 1
        dsize[d] += sb[merge + s] * node_max[s]   # size * node_max, then "sum"
      xb, sb = dst / cnt[:, None], dsize
    xs_out.append(xb)
    ss_out.append(sb)
  return np.stack(xs_out), np.stack(ss_out)


# ------------------------------ the ops -------------------------------------

@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("keep_rate", [0.5, 0.7])
def test_evit_step_follows_the_reference(keep_rate, fuse):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 12, 6))
  a = _attention_rows(rng, 3, 12)
  keep = evit_lib.keep_count(11, keep_rate)
  assert keep == math.ceil(keep_rate * 11)
  y, record = evit_lib.evit(jnp.asarray(x, jnp.float32), jnp.asarray(a, jnp.float32), keep,
                            fuse=fuse)
  want = evit_reference(x, a, keep_rate, fuse)
  assert y.shape == want.shape == (3, 1 + keep + fuse, 6)
  np.testing.assert_allclose(np.asarray(y), want, atol=1e-5)
  # The record says where every input token went, and with which weight.
  src = np.asarray(record.source)
  assert (src[:, 0] == 0).all()
  for b in range(3):
    for i, slot in enumerate(np.asarray(record.keep_idx[b])):
      assert src[b, slot] == 1 + i
    dropped = (src[b] == -1)
    assert dropped.sum() == (0 if fuse else 11 - keep)
    if fuse:
      fused = src[b] == keep + 1
      np.testing.assert_allclose(np.asarray(record.weight[b])[fused], a[b][fused], rtol=1e-6)


def test_evit_keep_all_is_the_identity_and_bad_keep_fails():
  x = jnp.ones((1, 5, 4))
  y, record = evit_lib.evit(x, jnp.full((1, 5), 0.2), 4)
  assert record is None and y is x
  with pytest.raises(ValueError, match="keep must be in"):
    evit_lib.evit(x, jnp.full((1, 5), 0.2), 5)
  with pytest.raises(ValueError, match="cls_attn must be"):
    evit_lib.evit(x, jnp.full((1, 4), 0.2), 2)


@pytest.mark.parametrize("prune,merge", [(12, 7), (9, 9), (9, 4), (14, 10)])
def test_diffrate_step_follows_the_reference(prune, merge):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(3, 14, 6))
  a = _attention_rows(rng, 3, 14)
  size = rng.uniform(1, 3, size=(3, 14))
  y, s, record = diffrate_lib.diffrate(jnp.asarray(x, jnp.float32), jnp.asarray(a, jnp.float32),
                                       jnp.asarray(size, jnp.float32), prune, merge)
  want_x, want_s = diffrate_reference(x, a, size, prune, merge)
  np.testing.assert_allclose(np.asarray(y), want_x, atol=1e-5)
  np.testing.assert_allclose(np.asarray(s), want_s, atol=1e-5)
  src = np.asarray(record.source)
  assert record.num_out == merge and src[:, 0].tolist() == [0, 0, 0]
  assert ((src >= 0).sum(1) == prune).all()       # pruned tokens go nowhere


def test_diffrate_removing_nothing_is_the_identity():
  x = jnp.ones((2, 6, 4))
  y, s, record = diffrate_lib.diffrate(x, jnp.full((2, 6), 1 / 6), None, 8, 6)
  assert record is None and y is x and s.shape == (2, 6)


# ---------------------------- inside the ViT ---------------------------------

@pytest.fixture(scope="module")
def setup():
  from tests.test_model_merge import photos
  x = photos(3)
  model = mj.Model(10, pool_type="tok", head_zeroinit=False, **TINY)
  params = jax.jit(model.init)(jax.random.key(0), x)["params"]
  return x, model, params


def test_class_attention_row_is_the_softmax_row_of_the_class_query():
  rng = np.random.default_rng(2)
  q = rng.normal(size=(2, 7, 3, 4))
  k = rng.normal(size=(2, 7, 3, 4))
  bias = rng.normal(size=(2, 7))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / 2.0 + bias[:, None, None, :]
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p = p / p.sum(-1, keepdims=True)
  got = vit.class_attention(jnp.asarray(q[:, 0]), jnp.asarray(k), bias=jnp.asarray(bias))
  np.testing.assert_allclose(np.asarray(got), p[:, :, 0].mean(1), atol=1e-6)


def test_keep_rate_one_and_an_identity_schedule_give_exactly_the_plain_model(setup):
  x, model, params = setup
  plain, _ = mj.Runner(model, params)(x)
  for cfg in (EViTConfig(keep_rate=1.0, layers=(1, 2)),
              DiffRateConfig(prune=(65,) * 4, merge=(65,) * 4)):
    y, aux = mj.Runner(model.clone(merge=cfg), params)(x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(plain))
    np.testing.assert_array_equal(np.asarray(aux["tokens_per_block"]), 65)


def test_evit_and_diffrate_in_the_model_follow_their_schedules(setup):
  x, model, params = setup
  evit_cfg = EViTConfig(keep_rate=(0.5, 0.7), layers=(1, 2))
  _, aux = mj.Runner(model.clone(merge=evit_cfg), params, records=True)(x)
  # block 1: 64 patches -> 32 kept + fused + cls = 34; block 2: ceil(0.7 * 33) = 24 -> 26.
  np.testing.assert_array_equal(np.asarray(aux["tokens_per_block"][0]), [65, 34, 26, 26])
  # The block hands EViT the class row of its own attention: redo block 1's step by hand.
  block = aux["block01"]
  cls_attn = _block_cls_attention(params, aux, 1, model)
  want, _ = evit_lib.evit(block["+sa"], cls_attn, 32)
  np.testing.assert_allclose(np.asarray(block["+mlp"] - block["mlp"]), np.asarray(want),
                             atol=1e-5)
  dr = DiffRateConfig(prune=(65, 60, 40, 30), merge=(62, 50, 35, 30))
  _, aux = mj.Runner(model.clone(merge=dr), params)(x)
  np.testing.assert_array_equal(np.asarray(aux["tokens_per_block"][0]), [62, 50, 35, 30])


def _block_cls_attention(params, aux, layer, model):
  """The class token's attention in block ``layer``, recomputed from its weights."""
  p = params["Transformer"][f"encoderblock_{layer}"]
  inp = aux[f"block{layer - 1:02d}"]["+mlp"]
  mean, var = inp.mean(-1, keepdims=True), inp.var(-1, keepdims=True)
  ln = (inp - mean) / jnp.sqrt(var + 1e-6) * p["LayerNorm_0"]["scale"] + p["LayerNorm_0"]["bias"]
  att = p["MultiHeadDotProductAttention_0"]
  q = jnp.einsum("bld,dhk->blhk", ln, att["query"]["kernel"]) + att["query"]["bias"]
  k = jnp.einsum("bld,dhk->blhk", ln, att["key"]["kernel"]) + att["key"]["bias"]
  return vit.class_attention(q[:, 0], k)


def test_batch_padding_is_invisible(setup):
  # Each sample's selection is its own: a batch padded with blank images gives the
  # same rows. (The ops' own tests check every sample of a batch against a
  # one-sample-at-a-time reference; in the model, DiffRate's sort, prune and merge.)
  x, model, params = setup
  padded = jnp.concatenate([x, jnp.zeros_like(x[:2])])
  cfg = DiffRateConfig(prune=(65, 50, 40, 30), merge=(60, 45, 35, 30))
  y, _ = mj.Runner(model.clone(merge=cfg), params)(x)
  yp, _ = mj.Runner(model.clone(merge=cfg), params)(padded)
  np.testing.assert_allclose(np.asarray(yp[:3]), np.asarray(y), atol=1e-5)


def test_gradients_are_finite_through_both(setup):
  x, model, params = setup
  # The first two blocks (a smaller program to differentiate): both compress.
  blocks = ("encoderblock_0", "encoderblock_1", "encoder_norm")
  params = {**params, "Transformer": {k: params["Transformer"][k] for k in blocks}}
  for cfg in (EViTConfig(keep_rate=0.5, layers=(0, 1)),
              DiffRateConfig(prune=(65, 50), merge=(60, 45))):
    m = model.clone(depth=2, merge=cfg)
    grads = jax.jit(jax.grad(lambda p: m.apply({"params": p}, x)[0].sum()))(params)
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.isfinite(g).all()) for g in leaves)
    # Blocks before the first compression get gradient through the kept tokens.
    assert float(jnp.abs(grads["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]
                         ["kernel"]).sum()) > 0


# ------------------------------- configs -------------------------------------

def test_bad_schedules_fail_naming_the_block(setup):
  x, model, params = setup
  with pytest.raises(ValueError, match="block 2's prune count 55 exceeds block 1's"):
    DiffRateConfig(prune=(65, 60, 55, 30), merge=(62, 50, 35, 30))
  with pytest.raises(ValueError, match="block 1's merge count 61 exceeds its prune"):
    DiffRateConfig(prune=(65, 60, 40, 30), merge=(62, 61, 35, 30))
  def trace(m):  # the errors come while tracing: nothing is compiled or run
    return jax.eval_shape(lambda p: m.apply({"params": p}, x), params)

  with pytest.raises(ValueError, match="counts for 5 blocks; the model has 4"):
    trace(model.clone(merge=DiffRateConfig(prune=(65,) * 5, merge=(65,) * 5)))
  with pytest.raises(ValueError, match="block 0's prune count 70 exceeds the 65 tokens"):
    trace(model.clone(merge=DiffRateConfig(prune=(70, 60, 40, 30), merge=(60, 50, 35, 30))))
  with pytest.raises(ValueError, match=r"block\(s\) \[5\] are beyond the model's depth 4"):
    trace(model.clone(merge=EViTConfig(layers=(1, 5))))
  with pytest.raises(ValueError, match="keep_rate must be in"):
    EViTConfig(keep_rate=1.5)
  gap = mj.Model(10, pool_type="gap", class_token=False, **TINY)
  with pytest.raises(ValueError, match="needs a class token"):
    jax.eval_shape(gap.clone(merge=EViTConfig(layers=(1,))).init, jax.random.key(0), x)


def test_published_schedules_load_by_name_and_are_clamped_explicitly():
  cfg = DiffRateConfig.published("deit_small", 2.3)
  assert cfg.prune[:3] == (197, 192, 168) and cfg.merge[-1] == 3 and len(cfg.prune) == 12
  assert "clamped" not in cfg.note
  # DeiT-T at 1.0 GFLOPs lets block 7's merge count grow from 148 to 156.
  grown = DiffRateConfig.published("deit_tiny", 1.0)
  assert "block 7 merge 156->148" in grown.note
  assert grown.merge[7] == 148
  flat = [c for pair in zip(grown.prune, grown.merge) for c in pair]
  assert all(a >= b for a, b in zip(flat, flat[1:]))
  with pytest.raises(ValueError, match="no deit_base schedule at 9.9 GFLOPs"):
    DiffRateConfig.published("deit_base", 9.9)


def test_source_maps_follow_kept_fused_and_pruned_tokens(setup):
  from mame_jax.vis import sources
  x, model, params = setup
  evit_cfg = EViTConfig(keep_rate=0.5, layers=(1,))
  dr = DiffRateConfig(prune=(65, 50, 40, 30), merge=(60, 45, 35, 30))
  for cfg in (evit_cfg, dr):
    _, aux = mj.Runner(model.clone(merge=cfg), params, records=True)(x)
    smap = sources.source_maps(aux, cfg)[-1]
    totals = np.asarray(smap.soft.sum(-1))           # (B, P): each patch's share
    assert smap.soft.shape[-1] == int(aux["tokens_per_block"][0, -1])
    if cfg is evit_cfg:   # fused, never lost: every patch is somewhere
      np.testing.assert_allclose(totals, 1.0, atol=1e-5)
      fused = smap.soft.shape[-1] - 1
      assert (np.asarray(smap.hard) == fused).sum(1).min() >= 31  # the 32 least attended
    else:                 # pruned patches are gone, merged ones are held whole
      assert set(np.round(totals, 5).ravel()) <= {0.0, 1.0}
      # 20 tokens pruned (blocks 1-3: 10 + 5 + 5), each holding at least one patch;
      # the 29 patch tokens left hold at least one patch each.
      assert (totals == 0).sum(1).min() >= 20 and (totals == 1).sum(1).min() >= 29


def test_eval_command_gives_evit_and_diffrate_rows_beside_the_baseline(monkeypatch, tmp_path,
                                                                        capsys):
  import json
  from mame_jax import cli
  from mame_jax.models import load
  # 12 blocks of 197 tokens (224 px, 16-px patches): DiffRate's DeiT-S schedule fits.
  monkeypatch.setattr(load, "load_model", lambda source, **kw: load.random_vit(
      224, depth=12, width=32, patch_size=16, merge=kw.get("merge")))
  out = tmp_path / "rows.json"
  assert cli.main(["eval", "--checkpoint", "x.npz", "--data", "photos", "--limit", "2",
                   "--batch-size", "2", "--tau", "--evit", "0.7", "--diffrate", "deit_small@2.3",
                   "--runs", "1", "--warmup", "0", "--no-progress", "--json", str(out)]) == 0
  table = capsys.readouterr().out
  assert "EViT(keep=0.7)" in table and "DiffRate(deit_small@2.3)" in table
  rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
  assert set(rows) == {"baseline", "evit", "diffrate"}
  # EViT at 0.7 in blocks 3, 6, 9: 196 patches -> 138 kept + 1 fused -> ceil(0.7 * 139)
  # = 98 + 1 -> ceil(0.7 * 99) = 70 + 1, and the class token.
  assert rows["evit"]["tokens_per_layer"][-1] == 1 + 70 + 1
  assert rows["diffrate"]["tokens_per_layer"] == [197, 180, 156, 127, 109, 98, 80, 66, 52,
                                                 37, 31, 3]   # the schedule's merge counts
  assert rows["diffrate"]["gflops_per_image"] < rows["evit"]["gflops_per_image"] < \
      rows["baseline"]["gflops_per_image"]


def test_the_benchmark_section_says_where_mame_is_slower(tmp_path):
  import json
  from benchmarks import baselines
  row = lambda method, ips, g: dict(model="DeiT-S", method=method, setting="", images_per_s=ips,
                                    gflops_per_image=g)
  path = tmp_path / "b.json"
  path.write_text(json.dumps(dict(command="python -m benchmarks.baselines --quick", device="cpu",
                                  batch=8, dtype="float32", date="2026-12-01", rows=[
                                      row("baseline", 8.0, 9.0), row("mame", 14.0, 5.0),
                                      row("tome", 16.0, 4.9), row("evit", 12.0, 5.3)])))
  text = "\n".join(baselines.section(str(path)))
  assert "`python -m benchmarks.baselines --quick` -- cpu, batch 8" in text
  assert "vs tome () 16.0 img/s at 4.90: MaMe SLOWER (missed)." in text
  assert "vs evit () 12.0 img/s at 5.30: MaMe faster." in text
