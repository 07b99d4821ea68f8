"""The static budget (``mode="budget"``, ``surplus="merge"``): one program, static
shapes, nothing dropped. An image within its capacity gets exactly eqs. 1-10;
its surplus preserved sources, least unique first, go whole into their most
similar destination."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mame_jax.eval.runner import Runner
from mame_jax.merge import mame
from mame_jax.models import merging, vit
from mame_jax.models.load import random_params
from mame_jax.restore import mare
from tests import reference as ref


def _tokens(seed=0, batch=4, length=25):
  return jnp.asarray(ref.clustered_tokens(np.random.default_rng(seed), batch, length, 6),
                     jnp.float32)


def test_budget_is_exact_where_capacity_suffices():
  x = _tokens()
  y, info = mame(x, 0.6, num_special=1, capacity=12, preserve="sample")
  yb, ib = mame(x, 0.6, num_special=1, capacity=12, preserve="sample", surplus="merge")
  np.testing.assert_allclose(np.asarray(yb), np.asarray(y), atol=2e-6)  # float32 rounding
  assert not np.asarray(ib.forced).any()


def test_forced_merges_follow_the_transcription_and_conserve_mass():
  x = _tokens(1)
  cap = 1
  want, records, _ = ref.mame(x, 0.6, num_special=1, preserve="sample")
  y, info = mame(x, 0.6, num_special=1, capacity=cap, preserve="sample", surplus="merge")
  xs = np.asarray(x, np.float64)
  forced_counts = []
  for b, r in enumerate(records):
    keep = r["keep"]
    pres = np.flatnonzero(keep)
    # Least unique first: the preserved sources with the highest best similarity
    # to a destination are the ones merged away.
    best = np.array([max(ref.cosine(xs[b, d], xs[b, r["src"][j]]) for d in r["dst"])
                     for j in range(len(r["src"]))])
    stay = sorted(pres[np.argsort(best[pres], kind="stable")][:cap])
    go = [j for j in pres if j not in stay]
    forced_counts.append(len(go))
    wf = r["wf"].copy()
    for j in go:
      i = int(np.argmax([ref.cosine(xs[b, d], xs[b, r["src"][j]]) for d in r["dst"]]))
      wf[i, j] = 1.0
    src, dst = xs[b, r["src"]], xs[b, r["dst"]]
    fused = (dst + wf @ src) / (1 + wf.sum(1))[:, None]
    expect = np.concatenate([xs[b, :1], fused, src[stay]])
    n = int(np.asarray(info.token_mask[b]).sum())
    np.testing.assert_allclose(np.asarray(y[b, :n]), expect, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(info.forced), forced_counts)
  assert sum(forced_counts) > 0 and not np.asarray(info.dropped).any()
  # Every source's mass lands somewhere: MaRe hands it all back.
  restored = mare(y, info)
  np.testing.assert_allclose(np.asarray(restored.sum(1)), np.asarray(y.sum(1)), atol=1e-4)


def test_budget_runner_is_one_program_and_batch_invariant():
  model = vit.Model(10, width=32, depth=3, num_heads=2, mlp_dim=64, patch_size=4,
                    pool_type="tok")
  params = random_params(model, 32)
  rng = np.random.default_rng(2)
  coarse = rng.uniform(-1, 1, (2, 2, 2, 3))
  imgs = np.concatenate([np.repeat(np.repeat(coarse, 16, 1), 16, 2),
                         rng.uniform(-1, 1, (2, 32, 32, 3))]).astype(np.float32)
  cfg = merging.MergeConfig(tau=0.5, layers=(0, 1), mode="budget", capacities=(8, 4),
                            preserve="sample")
  runner = Runner(model.clone(merge=cfg), params)
  out, aux = runner(imgs)
  assert runner.num_programs == 1 and aux["forced"].shape == (4, 2)
  assert aux["forced"].sum() > 0 and not aux["dropped"].any()
  for b in range(4):
    alone, aux1 = runner(imgs[b:b + 1])
    np.testing.assert_allclose(np.asarray(alone[0]), np.asarray(out[b]), atol=2e-5)
    np.testing.assert_array_equal(aux1["forced"][0], aux["forced"][b])
  assert runner.num_programs == 2  # one per batch shape, never a re-run


def test_budget_gradients_finite():
  x = _tokens(3, 2, 17)

  def loss(x, tau):
    y, _ = mame(x, tau, num_special=1, capacity=1, preserve="sample", surplus="merge")
    return jnp.sum(y ** 2)
  gx, gtau = jax.grad(loss, argnums=(0, 1))(x, 0.6)
  assert np.isfinite(np.asarray(gx)).all() and np.isfinite(float(gtau))


def test_bad_budgets_fail_clearly():
  with pytest.raises(ValueError, match="needs capacities"):
    merging.MergeConfig(mode="budget", preserve="sample")
  with pytest.raises(ValueError, match="preserve='sample'"):
    merging.MergeConfig(mode="budget", layers=(0,), capacities=(4,))
  with pytest.raises(ValueError, match="surplus='merge'"):
    mame(_tokens(), 0.6, num_special=1, surplus="merge", preserve="sample")
  with pytest.raises(ValueError, match="surplus must be one of"):
    mame(_tokens(), 0.6, surplus="keep")
  with pytest.raises(ValueError, match="MergeConfig.mode"):
    merging.MergeConfig(mode="static")
