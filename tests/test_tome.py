"""ToMe baseline (mame_jax.tome): the specification, one property per test."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mame_jax.tome import (bipartite_soft_matching, merge_wavg, prop_attn_bias,
                           tome, track_source, unmerge)


def _reference_tome(x, metric, size, r, class_token):
  """Bipartite soft matching + size-weighted merge, transcribed from the paper
  in float64 loops. Returns (x_out, size_out, unmerged A positions, merged
  (source position, destination position) pairs in merge order)."""
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
    order = np.argsort(-np.asarray(best), kind="stable")
    merged = [(a_pos[k], match[k]) for k in order[:r]]
    unm = sorted(a_pos[k] for k in order[r:])
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
