"""Packed execution: the token-wise layers after a merge run on the real tokens
only, with the same values and gradients as the padded layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mame_jax.eval.runner import Runner, packed_buckets
from mame_jax.models import merging, packing, vit
from mame_jax.models.load import random_params

MODEL = vit.Model(10, width=32, depth=4, num_heads=2, mlp_dim=64, patch_size=4,
                  pool_type="tok")


@pytest.fixture(scope="module")
def params():
  return random_params(MODEL, 32)


def _images(smooth=3, busy=3, seed=0):
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(-1, 1, (smooth, 2, 2, 3))
  flat = np.repeat(np.repeat(coarse, 16, 1), 16, 2) + rng.normal(0, 0.01, (smooth, 32, 32, 3))
  return np.concatenate([flat, rng.uniform(-1, 1, (busy, 32, 32, 3))]).astype(np.float32)


def _cfg(**kw):
  return merging.MergeConfig(tau=0.5, layers=(0, 1, 2), preserve="sample", **kw)


def test_gather_scatter_round_trip():
  mask = jnp.asarray([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
  x = jnp.arange(8.0).reshape(2, 4, 1) + 1
  idx = packing.index(mask, 6)
  np.testing.assert_array_equal(idx, [0, 1, 2, 4, 5, 8])  # 8 = B * L: unused slot
  flat = packing.gather(x, idx)
  np.testing.assert_array_equal(flat[:, 0], [1, 2, 3, 5, 6, 0])
  back = packing.scatter(flat, idx, (2, 4))
  np.testing.assert_array_equal(back, jnp.where(mask[..., None], x, 0))


def test_packed_equals_padded(params):
  imgs = _images()
  outs = {}
  for execution in ("padded", "packed"):
    model = MODEL.clone(merge=_cfg(execution=execution, capacities=(32, 16, 16)))
    outs[execution] = jax.jit(lambda p, x, m=model: m.apply({"params": p}, x))(params, imgs)
  (a, aux_a), (b, aux_b) = outs["padded"], outs["packed"]
  np.testing.assert_allclose(b, a, atol=2e-5)
  np.testing.assert_array_equal(aux_b["tokens_per_block"], aux_a["tokens_per_block"])
  mask = aux_a["token_mask"][..., None]
  np.testing.assert_allclose(jnp.where(mask, aux_b["encoded"], 0),
                             jnp.where(mask, aux_a["encoded"], 0), atol=2e-5)


def test_packed_gradients_equal_padded(params):
  imgs = _images(2, 2, seed=1)

  def loss(p, tau, execution):
    cfg = merging.MergeConfig(tau=tau, layers=(0, 1), preserve="sample",
                              execution=execution, capacities=(32, 16))
    out, _ = MODEL.clone(depth=2, merge=cfg).apply({"params": p}, imgs)
    return jnp.sum(out ** 2)
  grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
  grads = {e: grad(params, 0.5, e) for e in ("padded", "packed")}
  flat_a = jax.tree.leaves(grads["padded"])
  flat_b = jax.tree.leaves(grads["packed"])
  for ga, gb in zip(flat_a, flat_b):
    assert np.isfinite(np.asarray(gb)).all()
    np.testing.assert_allclose(gb, ga, atol=1e-4, rtol=1e-3)


def test_runner_grows_buffers_that_lose_tokens(params):
  """The first batch (smooth images) sets small buffers; a busy batch then
  needs more: exact mode runs it again with grown buffers, so the result equals
  the padded run."""
  packed = Runner(MODEL.clone(merge=_cfg(execution="packed")), params)
  padded = Runner(MODEL.clone(merge=_cfg()), params)
  smooth, busy = _images(6, 0), _images(0, 6, seed=2)
  out, aux = packed(smooth)
  # The first batch runs every slot (full capacities keep all 65 tokens of 6 rows).
  assert packed.packed is not None and aux["packed_sizes"] == (6 * 65,) * 3
  small = packed.packed
  reruns = packed.reruns
  out, aux = packed(busy)
  assert packed.reruns > reruns and all(g >= s for g, s in zip(packed.packed, small))
  want, want_aux = padded(busy)
  np.testing.assert_allclose(out, want, atol=2e-5)
  totals = np.asarray(aux["tokens_per_block"]).sum(0)[[0, 1, 2]]
  assert (totals <= np.asarray(aux["packed_sizes"])).all()
  np.testing.assert_array_equal(aux["tokens_per_block"], want_aux["tokens_per_block"])


def test_packed_program_costs_fewer_flops(params):
  from mame_jax.eval import timing
  imgs = _images(3, 3)  # uneven: the padded rows carry the busy images' length
  runner = Runner(MODEL.clone(merge=_cfg(execution="packed")), params)
  runner(imgs)
  runner(imgs)  # the settled buffers
  packed_flops = timing.gflops(runner.program(runner.schedule, imgs.shape, False,
                                              runner.packed), params, imgs)
  padded = Runner(MODEL.clone(merge=_cfg()), params)
  padded(imgs)
  padded_flops = timing.gflops(padded.program(padded.schedule, imgs.shape, False),
                               params, imgs)
  assert packed_flops < 0.9 * padded_flops


def test_bad_execution_settings_fail_clearly():
  with pytest.raises(ValueError, match="MergeConfig.execution"):
    merging.MergeConfig(execution="flat")
  with pytest.raises(ValueError, match="packed_sizes"):
    merging.MergeConfig(layers=(0, 1), packed_sizes=(10,))
  assert packed_buckets(100)[-1] == 100 and len(packed_buckets(100)) <= 33
