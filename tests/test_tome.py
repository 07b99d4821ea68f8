"""ToMe baseline (mame_jax.tome): the specification, one property per test."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mame_jax.tome import (bipartite_soft_matching, merge_wavg, prop_attn_bias,
                           tome, track_source, unmerge)


def _reference_tome(x, metric, size, r, class_token, order="tome"):
  """Bipartite soft matching + size-weighted merge, transcribed from the paper
  and from ToMe's code (facebookresearch/ToMe, tome/merge.py) in float64 loops.
  Returns (x_out, size_out, unmerged A positions in output order, merged
  (source position, destination position) pairs in merge order).

  Output order as ToMe's ``merge``: the unmerged A tokens as its descending
  argsort of the best scores left them -- re-sorted by position only when there
  is a class token (``order="sorted"``: always) -- then every B token."""
  x, metric, size = (np.asarray(a, np.float64) for a in (x, metric, size))
  batch, length, _ = x.shape
  r = min(r, (length - int(class_token)) // 2)
  if r <= 0:
    return x, size, None, None
  xs, ss, unms, pairs = [], [], [], []
  for b in range(batch):
    unit = metric[b] / np.linalg.norm(metric[b], axis=-1, keepdims=True)
    a_pos, b_pos = list(range(0, length, 2)), list(range(1, length, 2))
    best, match = [], []
    for i in a_pos:
      sims = [unit[i] @ unit[j] for j in b_pos]
      if class_token and i == 0:
        sims = [-np.inf] * len(b_pos)
      best.append(max(sims))
      match.append(b_pos[int(np.argmax(sims))])
    ranked = np.argsort(-np.asarray(best), kind="stable")
    merged = [(a_pos[k], match[k]) for k in ranked[:r]]
    unm = [a_pos[k] for k in ranked[r:]]
    if class_token or order == "sorted":
      unm = sorted(unm)
    # Each output token collects its own input token plus what merged into it.
    groups = [[i] for i in unm] + [[j] for j in b_pos]
    slot = {g[0]: n for n, g in enumerate(groups)}
    for i, j in merged:
      groups[slot[j]].append(i)
    s = np.array([sum(size[b, i] for i in g) for g in groups])
    v = np.stack([sum(size[b, i] * x[b, i] for i in g) for g in groups]) / s[:, None]
    xs.append(v), ss.append(s), unms.append(unm), pairs.append(merged)
  return np.stack(xs), np.stack(ss), np.array(unms), np.array(pairs)


def _inputs(seed, batch, length, dim=8, metric_dim=None):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, length, dim)).astype(np.float32)
  metric = None
  if metric_dim is not None:
    metric = rng.normal(size=(batch, length, metric_dim)).astype(np.float32)
  size = rng.integers(1, 5, size=(batch, length)).astype(np.float32)
  return x, metric, size


def _np(tree):
  return jax.tree.map(np.asarray, tree)


# Most properties are checked on one shared merge so the suite compiles little:
# B = 3, L = 13 (odd), r = 5 with a class token, random integer sizes.
@pytest.fixture(scope="module")
def shared():
  x, _, size = _inputs(0, 3, 13)
  x[:, 0] = x[:, 1]  # the class token is the best match anyone could have
  x_out, size_out, rec = _np(tome(x, 5, size=size))
  return x, size, x_out, size_out, rec


CASES = [  # (batch, length, r, class_token), metric of another width than x
    (1, 7, 1, True), (2, 8, 99, True), (3, 9, 2, False), (2, 10, 4, False),
]  # plus the shared merge below: (3, 13, 5, True), metric = x


@pytest.mark.parametrize("batch,length,r,class_token", CASES)
def test_matches_numpy_reference_values_and_order(batch, length, r, class_token):
  x, metric, size = _inputs(batch * 100 + length, batch, length, metric_dim=5)
  x_out, size_out, rec = _np(tome(x, r, metric=metric, size=size,
                                  class_token=class_token))
  ref_x, ref_size, ref_unm, ref_pairs = _reference_tome(x, metric, size, r,
                                                        class_token)
  np.testing.assert_allclose(x_out, ref_x, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(size_out, ref_size, rtol=1e-6)
  np.testing.assert_array_equal(rec.unm_idx, ref_unm)
  np.testing.assert_array_equal(rec.src_idx, ref_pairs[..., 0])
  np.testing.assert_array_equal(rec.dst_idx, ref_pairs[..., 1])


def test_metric_defaults_to_x_and_matches_reference(shared):
  x, size, x_out, size_out, rec = shared
  ref_x, ref_size, ref_unm, ref_pairs = _reference_tome(x, x, size, 5, True)
  np.testing.assert_allclose(x_out, ref_x, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(size_out, ref_size)
  np.testing.assert_array_equal(rec.unm_idx, ref_unm)
  np.testing.assert_array_equal(rec.src_idx, ref_pairs[..., 0])
  np.testing.assert_array_equal(rec.dst_idx, ref_pairs[..., 1])


@pytest.mark.parametrize("length,class_token,expected", [
    (9, True, 4), (10, True, 4), (9, False, 4), (10, False, 5), (2, True, 0),
    (1, False, 0),
])
def test_r_is_clipped_to_half_of_the_mergeable_tokens(length, class_token,
                                                      expected):
  x = jnp.zeros((2, length, 4))
  # Shapes only: eval_shape traces without compiling.
  x_out, size_out, rec = jax.eval_shape(
      lambda x: tome(x, 1000, class_token=class_token), x)
  assert rec.src_idx.shape == (2, expected)
  assert x_out.shape == (2, length - expected, 4)
  assert size_out.shape == (2, length - expected)


@pytest.mark.parametrize("r,length", [(0, 9), (5, 1), (3, 2)])
def test_no_merge_is_the_identity(r, length):
  x, _, size = _inputs(2, 3, length)
  x_out, size_out, rec = _np(tome(x, r, size=size))
  np.testing.assert_array_equal(x_out, x)
  np.testing.assert_array_equal(size_out, size)
  np.testing.assert_array_equal(rec.source, np.broadcast_to(np.arange(length),
                                                            (3, length)))
  _, ones, _ = tome(x, r)
  np.testing.assert_array_equal(ones, np.ones((3, length)))


def test_sizes_sum_is_conserved(shared):
  _, size, _, size_out, _ = shared
  np.testing.assert_allclose(size_out.sum(-1), size.sum(-1))


def test_destination_size_is_one_plus_its_merged_sources(shared):
  x = shared[0]
  _, size_out, rec = _np(tome(x, 5, size=np.ones(x.shape[:2], np.float32)))
  unm = rec.unm_idx.shape[1]
  for b in range(x.shape[0]):
    counts = np.bincount((rec.dst_idx[b] - 1) // 2, minlength=6)
    np.testing.assert_array_equal(size_out[b, unm:], 1 + counts)
    np.testing.assert_array_equal(size_out[b, :unm], 1)


def test_source_map_points_into_the_output(shared):
  _, _, x_out, _, rec = shared
  assert rec.source.shape == (3, 13) and rec.source.dtype == np.int32
  assert rec.source.min() >= 0 and rec.source.max() < x_out.shape[1] == 8
  for b in range(3):  # every output token holds at least one input token
    assert set(rec.source[b]) == set(range(x_out.shape[1]))


def test_output_is_size_weighted_mean_of_tokens_in_its_source_group(shared):
  x, size, x_out, size_out, rec = shared
  for b in range(3):
    for k in range(x_out.shape[1]):
      group = rec.source[b] == k
      w = size[b, group]
      np.testing.assert_allclose(size_out[b, k], w.sum())
      np.testing.assert_allclose(x_out[b, k], (w[:, None] * x[b, group]).sum(0)
                                 / w.sum(), rtol=1e-5, atol=1e-6)


def test_class_token_is_never_merged_and_stays_first(shared):
  x, size, x_out, size_out, rec = shared  # x[:, 0] == x[:, 1]: cosine 1
  np.testing.assert_array_equal(x_out[:, 0], x[:, 0])
  np.testing.assert_array_equal(size_out[:, 0], size[:, 0])
  np.testing.assert_array_equal(rec.source[:, 0], 0)
  np.testing.assert_array_equal(rec.unm_idx[:, 0], 0)
  assert (rec.src_idx != 0).all()


def test_ties_go_to_the_lower_index(shared):
  # Every token points the same way, so all scores tie exactly: the earliest
  # A tokens merge, all into the first B token.
  x = np.zeros_like(shared[0])
  x[..., 0] = 1
  _, size_out, rec = _np(tome(x, 5, size=shared[1]))
  np.testing.assert_array_equal(rec.src_idx, np.broadcast_to([2, 4, 6, 8, 10],
                                                             (3, 5)))
  np.testing.assert_array_equal(rec.dst_idx, 1)
  np.testing.assert_array_equal(rec.unm_idx, np.broadcast_to([0, 12], (3, 2)))


def test_zero_norm_metric_gives_no_nan(shared):
  x = shared[0].copy()
  x[:, 3] = 0
  x_out, size_out, _ = _np(tome(x, 5, size=shared[1]))
  assert np.isfinite(x_out).all() and np.isfinite(size_out).all()


def test_jit_with_static_r(shared):
  x, size, x_out, size_out, rec = shared
  f = jax.jit(tome, static_argnames=("r", "class_token"))
  x_jit, size_jit, rec_jit = _np(f(x, r=5, size=size))
  np.testing.assert_allclose(x_jit, x_out, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(size_jit, size_out)
  np.testing.assert_array_equal(rec_jit.source, rec.source)


def test_bf16_input_gives_finite_bf16_output(shared):
  x_out, size_out, _ = tome(jnp.asarray(shared[0], jnp.bfloat16), 5)
  assert x_out.dtype == jnp.bfloat16 and x_out.shape == (3, 8, 8)
  assert size_out.dtype == jnp.float32
  assert np.isfinite(np.asarray(x_out, np.float32)).all()


def test_merge_is_differentiable_in_x(shared):
  x, size, _, size_out, rec = shared
  grad = jax.grad(lambda x: merge_wavg(rec, x, size)[0].sum())(x)
  # d/dx_i of the sum of all outputs = size_i / (size of i's group), per feature.
  expected = size / np.take_along_axis(size_out, rec.source, axis=1)
  np.testing.assert_allclose(grad, np.broadcast_to(expected[..., None], x.shape),
                             rtol=1e-6)


def test_prop_attn_bias_is_log_size():
  size = np.array([[1.0, 2.0, 5.0]], np.float32)
  np.testing.assert_allclose(prop_attn_bias(size), np.log(size))


def test_unmerge_copies_each_output_token_back_to_its_sources(shared):
  x, _, x_out, _, rec = shared
  restored = np.asarray(unmerge(rec, x_out))
  assert restored.shape == x.shape
  for b in range(3):
    np.testing.assert_array_equal(restored[b], x_out[b][rec.source[b]])


def test_track_source_composes_layers(shared):
  x = shared[0]
  ones = np.ones(x.shape[:2], np.float32)
  x1, s1, rec1 = tome(x, 5, size=ones)
  x2, s2, rec2 = _np(tome(x1, 3, size=s1))
  src = np.asarray(track_source(rec2, track_source(rec1)))
  assert src.shape == (3, 13) and src.max() < x2.shape[1]
  for b in range(3):  # two merges compose to one plain mean of original tokens
    for k in range(x2.shape[1]):
      group = src[b] == k
      np.testing.assert_allclose(s2[b, k], group.sum())
      np.testing.assert_allclose(x2[b, k], x[b, group].mean(0), rtol=1e-5,
                                 atol=1e-6)


@pytest.mark.parametrize("call,match", [
    (lambda: tome(np.zeros((4, 8)), 1), r"x must have shape \(B, L, D\)"),
    (lambda: bipartite_soft_matching(np.zeros((2, 4, 8, 1)), 1), r"metric"),
    (lambda: tome(np.zeros((1, 4, 8)), 1.0), r"r must be"),
    (lambda: tome(np.zeros((1, 4, 8)), -1), r"r must be a non-negative int"),
    (lambda: tome(np.zeros((1, 4, 8)), True), r"r must be"),
    (lambda: tome(np.zeros((1, 4, 8)), 1, metric=np.zeros((1, 5, 8))),
     r"metric has \(B, L\)"),
    (lambda: tome(np.zeros((1, 4, 8)), 1, metric=np.zeros((4, 8))), r"metric"),
    (lambda: tome(np.zeros((1, 4, 8)), 1, size=np.ones((1, 5))), r"size must"),
    (lambda: merge_wavg(bipartite_soft_matching(np.ones((1, 4, 2)), 1),
                        np.zeros((1, 5, 2))), r"x has \(B, L\)"),
    (lambda: prop_attn_bias(np.ones((1, 4, 1))), r"size must have shape"),
])
def test_bad_input_raises_value_error_naming_the_argument(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_traced_r_raises_value_error():
  with pytest.raises(ValueError, match=r"r must be a static"):
    jax.jit(tome)(jnp.zeros((1, 4, 8)), 1)


# ----------------------------------------------------------------------------
# ToMe's own token order, over consecutive blocks


def _two_blocks(x, size, r, class_token, order, reference):
  """Two ToMe steps in a row, each matching on its own input (metric = x):
  ``(x, size, [unm_idx of each step])``, by mame_jax.tome or the reference."""
  unms = []
  for _ in range(2):
    if reference:
      x, size, unm, _ = _reference_tome(x, x, size, r, class_token, order)
    else:
      x, size, rec = _np(tome(x, r, size=size, class_token=class_token, order=order))
      unm = rec.unm_idx
    unms.append(unm)
  return x, size, unms


def test_without_class_token_unmerged_tokens_keep_score_order_over_two_blocks():
  # SigLIP's case: no class token. ToMe leaves the unmerged A tokens in the order
  # of their match scores; the second block's A/B split then sees that order.
  x, _, size = _inputs(7, 2, 16)
  got_x, got_size, got_unm = _two_blocks(x, size, 4, False, "tome", reference=False)
  ref_x, ref_size, ref_unm = _two_blocks(x, size, 4, False, "tome", reference=True)
  for got, ref in zip(got_unm, ref_unm):
    np.testing.assert_array_equal(got, ref)
  assert (np.diff(got_unm[0], axis=-1) < 0).any()  # really not by position
  np.testing.assert_allclose(got_x, ref_x, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_size, ref_size)
  # The old order ("sorted") is a different sequence, and the second block's
  # merges diverge from ToMe's.
  sorted_x, _, sorted_unm = _two_blocks(x, size, 4, False, "sorted", reference=False)
  _, _, ref_sorted_unm = _two_blocks(x, size, 4, False, "sorted", reference=True)
  for got, ref in zip(sorted_unm, ref_sorted_unm):
    np.testing.assert_array_equal(got, ref)
  assert sorted_x.shape == got_x.shape and not np.allclose(sorted_x, got_x, atol=1e-3)


def test_with_class_token_both_orders_are_the_sorted_one_over_two_blocks():
  x, _, size = _inputs(8, 2, 17)
  tome_run = _two_blocks(x, size, 4, True, "tome", reference=False)
  sorted_run = _two_blocks(x, size, 4, True, "sorted", reference=False)
  ref_run = _two_blocks(x, size, 4, True, "sorted", reference=True)
  for a, b in zip(tome_run[2], sorted_run[2]):
    np.testing.assert_array_equal(a, b)
    assert (a[:, 0] == 0).all() and (np.diff(a, axis=-1) > 0).all()
  np.testing.assert_array_equal(tome_run[0], sorted_run[0])
  np.testing.assert_allclose(tome_run[0], ref_run[0], rtol=1e-5, atol=1e-5)


def test_source_tracking_follows_the_score_order():
  x, _, _ = _inputs(9, 2, 16)
  ones = np.ones(x.shape[:2], np.float32)
  x1, s1, rec1 = tome(x, 4, size=ones, class_token=False)
  x2, s2, rec2 = _np(tome(x1, 3, size=s1, class_token=False))
  src = np.asarray(track_source(rec2, track_source(rec1)))
  for b in range(2):  # output token k holds exactly the inputs the map sends to k
    for k in range(x2.shape[1]):
      group = src[b] == k
      np.testing.assert_allclose(s2[b, k], group.sum())
      np.testing.assert_allclose(x2[b, k], x[b, group].mean(0), rtol=1e-5, atol=1e-6)


def test_model_source_maps_without_class_token_match_the_token_sizes():
  # A SigLIP-like model (no class token, gap): the source maps vis/sources.py
  # builds from the records must agree with the sizes the blocks tracked.
  from mame_jax.models.load import random_vit
  from mame_jax.models.merging import ToMeConfig
  from mame_jax.vis import sources
  model, params = random_vit(32, depth=2, width=32, patch_size=8, class_token=False,
                             pool_type="gap")
  merge = ToMeConfig(r=4)
  image = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)

  @jax.jit
  def f(params, image):
    _, aux = model.clone(merge=merge).apply({"params": params}, image)
    return sources.source_maps(aux, merge)[-1], aux["size"]
  smap, size = _np(f(params, image))
  assert size.shape == (2, 8)
  for b in range(2):
    np.testing.assert_array_equal(np.bincount(smap.hard[b], minlength=8), size[b])


def test_bad_order_raises_value_error_naming_it():
  from mame_jax.models.merging import ToMeConfig
  with pytest.raises(ValueError, match=r"order must be one of"):
    tome(np.zeros((1, 4, 8)), 1, order="score")
  with pytest.raises(ValueError, match=r"ToMeConfig.order"):
    ToMeConfig(order="score")
  with pytest.raises(ValueError, match=r"ToMeConfig.pool"):
    ToMeConfig(pool="max")
  with pytest.raises(ValueError, match=r"ToMe recipe must be one of"):
    ToMeConfig.recipe("deit")


# ----------------------------------------------------------------------------
# ToMe's MAE recipe: size-weighted global pool, no proportional attention


@pytest.fixture(scope="module")
def mae_model():
  """A tiny MAE-style classifier: class token, gap over the other tokens, fc_norm."""
  from mame_jax.models import vit
  from mame_jax.models.load import random_params
  model = vit.Model(5, width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8,
                    pool_type="gap", class_token=True, fc_norm=True, gelu_approximate=False)
  params = random_params(model, 32, seed=1)
  image = np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  return model, params, image


def _apply(model, params, image, merge):
  return _np(jax.jit(lambda p, i: model.clone(merge=merge).apply({"params": p}, i))(
      params, image))


def test_mae_recipe_pools_by_size_as_tome_mae_patch(mae_model):
  from mame_jax.models.merging import ToMeConfig
  model, params, image = mae_model
  _, aux = _apply(model, params, image, ToMeConfig.recipe("mae", r=4))
  x, size = aux["encoded"].astype(np.float64), aux["size"].astype(np.float64)
  assert x.shape[1] == 17 - 4 - 4 and (size[:, 1:] > 1).any()
  # ToMe's MAE forward_features: (x * size)[:, 1:].sum(1) / T, T = patch count.
  pooled = (x * size[..., None])[:, 1:].sum(1) / 16
  mean, var = pooled.mean(-1, keepdims=True), pooled.var(-1, keepdims=True)
  ln = params["fc_norm"]
  expected = (pooled - mean) / np.sqrt(var + 1e-6) * ln["scale"] + ln["bias"]
  np.testing.assert_allclose(aux["head_input"], expected, rtol=1e-4, atol=1e-4)
  # The timm recipe's plain mean is another vector.
  plain = x[:, 1:].mean(1)
  assert not np.allclose(pooled, plain, atol=1e-3)


def test_mae_recipe_has_no_proportional_attention(mae_model):
  from mame_jax.models.merging import ToMeConfig
  model, params, image = mae_model
  mae = ToMeConfig.recipe("mae", r=4)
  assert (mae.prop_attn, mae.pool, mae.order) == (False, "size_weighted", "tome")
  assert ToMeConfig.recipe("timm", r=4) == ToMeConfig(r=4)  # the defaults: timm's
  assert (ToMeConfig().prop_attn, ToMeConfig().pool) == (True, "mean")
  logits, _ = _apply(model, params, image, mae)
  off, _ = _apply(model, params, image, ToMeConfig(r=4, prop_attn=False,
                                                   pool="size_weighted"))
  on, _ = _apply(model, params, image, ToMeConfig(r=4, prop_attn=True,
                                                  pool="size_weighted"))
  np.testing.assert_array_equal(logits, off)
  assert not np.allclose(logits, on, atol=1e-5)


@pytest.mark.parametrize("name,recipe", [
    ("mae_b", "mae"), ("mae_l", "mae"), ("mae_h", "mae"),
    ("deit_s", "timm"), ("deit_b", "timm"), ("augreg_b16", "timm"),
])
def test_paper_config_rows_use_tome_own_recipe(name, recipe):
  import os
  from mame_jax.cli import flags
  from mame_jax.eval import methods
  from mame_jax.models import vit
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "configs", f"{name}.py")
  config = flags.load_config_file(path)
  assert config.merge.tome_recipe == recipe
  rows = methods.build_methods(vit.Model(5, depth=12), (), config.merge.tome_r, None, (),
                               config.merge.tome_recipe)
  tome_rows = [m for m in rows if m.kind == "tome"]
  assert len(tome_rows) == 1 and tome_rows[0].r == config.merge.tome_r[0]
  merge = tome_rows[0].merge
  want = (False, "size_weighted") if recipe == "mae" else (True, "mean")
  assert (merge.prop_attn, merge.pool) == want and merge.layers is None


def test_eval_command_hands_the_config_recipe_to_evaluate(monkeypatch):
  from mame_jax import cli
  from mame_jax.eval import loop
  from mame_jax.models import load
  calls = []

  class Captured(Exception):
    pass

  def fake_evaluate(model, params, data_name, **kwargs):
    calls.append(kwargs)
    raise Captured

  monkeypatch.setattr(load, "load_model", lambda source, **kw: load.random_vit(
      32, depth=2, width=32, patch_size=8))
  monkeypatch.setattr(loop, "evaluate", fake_evaluate)
  for argv in (["--config", "configs/mae_b.py"],
               ["--config", "configs/mae_b.py", "--config.merge.tome_recipe=timm"],
               ["--config", "configs/deit_s.py"]):
    with pytest.raises(Captured):
      cli.main(["eval", *argv, "--data", "photos", "--limit", "2"])
  assert [kw["tome_recipe"] for kw in calls] == ["mae", "timm", "timm"]
