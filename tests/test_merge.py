"""MaMe (mame_jax.merge): the specification of docs/design.md, §1 MaMe and §3
Static shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from mame_jax import mame
from mame_jax.merge import num_sources
from tests import reference as ref

enable_x64 = jax.enable_x64 if hasattr(jax, "enable_x64") else jax.experimental.enable_x64


def real_rows(y, info):
  """The real output tokens of each sample, as a list of NumPy arrays."""
  y, mask = np.asarray(y, np.float64), np.asarray(info.token_mask)
  return [y[b][mask[b]] for b in range(y.shape[0])]


def assert_matches_reference(x, tau, atol, **kw):
  ns = kw.get("num_special", 0)
  ref_kw = {k: v for k, v in kw.items() if k in ("mask", "kind", "similarity", "causal")}
  metric = kw.get("metric")
  want, records, m = ref.mame(np.asarray(x, np.float64), tau, ns,
                              metric=None if metric is None else np.asarray(metric), **ref_kw)
  lib_kw = {k: v for k, v in kw.items() if k not in ("mask", "kind")}
  if "mask" in kw and kw["mask"] is not None:
    lib_kw["token_mask"] = jnp.asarray(kw["mask"])
  if "kind" in kw:
    lib_kw["partition"] = kw["kind"]
  y, info = mame(x, tau, **lib_kw)
  np.testing.assert_array_equal(np.asarray(info.preserved)[:len(m)], m)
  for got, exp in zip(real_rows(y, info), want):
    np.testing.assert_allclose(got, exp, atol=atol, rtol=0)
  return y, info, records


@pytest.mark.parametrize("tau", [0.3, 0.6, 0.85])
@pytest.mark.parametrize("num_special", [0, 1])
@pytest.mark.parametrize("batch,length", [(1, 16), (3, 17), (4, 10)])
def test_equals_numpy_transcription_on_clustered_tokens(tau, num_special, batch, length):
  x = ref.clustered_tokens(np.random.default_rng(batch * 100 + length), batch, length, 6)
  with enable_x64(True):
    assert_matches_reference(jnp.asarray(x, jnp.float64), tau, 1e-10, num_special=num_special)


@pytest.mark.parametrize("tau", [0.1, 0.3, 0.5])
def test_equals_numpy_transcription_on_photo_patches(tau):
  x = ref.photo_patches()
  with enable_x64(True):
    _, info, _ = assert_matches_reference(jnp.asarray(x), tau, 1e-10, num_special=1)
  assert 0 < int(info.num_preserved) < num_sources(x.shape[1], 1)


def test_float32_result_is_close_to_float64_transcription():
  x = ref.clustered_tokens(np.random.default_rng(0), 2, 33, 8)
  assert_matches_reference(jnp.asarray(x, jnp.float32), 0.6, 1e-5, num_special=1)


@pytest.mark.parametrize("kind", ["sequential", "alternating"])
@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_partition_and_similarity_options_equal_transcription(kind, similarity):
  x = ref.clustered_tokens(np.random.default_rng(3), 2, 15, 5, noise=0.05)
  tau = 0.7 if similarity == "cosine" else 1.5
  with enable_x64(True):
    assert_matches_reference(jnp.asarray(x), tau, 1e-10, num_special=1, kind=kind,
                             similarity=similarity)


def test_metric_drives_similarity_and_tokens_are_fused():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(2, 14, 5))
  keys = ref.clustered_tokens(rng, 2, 14, 3, noise=0.05)
  with enable_x64(True):
    assert_matches_reference(jnp.asarray(x), 0.7, 1e-10, metric=jnp.asarray(keys))


def test_single_similar_destination_means_preserved():
  # One source, two destinations: the source resembles only destination 0.
  x = np.array([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]]])  # src, dst, src (alternating)
  x = np.concatenate([x, [[[0.0, -1.0]]]], axis=1)        # dst: opposite of everything
  y, info = mame(jnp.asarray(x, jnp.float32), 0.5)
  assert bool(info.preserved[0]), "a source with one similar destination is preserved"
  np.testing.assert_array_equal(np.asarray(info.fusion), 0)
  np.testing.assert_allclose(np.asarray(y[0, :2]), x[0, [1, 3]])


def test_equal_positive_weights_mean_preserved_and_unequal_ones_merge():
  d = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
  equal = (d[0] + d[1]) / np.sqrt(2)                        # cos 0.707 to both
  skewed = 0.8 * d[0] + 0.6 * d[1]                          # cos 0.8 and 0.6
  x = np.stack([equal, d[0], skewed, d[1]])[None]           # src, dst, src, dst
  _, info = mame(jnp.asarray(x, jnp.float32), 0.5)
  assert bool(info.preserved[0]) and not bool(info.preserved[1])
  np.testing.assert_allclose(np.asarray(info.fusion[0, :, 1]), [1.0, 0.0], atol=1e-5)


def test_preserved_set_is_or_over_samples_and_r_is_shared():
  x = ref.clustered_tokens(np.random.default_rng(5), 4, 21, 6)
  _, info = mame(jnp.asarray(x, jnp.float32), 0.6, num_special=1)
  per_sample = [mame(jnp.asarray(x[b:b + 1], jnp.float32), 0.6, num_special=1)[1].preserved
                for b in range(4)]
  np.testing.assert_array_equal(np.asarray(info.preserved), np.any(np.stack(per_sample), 0))
  assert set(np.asarray(info.token_mask).sum(1).tolist()) == {1 + 10 + int(info.num_preserved)}
  np.testing.assert_array_equal(np.asarray(info.fusion).sum(1)[:, np.asarray(info.preserved)], 0)


def test_capacity_path_equals_exact_path_on_real_tokens():
  x = jnp.asarray(ref.clustered_tokens(np.random.default_rng(6), 3, 25, 6), jnp.float32)
  y, info = mame(x, 0.6, num_special=1)
  r = int(info.num_preserved)
  for c in (r, r + 5):
    yc, ic = jax.jit(lambda x: mame(x, 0.6, num_special=1, capacity=c))(x)
    assert yc.shape == (3, 1 + 12 + c, 6)
    assert not bool(ic.overflow) and int(ic.dropped.sum()) == 0
    np.testing.assert_allclose(np.asarray(yc[:, :y.shape[1]]), np.asarray(y), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(yc[:, y.shape[1]:]), 0)
    assert np.asarray(ic.token_mask).sum() == np.asarray(info.token_mask).sum()


def test_overflow_is_reported_and_dropped_tokens_counted():
  x = jnp.asarray(ref.clustered_tokens(np.random.default_rng(7), 2, 25, 6), jnp.float32)
  _, info = mame(x, 0.6, num_special=1)
  r = int(info.num_preserved)
  assert r >= 2
  y, ic = mame(x, 0.6, num_special=1, capacity=r - 2)
  assert bool(ic.overflow) and int(ic.num_preserved) == r
  np.testing.assert_array_equal(np.asarray(ic.dropped), [2, 2])
  np.testing.assert_array_equal(np.asarray(y), np.asarray(mame(x, 0.6, num_special=1)[0][:, :-2]))


def _pad(x, mask_rows, length):
  """Scatters each sample's tokens into `length` slots at the True places of
  its mask row; padded slots get junk that must not matter."""
  b, _, d = x.shape
  out = np.full((b, length, d), 7.0)
  mask = np.zeros((b, length), bool)
  for i, row in enumerate(mask_rows):
    mask[i, row] = True
    out[i, row] = x[i]
  return out, mask


def test_padding_is_invisible_to_values():
  rng = np.random.default_rng(8)
  x = ref.clustered_tokens(rng, 2, 13, 6)
  rows = [[0, 1, 2, 4, 5, 6, 9, 10, 11, 12, 14, 15, 16],
          [0, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12, 13, 17]]
  xp, mask = _pad(x, rows, 19)
  y, info = mame(jnp.asarray(x, jnp.float32), 0.6, num_special=1)
  yp, ip = mame(jnp.asarray(xp, jnp.float32), 0.6, num_special=1, token_mask=jnp.asarray(mask))
  np.testing.assert_array_equal(np.asarray(ip.preserved)[:6], np.asarray(info.preserved))
  for got, exp in zip(real_rows(yp, ip), np.asarray(y)):
    np.testing.assert_allclose(got, exp, atol=1e-5)


def test_padding_with_different_real_lengths_equals_transcription():
  rng = np.random.default_rng(9)
  x = ref.clustered_tokens(rng, 3, 16, 5)
  mask = np.ones((3, 16), bool)
  mask[0, 11:] = False
  mask[1, [3, 8, 9]] = False
  with enable_x64(True):
    assert_matches_reference(jnp.asarray(x), 0.6, 1e-10, num_special=1, mask=mask)


def test_padding_is_invisible_to_gradients():
  rng = np.random.default_rng(10)
  x = ref.clustered_tokens(rng, 1, 11, 4)
  xp, mask = _pad(x, [[0, 1, 3, 4, 5, 7, 8, 9, 10, 12, 13]], 15)
  weights = jnp.asarray(rng.normal(size=(1, 10, 4)), jnp.float32)

  def loss(x, mask, capacity):
    y, info = mame(x, 0.6, num_special=1, capacity=capacity, token_mask=mask)
    rows = jnp.where(info.token_mask[..., None], y, 0)
    return jnp.sum(rows[:, :10] * weights)

  g = jax.grad(loss)(jnp.asarray(x, jnp.float32), None, 5)
  gp = jax.grad(loss)(jnp.asarray(xp, jnp.float32), jnp.asarray(mask), 5)
  idx = [0, 1, 3, 4, 5, 7, 8, 9, 10, 12, 13]
  np.testing.assert_allclose(np.asarray(gp)[0, idx], np.asarray(g)[0], atol=1e-6)
  np.testing.assert_array_equal(np.asarray(gp)[0, [2, 6, 11, 14]], 0)


def test_random_partition_is_seeded_and_padding_invisible():
  rng = np.random.default_rng(11)
  x = jnp.asarray(ref.clustered_tokens(rng, 2, 15, 6), jnp.float32)
  key = jax.random.key(3)
  y1, i1 = mame(x, 0.6, num_special=1, partition="random", key=key)
  y2, _ = mame(x, 0.6, num_special=1, partition="random", key=key)
  y3, _ = mame(x, 0.6, num_special=1, partition="random", key=jax.random.key(4))
  np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))
  assert y1.shape != y3.shape or not np.array_equal(np.asarray(y1), np.asarray(y3))
  xp = jnp.concatenate([x, jnp.ones((2, 4, 6))], axis=1)
  mask = jnp.arange(19)[None].repeat(2, 0) < 15
  yp, ip = mame(xp, 0.6, num_special=1, partition="random", key=key, token_mask=mask)
  for got, exp in zip(real_rows(yp, ip), np.asarray(y1)):
    np.testing.assert_allclose(got, exp, atol=1e-5)


def test_causal_destination_never_absorbs_a_later_source():
  x = jnp.asarray(ref.clustered_tokens(np.random.default_rng(12), 2, 30, 4, clusters=2), jnp.float32)
  y, info = mame(x, 0.3, num_special=1, causal=True)
  fusion = np.asarray(info.fusion)
  src_pos, dst_pos = np.arange(0, 29, 2), np.arange(1, 29, 2)
  later = src_pos[None, :] > dst_pos[:, None]
  assert np.all(fusion[:, later] == 0)
  assert fusion[:, ~later].sum() > 0
  with enable_x64(True):
    assert_matches_reference(jnp.asarray(x, jnp.float64), 0.3, 1e-10, num_special=1, causal=True)


def test_jit_vmap_and_grad():
  x = jnp.asarray(ref.clustered_tokens(np.random.default_rng(13), 3, 12, 5), jnp.float32)
  f = jax.jit(lambda x, tau: mame(x, tau, capacity=6)[0])
  y_jit = f(x, 0.6)
  np.testing.assert_allclose(np.asarray(y_jit), np.asarray(mame(x, 0.6, capacity=6)[0]), atol=1e-6)
  stacked = jnp.stack([x, x[::-1]])
  y_vmap = jax.vmap(lambda x: mame(x, 0.6, capacity=6)[0])(stacked)
  np.testing.assert_allclose(np.asarray(y_vmap[1]), np.asarray(mame(x[::-1], 0.6, capacity=6)[0]),
                             atol=1e-6)
  g_x, g_tau = jax.grad(lambda x, tau: f(x, tau).sum() ** 2, argnums=(0, 1))(x, 0.6)
  assert np.all(np.isfinite(np.asarray(g_x))) and np.isfinite(float(g_tau))
  assert float(jnp.abs(g_tau)) > 0, "tau receives a gradient through eq. (3)"


def test_check_grads_away_from_thresholds():
  x = ref.clustered_tokens(np.random.default_rng(14), 2, 9, 4, clusters=2, noise=0.1)
  weights = np.random.default_rng(15).normal(size=(2, 9, 4))

  def f(x, tau):
    y, _ = mame(x, tau, capacity=5)
    return jnp.sum(y * weights[:, :y.shape[1]])

  with enable_x64(True):
    check_grads(f, (jnp.asarray(x), jnp.asarray(0.55)), order=1, modes=["rev", "fwd"],
                atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_zero_vectors_duplicates_and_low_precision_stay_finite(dtype):
  x = np.array(ref.clustered_tokens(np.random.default_rng(16), 2, 12, 4))
  x[:, 2] = 0.0
  x[:, 5] = x[:, 4]
  x[:, 7] = x[:, 4]
  x = jnp.asarray(x, dtype)
  y, info = mame(x, 0.5, num_special=1, capacity=6)
  assert y.dtype == dtype and np.all(np.isfinite(np.asarray(y, np.float32)))
  g = jax.grad(lambda x: mame(x, 0.5, num_special=1, capacity=6)[0].astype(jnp.float32).sum())(x)
  assert np.all(np.isfinite(np.asarray(g, np.float32)))
  # The zero vector (position 2 = source slot 1) has similarity 0 to everything.
  np.testing.assert_array_equal(np.asarray(info.fusion)[:, :, 1], 0)
  assert bool(info.preserved[1])


def test_exact_path_refuses_to_trace():
  x = jnp.ones((1, 8, 4))
  with pytest.raises(ValueError, match="pass a static capacity"):
    jax.jit(lambda x: mame(x, 0.5)[0])(x)


@pytest.mark.parametrize("args,kwargs,error,match", [
    ((np.ones((4, 3), np.float32), 0.5), {}, ValueError, "x must have shape .B, L, D."),
    ((np.ones((1, 4, 3), np.int32), 0.5), {}, TypeError, "floating-point"),
    ((np.ones((1, 4, 3), np.float32), float("nan")), {}, ValueError, "tau must be finite"),
    ((np.ones((1, 4, 3), np.float32), "0.5"), {}, TypeError, "tau must be a real number"),
    ((np.ones((1, 4, 3), np.float32), np.ones(2)), {}, ValueError, "tau must be a scalar"),
    ((np.ones((1, 2, 3), np.float32), 0.5), {"num_special": 1}, ValueError, "num_special"),
    ((np.ones((1, 1, 3), np.float32), 0.5), {}, ValueError, "two mergeable tokens"),
    ((np.ones((1, 6, 3), np.float32), 0.5), {"num_special": -1}, ValueError, "num_special"),
    ((np.ones((1, 6, 3), np.float32), 0.5), {"token_mask": np.ones((1, 5), bool)}, ValueError,
     "token_mask must have shape"),
    ((np.ones((1, 6, 3), np.float32), 0.5), {"token_mask": np.ones((1, 6), np.int32)}, TypeError,
     "token_mask must be boolean"),
    ((np.ones((1, 6, 3), np.float32), 0.5), {"capacity": -1}, ValueError, "capacity must be >= 0"),
    ((np.ones((1, 6, 3), np.float32), 0.5), {"capacity": 2.0}, TypeError, "capacity must be"),
    ((np.ones((1, 6, 3), np.float32), 0.5), {"partition": "random"}, ValueError, "PRNG key"),
    ((np.ones((1, 6, 3), np.float32), 0.5), {"partition": "zigzag"}, ValueError, "partition"),
    ((np.ones((1, 6, 3), np.float32), 0.5), {"similarity": "l2"}, ValueError, "similarity"),
    ((np.ones((1, 6, 3), np.float32), 0.5), {"eps": 0.0}, ValueError, "eps"),
    ((np.ones((1, 6, 3), np.float32), 0.5), {"metric": np.ones((1, 5, 2), np.float32)}, ValueError,
     "metric must have shape"),
])
def test_bad_input_gets_a_clear_error(args, kwargs, error, match):
  with pytest.raises(error, match=match):
    mame(*args, **kwargs)


def test_tau_of_one_or_more_is_valid_and_merges_nothing():
  x = np.ones((2, 9, 4), np.float32)  # all duplicates: cosine 1 everywhere
  for tau in (1.0, 2.5):
    y, info = mame(jnp.asarray(x), tau, num_special=1)
    assert y.shape == (2, 9, 4) and bool(info.preserved.all())
