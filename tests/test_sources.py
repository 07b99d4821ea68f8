"""Source tracking (mame_jax.vis.sources): the specification, one property per test."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mame_jax as mj
from mame_jax import tome
from mame_jax.vis import sources
from mame_jax.merge import num_sources
from mame_jax.models.load import random_vit

SIZE = 128          # 8 x 8 patches of 16 px
LAYERS = (0, 1, 2, 3)


def photos(n=3, size=SIZE):
  """Real photographs (skimage.data) in [-1, 1]: merging has structure to find."""
  import skimage.data
  import skimage.transform
  out = []
  for name in ["astronaut", "coffee", "chelsea", "rocket"][:n]:
    img = getattr(skimage.data, name)()[..., :3]
    out.append(skimage.transform.resize(img, (size, size), anti_aliasing=True) * 2 - 1)
  return jnp.asarray(np.stack(out), jnp.float32)


def run(model, params, x, merge):
  """(maps, aux) of one jitted forward with ``merge``; maps built inside the jit."""
  m = model.clone(merge=merge)

  @jax.jit
  def f(params, x):
    _, aux = m.apply({"params": params}, x)
    return sources.source_maps(aux, merge), aux
  return f(params, x)


@pytest.fixture(scope="module")
def x():
  return photos()


@pytest.fixture(scope="module")
def tok(x):
  return random_vit(SIZE, depth=4, width=32)


@pytest.fixture(scope="module")
def mame_run(x, tok):
  return run(*tok, x, mj.MergeConfig(tau=0.5, layers=LAYERS))


@pytest.fixture(scope="module")
def tome_run(x, tok):
  return run(*tok, x, mj.ToMeConfig(r=6, layers=(0, 2)))


def _check_partition(maps, aux):
  """Every patch is held by exactly one real, non-special token, and its soft
  shares add up to one, after every block."""
  for i, smap in enumerate(maps):
    hard, mask = np.asarray(smap.hard), np.asarray(smap.token_mask)
    ns = smap.num_special
    assert hard.shape == (mask.shape[0], 64)
    assert (hard >= ns).all() and (hard < mask.shape[1]).all(), f"block {i}"
    assert np.take_along_axis(mask, hard, axis=1).all(), f"block {i}: a patch in a padded slot"
    np.testing.assert_allclose(np.asarray(smap.soft).sum(-1), 1, atol=1e-5, err_msg=f"block {i}")
    np.testing.assert_array_equal(np.asarray(smap.num_tokens), np.asarray(aux["tokens_per_block"])[:, i])


def test_every_patch_belongs_to_exactly_one_token_at_every_layer(mame_run):
  maps, aux = mame_run
  assert len(maps) == 4
  _check_partition(maps, aux)


def test_soft_shares_of_every_patch_sum_to_one_and_are_shares(mame_run):
  maps, _ = mame_run
  for smap in maps:
    soft = np.asarray(smap.soft)
    assert soft.min() >= 0 and soft.max() <= 1 + 1e-6
    np.testing.assert_allclose(soft.sum(-1), 1, atol=1e-5)
  # Merging happened and split some patches over several tokens.
  assert (np.asarray(maps[-1].soft).max(-1) < 0.999).any()


def test_group_counts_equal_the_token_counts_the_model_reports(mame_run):
  maps, aux = mame_run
  counts = np.asarray(aux["tokens_per_block"])
  assert counts[:, -1].max() < 65, "tau=0.5 must merge something"
  for i, smap in enumerate(maps):
    np.testing.assert_array_equal(np.asarray(smap.num_groups) + smap.num_special, counts[:, i])


def test_padded_output_slots_hold_no_patch(mame_run):
  maps, _ = mame_run
  padded = 0
  for smap in maps:
    pad = ~np.asarray(smap.token_mask)
    padded += pad.sum()
    assert np.all(np.asarray(smap.soft).transpose(0, 2, 1)[pad] == 0)
    assert np.all(np.asarray(smap.mixing)[pad] == 0)
  assert padded > 0, "full capacity leaves padding whenever a source merged"


def test_mixing_rows_of_real_tokens_sum_to_one_and_the_class_token_holds_no_patch(mame_run, tome_run):
  for maps, _ in (mame_run, tome_run):
    for smap in maps:
      rows = np.asarray(smap.mixing).sum(-1)
      real = np.asarray(smap.token_mask).copy()
      real[:, :smap.num_special] = False
      np.testing.assert_allclose(rows[real], 1, atol=1e-5)
      assert np.all(rows[:, :smap.num_special] == 0)
      assert np.all(np.asarray(smap.soft)[:, :, :smap.num_special] == 0)


def test_without_a_class_token_maps_still_partition_the_patches(x):
  model, params = random_vit(SIZE, depth=1, width=32, pool_type="gap")
  maps, aux = run(model, params, x, mj.MergeConfig(tau=0.5, layers=(0,)))
  assert maps[0].num_special == 0
  _check_partition(maps, aux)
  for i, smap in enumerate(maps):
    np.testing.assert_array_equal(np.asarray(smap.num_groups), np.asarray(aux["tokens_per_block"])[:, i])


def test_with_tau_of_one_every_patch_is_its_own_token(x, tok):
  maps, aux = run(*tok, x, mj.MergeConfig(tau=1.0, layers=LAYERS))
  for smap in maps:
    np.testing.assert_array_equal(np.asarray(smap.hard), np.broadcast_to(1 + np.arange(64), (3, 64)))
    np.testing.assert_array_equal(np.asarray(smap.soft), np.broadcast_to(np.eye(64, 65, k=1), (3, 64, 65)))
    np.testing.assert_array_equal(np.asarray(smap.num_groups), 64)
  np.testing.assert_array_equal(np.asarray(aux["tokens_per_block"]), 65)


def test_tome_maps_partition_the_patches_and_count_the_tokens(tome_run):
  maps, aux = tome_run
  _check_partition(maps, aux)
  for i, smap in enumerate(maps):
    np.testing.assert_array_equal(np.asarray(smap.num_groups) + 1, np.asarray(aux["tokens_per_block"])[:, i])
    soft = np.asarray(smap.soft)
    assert set(np.unique(soft)) <= {0.0, 1.0}, "ToMe merges are hard"


def test_tome_hard_map_is_the_chained_record_source(tome_run):
  maps, aux = tome_run
  chained = None
  for i, smap in enumerate(maps):
    if "record" in aux[f"block{i:02d}"]["merge"]:
      chained = tome.track_source(aux[f"block{i:02d}"]["merge"]["record"], chained)
    np.testing.assert_array_equal(np.asarray(smap.hard), np.asarray(chained)[:, 1:])


def test_mame_mixing_reproduces_the_tokens_when_blocks_only_merge():
  # Without attention and MLP, a token is exactly its patches mixed by eq. (9).
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(4, 16))
  patches = centres[rng.integers(0, 4, size=(2, 40))] + 0.3 * rng.normal(size=(2, 40, 16))
  cls = rng.normal(size=(2, 1, 16))
  x0 = jnp.asarray(np.concatenate([cls, patches], 1), jnp.float32)

  @jax.jit
  def chain(x):
    smap, mask, ys = sources.identity_map(2, 40, 1), None, []
    for _ in range(2):
      x, info = mj.mame(x, 0.3, num_special=1, capacity=num_sources(x.shape[1], 1),
                        token_mask=mask)
      mask = info.token_mask
      smap = sources.advance(smap, sources.mame_transition(info), mask)
      ys.append((x, smap))
    return ys

  for y, smap in chain(x0):
    want = jnp.einsum("btp,bpd->btd", smap.mixing, x0[:, 1:])
    real = np.asarray(smap.token_mask).copy()
    real[:, 0] = False
    np.testing.assert_allclose(np.asarray(y)[real], np.asarray(want)[real], atol=1e-5)
  assert int(smap.num_tokens.max()) < 35, "the chain must merge"


def test_tome_mixing_reproduces_the_size_weighted_tokens():
  rng = np.random.default_rng(1)
  x0 = jnp.asarray(rng.normal(size=(2, 33, 8)), jnp.float32)

  @jax.jit
  def chain(x):
    size, smap, out = None, sources.identity_map(2, 32, 1), []
    for _ in range(3):
      x, size, record = tome.tome(x, 5, size=size)
      smap = sources.track(smap, {"record": record})
      out.append((x, size, smap))
    return out

  for x, size, smap in chain(x0):
    want = jnp.einsum("btp,bpd->btd", smap.mixing, x0[:, 1:])
    np.testing.assert_allclose(np.asarray(x)[:, 1:], np.asarray(want)[:, 1:], atol=1e-5)
    np.testing.assert_allclose(np.asarray(size)[:, 1:], np.asarray(smap.soft.sum(1))[:, 1:])


def test_a_merged_source_splits_its_patch_by_the_fusion_weights():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(1, 16, 4)) + 2.0, jnp.float32)   # similar tokens: much merges

  @jax.jit
  def merge(x):
    _, info = mj.mame(x, 0.5, capacity=8)
    return info, sources.advance(sources.identity_map(1, 16), sources.mame_transition(info),
                                 info.token_mask)

  info, smap = merge(x)
  fusion = np.asarray(info.fusion[0])                                # (M, N)
  soft = np.asarray(smap.soft[0])
  merged = np.flatnonzero(fusion.sum(0) > 0)
  assert merged.size > 0
  for j in merged:   # source j is token 2j; destination i is token 2i+1, output slot i
    np.testing.assert_allclose(soft[2 * j, :8], fusion[:, j] / fusion[:, j].sum(), rtol=1e-6)
  for i in range(8):
    assert soft[2 * i + 1, i] == 1.0


def test_dropped_patches_belong_to_no_token():
  # Fixed capacity 0 (the paper's training setting) drops every preserved source.
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 33, 8)), jnp.float32)

  @jax.jit
  def merge_twice(x):
    smap, mask = sources.identity_map(2, 32, 1), None
    for _ in range(2):
      x, info = mj.mame(x, 0.2, num_special=1, capacity=0, token_mask=mask)
      mask = info.token_mask
      smap = sources.advance(smap, sources.mame_transition(info), mask)
    return smap, info.dropped

  smap, dropped = merge_twice(x)
  hard, soft = np.asarray(smap.hard), np.asarray(smap.soft)
  assert np.asarray(dropped).sum() > 0 and (hard == -1).any()
  assert np.all(soft[hard == -1] == 0)
  # A patch partly held by a dropped token loses that part, nothing more.
  rows = soft.sum(-1)
  assert np.all(rows[hard >= 0] > 0) and np.all(rows <= 1 + 1e-6)
  np.testing.assert_array_equal(np.asarray(smap.num_groups) + 1, np.asarray(smap.num_tokens))


def test_maps_built_inside_jit_equal_maps_built_from_returned_aux(mame_run):
  inside, aux = mame_run
  outside = sources.source_maps(aux)
  for a, b in zip(inside, outside):
    np.testing.assert_array_equal(np.asarray(a.hard), np.asarray(b.hard))
    np.testing.assert_allclose(np.asarray(a.soft), np.asarray(b.soft), atol=1e-6)
    assert a.grid == b.grid == (8, 8)


def test_source_maps_refuse_an_aux_without_the_configs_records(x, tok):
  model, params = tok
  _, aux = jax.jit(model.apply)({"params": params}, x)
  with pytest.raises(ValueError, match="no 'info' record"):
    sources.source_maps(aux, mj.MergeConfig(tau=0.5, layers=(0,)))
  with pytest.raises(ValueError, match="needs 'stem'"):
    sources.source_maps({"logits": 0})
