"""MaRe (mame_jax.restore): docs/design.md, §2 MaRe; Algorithm 2, eqs. (11)-(13)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mame_jax import mame, mare
from tests import reference as ref

enable_x64 = jax.enable_x64 if hasattr(jax, "enable_x64") else jax.experimental.enable_x64


@pytest.mark.parametrize("num_special", [0, 1])
@pytest.mark.parametrize("length", [12, 17])
def test_equals_transcription_of_eqs_11_to_13(num_special, length):
  rng = np.random.default_rng(length + num_special)
  x = ref.clustered_tokens(rng, 3, length, 5)
  with enable_x64(True):
    y, info = mame(jnp.asarray(x), 0.6, num_special=num_special)
    # Restore something other than the merged tokens themselves (an "attention output").
    z = jnp.asarray(rng.normal(size=(3, y.shape[1], 7)))
    got = np.asarray(mare(z, info))
  _, records, _ = ref.mame(x, 0.6, num_special)
  for b in range(3):
    want = ref.mare(np.asarray(z[b]), records[b], num_special, length)
    np.testing.assert_allclose(got[b], want, atol=1e-10)


def test_identity_when_nothing_merges():
  x = jnp.asarray(ref.clustered_tokens(np.random.default_rng(0), 2, 15, 4), jnp.float32)
  y, info = mame(x, 1.0, num_special=1)
  np.testing.assert_array_equal(np.asarray(mare(y, info)), np.asarray(x))


def test_mass_is_conserved_per_sample():
  x = jnp.asarray(ref.clustered_tokens(np.random.default_rng(1), 4, 21, 6), jnp.float32)
  y, info = mame(x, 0.5, num_special=1)
  assert int(info.num_preserved) < 10, "something merged"
  z = mare(y, info)
  np.testing.assert_allclose(np.asarray(z.sum(1)), np.asarray(y.sum(1)), atol=1e-5)


def test_restores_padded_and_capacity_outputs_to_original_positions():
  rng = np.random.default_rng(2)
  x = ref.clustered_tokens(rng, 2, 16, 5)
  mask = np.ones((2, 16), bool)
  mask[0, [4, 9, 15]] = False
  y, info = mame(jnp.asarray(x, jnp.float32), 0.6, num_special=1, capacity=8,
                 token_mask=jnp.asarray(mask))
  z = np.asarray(jax.jit(mare)(y, info))
  np.testing.assert_array_equal(z[~mask], 0)
  with enable_x64(True):
    y64, info64 = mame(jnp.asarray(x), 0.6, num_special=1, token_mask=jnp.asarray(mask))
    want = np.asarray(mare(y64, info64))
  np.testing.assert_allclose(z, want, atol=1e-5)
  np.testing.assert_allclose(z.sum(1), np.asarray(y).sum(1), atol=1e-5)


def test_mare_is_differentiable_and_vmappable():
  x = jnp.asarray(ref.clustered_tokens(np.random.default_rng(3), 2, 10, 4), jnp.float32)

  def round_trip(x):
    y, info = mame(x, 0.5, capacity=5)
    return mare(y * 2.0, info)

  g = jax.grad(lambda x: round_trip(x).sum())(x)
  assert np.all(np.isfinite(np.asarray(g)))
  batched = jax.vmap(round_trip)(jnp.stack([x, x + 1]))
  np.testing.assert_allclose(np.asarray(batched[0]), np.asarray(round_trip(x)), atol=1e-6)


def test_bad_input_gets_a_clear_error():
  x = jnp.ones((2, 9, 4))
  y, info = mame(x, 0.5, num_special=1)
  with pytest.raises(ValueError, match="y must have shape .B, L_out, D."):
    mare(jnp.ones((2, y.shape[1] + 1, 4)), info)
  with pytest.raises(ValueError, match=r"\(B, L, D\)"):
    mare(jnp.ones((y.shape[1], 4)), info)
  with pytest.raises(TypeError, match="MergeInfo"):
    mare(y, {"fusion": info.fusion})


def test_generation_block_of_eqs_17_18_keeps_the_token_count():
  # x' = x + MaRe(MSA(MaMe(LN(x)))), x = x' + MLP(LN(x')) (docs/design.md, §4
  # Placement): attention runs on the merged tokens, MaRe brings its output back.
  rng = np.random.default_rng(3)
  x = jnp.asarray(ref.clustered_tokens(rng, 2, 17, 8), jnp.float32)
  wq, wk, wv, w1, w2 = (jnp.asarray(rng.normal(size=(8, 8)) / 3, jnp.float32) for _ in range(5))

  def ln(v):
    return (v - v.mean(-1, keepdims=True)) / jnp.sqrt(v.var(-1, keepdims=True) + 1e-6)

  def msa(v, mask):  # one head; padded keys masked
    logits = jnp.einsum("bqd,bkd->bqk", v @ wq, v @ wk) / jnp.sqrt(8.0)
    logits = jnp.where(mask[:, None, :], logits, -1e30)
    return jax.nn.softmax(logits, -1) @ (v @ wv)

  def block(x, tau, merge=True):
    h = ln(x)
    if merge:
      y, info = mame(h, tau, num_special=1, capacity=8)  # (B, 1 + 8 + 8, D)
      x = x + mare(msa(y, info.token_mask), info)
    else:
      x = x + msa(h, jnp.ones(h.shape[:2], bool))
    return x + jax.nn.gelu(ln(x) @ w1) @ w2

  out = jax.jit(block, static_argnums=2)(x, 0.5)
  assert out.shape == x.shape and np.isfinite(np.asarray(out)).all()
  # tau >= 1 merges nothing: the block is the plain one.
  np.testing.assert_allclose(np.asarray(jax.jit(block, static_argnums=2)(x, 1.0)),
                             np.asarray(block(x, 1.0, merge=False)), atol=1e-5)
