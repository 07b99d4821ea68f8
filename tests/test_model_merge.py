"""MaMe and ToMe inside the ViT (eqs. 14-16) and the exact / fixed runners."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mame_jax as mj
from mame_jax.models import checkpoints

enable_x64 = jax.enable_x64 if hasattr(jax, "enable_x64") else jax.experimental.enable_x64
TINY = dict(width=32, depth=4, num_heads=2, mlp_dim=64, patch_size=8)


def photos(n=4, size=64):
  """Real photographs (skimage.data) in [-1, 1]: merging has structure to find."""
  import skimage.data
  import skimage.transform
  names = ["astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field"]
  out = []
  for name in names[:n]:
    img = getattr(skimage.data, name)()
    img = np.stack([img] * 3, -1) if img.ndim == 2 else img[..., :3]
    out.append(skimage.transform.resize(img, (size, size), anti_aliasing=True) * 2 - 1)
  return jnp.asarray(np.stack(out), jnp.float32)


@pytest.fixture(scope="module")
def setup():
  x = photos()
  models = {pool: mj.Model(10, pool_type=pool, head_zeroinit=False, **TINY) for pool in ("tok", "gap", "map")}
  params = {pool: jax.jit(m.init)(jax.random.key(0), x)["params"] for pool, m in models.items()}
  return x, models, params


def test_tau_of_one_gives_exactly_the_plain_model(setup):
  x, models, params = setup
  plain, _ = mj.Runner(models["tok"], params["tok"])(x)
  merged = models["tok"].clone(merge=mj.MergeConfig(tau=1.0, layers=(0, 1, 2)))
  y, aux = mj.Runner(merged, params["tok"])(x)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(plain))
  np.testing.assert_array_equal(np.asarray(aux["tokens_per_block"]), 65)


@pytest.mark.parametrize("metric,tau", [("tokens", 0.3), ("keys", 0.3), ("tokens", (0.3, 0.6))])
def test_merge_in_the_block_equals_mame_by_hand_between_attention_and_mlp(setup, metric, tau):
  # tau=(0.3, 0.6): one threshold per merge layer, block 0 at 0.3, block 2 at 0.6.
  x, models, params = setup
  cfg = mj.MergeConfig(tau=tau, layers=(0, 2), metric=metric)
  layer_tau = dict(zip(cfg.layers, tau if isinstance(tau, tuple) else (tau, tau)))
  _, aux = models["tok"].clone(merge=cfg).apply({"params": params["tok"]}, x)
  mask = None
  for layer in range(4):
    block = aux[f"block{layer:02d}"]
    after_attention = block["+sa"]
    fed_to_mlp = block["+mlp"] - block["mlp"]
    if layer not in cfg.layers:
      np.testing.assert_allclose(np.asarray(fed_to_mlp), np.asarray(after_attention), atol=1e-6)
      continue
    keys = _block_keys(models["tok"], params["tok"], aux, layer) if metric == "keys" else None
    length = after_attention.shape[1]
    want, info = mj.mame(after_attention, layer_tau[layer], num_special=1, token_mask=mask,
                         metric=keys, capacity=(length - 1 + 1) // 2)  # the full capacity N
    np.testing.assert_allclose(np.asarray(fed_to_mlp), np.asarray(want), atol=2e-5)
    np.testing.assert_array_equal(np.asarray(block["merge"]["info"].token_mask),
                                  np.asarray(info.token_mask))
    mask = info.token_mask


def _block_keys(model, params, aux, layer):
  """The attention keys of ``layer`` averaged over heads, recomputed by hand."""
  p = params["Transformer"][f"encoderblock_{layer}"]
  inp = aux[f"block{layer - 1:02d}"]["+mlp"] if layer else _block_input(model, params, aux)
  mean, var = inp.mean(-1, keepdims=True), inp.var(-1, keepdims=True)
  ln = (inp - mean) / jnp.sqrt(var + 1e-6) * p["LayerNorm_0"]["scale"] + p["LayerNorm_0"]["bias"]
  k = jnp.einsum("bld,dhk->blhk", ln, p["MultiHeadDotProductAttention_0"]["key"]["kernel"])
  k = k + p["MultiHeadDotProductAttention_0"]["key"]["bias"]
  return k.mean(-2)


def _block_input(model, params, aux):
  cls = jnp.broadcast_to(params["cls"], (aux["with_posemb"].shape[0], 1, model.width))
  return jnp.concatenate([cls, aux["with_posemb"]], axis=1)


@pytest.mark.parametrize("pool", ["map"])  # the masked MAP head; gap/tok pooling: test_vit
def test_exact_mode_equals_full_capacity_and_drops_nothing(setup, pool):
  # float64 inputs: eq. (7)'s threshold is a hard decision, and programs of
  # different padded lengths can round a near-tie either way.
  x, models, params = setup
  with enable_x64(True):
    x64 = jnp.asarray(x, jnp.float64)
    p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params[pool])
    cfg = mj.MergeConfig(tau=0.6, layers=(0, 2))
    full_cfg = cfg.replace(mode="fixed", capacities=(None,) * 2)  # capacity N everywhere
    full, full_aux = mj.Runner(models[pool].clone(merge=full_cfg), p64)(x64)
    runner = mj.Runner(models[pool].clone(merge=cfg), p64, initial_fraction=0.0)
    y, aux = runner(x64)
    assert runner.reruns >= 1, "capacity 0 must overflow on photographs at tau=0.6"
    assert not aux["overflow"].any() and int(aux["dropped"].sum()) == 0
    np.testing.assert_allclose(np.asarray(y), np.asarray(full), atol=1e-5)  # float32 matmuls
    np.testing.assert_array_equal(np.asarray(aux["tokens_per_block"]),
                                  np.asarray(full_aux["tokens_per_block"]))
    assert runner.num_programs == runner.reruns + 1
    # A second batch of the same kind reuses the settled schedule: no new program.
    runner(x64[::-1])
    assert runner.num_programs == runner.reruns + 1 <= 1 + len(cfg.layers) * 3


def test_exact_mode_schedule_uses_buckets_and_shortens_the_sequence(setup):
  x, models, params = setup
  cfg = mj.MergeConfig(tau=0.6, layers=(0, 1))
  runner = mj.Runner(models["tok"].clone(merge=cfg), params["tok"])
  _, aux = runner(x)
  caps = aux["capacities"]
  # the default buckets: 8 equal steps up to each layer's N: 32 in block 0, then
  # ceil((32 + c0) / 2) for the 1 + 32 + c0 tokens block 0 hands on
  assert cfg.buckets(32) == (0, 4, 8, 12, 16, 20, 24, 28, 32)
  assert all(c in cfg.buckets(n) for c, n in zip(caps, (32, (33 + caps[0]) // 2)))
  assert all(int(r) <= c for r, c in zip(aux["num_preserved"], caps))
  assert "encoded" not in aux  # the lean program returns the summary only
  _, full = runner.full(x)
  assert full["encoded"].shape[1] < 65
  assert runner.reruns == 0 or full["capacities"] == caps


@pytest.mark.parametrize("rule", ["batch", "sample"])
def test_exact_mode_grows_a_layer_that_needs_one_token_more(setup, rule):
  """A schedule one token short in one layer: one rerun, that layer grown to
  exactly its need (buckets of one token), the result the settled schedule's."""
  x, models, params = setup
  cfg = mj.MergeConfig(tau=0.6, layers=(0, 2), bucket_step=1, preserve=rule)
  runner = mj.Runner(models["tok"].clone(merge=cfg), params["tok"])
  want, aux = runner(x)
  need = tuple(int(n) for n in aux["num_preserved"])
  assert runner.schedule == need and min(need) > 0
  for layer in range(2):
    short = tuple(n - (i == layer) for i, n in enumerate(need))
    runner.schedule, reruns = short, runner.reruns
    got, aux = runner(x)
    assert runner.reruns == reruns + 1 and aux["capacities"] == need == runner.schedule
    assert not aux["overflow"].any() and int(aux["dropped"].sum()) == 0
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_lean_forward_gives_the_full_forwards_logits_and_counts(setup):
  x, models, params = setup
  # Exact-mode MaMe (the settled schedule) and ToMe; fixed mode runs the same program
  # kind as exact mode's, and no merge has no summary to compare.
  for cfg in (mj.MergeConfig(tau=0.6, layers=(0, 1)), mj.ToMeConfig(r=6)):
    model = models["tok"].clone(merge=cfg)
    y, lean = mj.Runner(model, params["tok"])(x)
    y_full, full = mj.Runner(model, params["tok"], records=True)(x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_full))
    assert "block00" not in lean and "block00" in full
    for key in ("tokens_per_block", "num_preserved", "overflow", "dropped", "capacities"):
      assert (key in lean) == (key in full), key
      if key in lean:
        np.testing.assert_array_equal(np.asarray(lean[key]), np.asarray(full[key]))
    if isinstance(cfg, mj.MergeConfig):
      assert lean["dropped"].shape == (x.shape[0], len(cfg.layers))
      assert lean["num_preserved"].shape == lean["overflow"].shape == (len(cfg.layers),)
      # The program keeps no merge record: no (B, M, N) fusion matrix among its outputs.
      runner = mj.Runner(model, params["tok"])
      runner(x)
      program = runner.program(runner.schedule if runner.exact else None, x.shape)
      shapes = jax.eval_shape(program, params["tok"], x)[1]
      assert sorted(shapes) == ["dropped", "forced", "num_preserved", "overflow",
                              "tokens_per_block"]


def test_fixed_mode_counts_dropped_tokens(setup):
  x, models, params = setup
  cfg = mj.MergeConfig(tau=0.6, layers=(0, 2), mode="fixed")
  y, aux = mj.Runner(models["tok"].clone(merge=cfg), params["tok"])(x)
  # Capacity 0 at each merge: 2:1 reduction, preserved tokens dropped and counted.
  np.testing.assert_array_equal(np.asarray(aux["tokens_per_block"][0]), [33, 33, 17, 17])
  assert int(aux["dropped"].sum()) > 0
  np.testing.assert_array_equal(aux["dropped"][:, 0] > 0, aux["overflow"][0])


def test_tome_with_r_zero_is_the_plain_model_and_r_removes_r_tokens(setup):
  x, models, params = setup
  plain, _ = mj.Runner(models["tok"], params["tok"])(x)
  y0, _ = mj.Runner(models["tok"].clone(merge=mj.ToMeConfig(r=0)), params["tok"])(x)
  np.testing.assert_array_equal(np.asarray(y0), np.asarray(plain))
  y, aux = mj.Runner(models["tok"].clone(merge=mj.ToMeConfig(r=6)), params["tok"])(x)
  np.testing.assert_array_equal(np.asarray(aux["tokens_per_block"][0]), [59, 53, 47, 41])
  assert not np.allclose(np.asarray(y), np.asarray(plain), atol=1e-4)
  _, aux_np = mj.Runner(models["tok"].clone(merge=mj.ToMeConfig(r=6, prop_attn=False)),
                        params["tok"]).full(x)
  _, aux = mj.Runner(models["tok"].clone(merge=mj.ToMeConfig(r=6)), params["tok"]).full(x)
  assert not np.allclose(np.asarray(aux["block01"]["sa"]), np.asarray(aux_np["block01"]["sa"]))


def test_load_model_passes_the_merge_config(tmp_path, setup):
  x, models, params = setup
  path = tmp_path / "vit.npz"
  checkpoints.save_npz(params["tok"], path)
  model, loaded = mj.load_model(path, merge=mj.MergeConfig(tau=0.3, layers=(0,)))
  assert model.merge == mj.MergeConfig(tau=0.3, layers=(0,))
  y, aux = mj.Runner(model, loaded)(x)
  want, _ = models["tok"].clone(merge=model.merge).apply({"params": params["tok"]}, x)
  np.testing.assert_allclose(np.asarray(y), np.asarray(want), atol=2e-5)


def test_random_partition_and_causal_run_in_the_model(setup):
  x, models, params = setup
  for cfg in (mj.MergeConfig(tau=0.3, layers=(0,), partition="random", seed=3),
              mj.MergeConfig(tau=0.3, layers=(0,), causal=True)):
    y, aux = mj.Runner(models["gap"].clone(merge=cfg), params["gap"])(x)
    assert np.all(np.isfinite(np.asarray(y))) and int(aux["tokens_per_block"][0, 0]) < 65


def test_merge_is_differentiable_inside_the_model(setup):
  x, models, params = setup
  model = models["gap"].clone(merge=mj.MergeConfig(tau=0.3, layers=(0, 1), mode="fixed",
                                                    capacities=(8, 8)))
  g = jax.jit(jax.grad(lambda p: model.apply({"params": p}, x)[0].sum()))(params["gap"])
  leaves = jax.tree.leaves(g)
  assert all(np.all(np.isfinite(np.asarray(l))) for l in leaves)
  assert any(float(jnp.abs(l).sum()) > 0 for l in leaves)


def test_per_layer_tau_is_each_layers_single_tau(setup):
  # A layer's output depends only on its own tau: with tau=(0.3, 0.6) on blocks
  # (0, 1), block 0 behaves as under tau=0.3 everywhere, and block 1 -- fed the
  # same input -- as under tau=0.6 everywhere.
  x, models, params = setup
  run = lambda cfg: models["tok"].clone(merge=cfg).apply({"params": params["tok"]}, x)[1]
  both = run(mj.MergeConfig(tau=(0.3, 0.6), layers=(0, 1), mode="fixed", capacities=(None, None)))
  low = run(mj.MergeConfig(tau=0.3, layers=(0, 1), mode="fixed", capacities=(None, None)))
  np.testing.assert_array_equal(np.asarray(both["block00"]["+mlp"]), np.asarray(low["block00"]["+mlp"]))
  inp = both["block01"]["+sa"]
  want, info = mj.mame(inp, 0.6, num_special=1, token_mask=both["block00"]["merge"]["info"].token_mask,
                       capacity=(inp.shape[1] - 1 + 1) // 2)
  got = both["block01"]["merge"]["info"]
  np.testing.assert_array_equal(np.asarray(got.token_mask), np.asarray(info.token_mask))
  np.testing.assert_allclose(np.asarray(both["block01"]["+mlp"] - both["block01"]["mlp"]),
                             np.asarray(want), atol=2e-5)
  # The exact runner drives it like any config: same tokens as the full capacities.
  _, aux = mj.Runner(models["tok"].clone(merge=mj.MergeConfig(tau=(0.3, 0.6), layers=(0, 1))),
                     params["tok"])(x)
  np.testing.assert_array_equal(np.asarray(aux["tokens_per_block"]),
                                np.asarray(both["tokens_per_block"]))
  assert not aux["overflow"].any()


def test_per_layer_tau_may_be_traced_and_is_read_with_tau_of(setup):
  x, models, params = setup
  cfg = mj.MergeConfig(tau=(0.3, 0.6), layers=(0, 2), mode="fixed", capacities=(None, None))
  assert cfg.per_layer and cfg.tau_of(0) == 0.3 and cfg.tau_of(2) == 0.6
  with pytest.raises(ValueError, match="layer 1 is not a merge layer"):
    cfg.tau_of(1)
  assert mj.MergeConfig(tau=0.5, layers=(0, 2)).tau_of(2) == 0.5

  @jax.jit
  def tokens(taus):  # one program for every pair of thresholds
    traced = cfg.replace(tau=(taus[0], taus[1]))
    return models["tok"].clone(merge=traced).apply({"params": params["tok"]}, x)[1]["tokens_per_block"]
  want = models["tok"].clone(merge=cfg).apply({"params": params["tok"]}, x)[1]["tokens_per_block"]
  np.testing.assert_array_equal(np.asarray(tokens(jnp.array([0.3, 0.6]))), np.asarray(want))
  # Nothing merges when every layer's tau is >= 1 (cosine): the plain model.
  assert not mj.MergeConfig(tau=(1.0, 1.5), layers=(0, 2)).active
  assert mj.MergeConfig(tau=(1.0, 0.5), layers=(0, 2)).active
  assert mj.MergeConfig(tau=[0.5, 0.7], layers=(0, 2)).tau == (0.5, 0.7)  # lists and arrays
  assert mj.MergeConfig(tau=np.array([0.5, 0.75]), layers=(0, 2)).tau == (0.5, 0.75)


def test_describe_merge_names_per_layer_taus():
  from mame_jax.eval import methods
  m = methods.describe_merge(mj.MergeConfig(tau=(0.5, 0.7), layers=(0, 1)))
  assert m.name == "MaMe(tau=0.5,0.7)" and m.tau == [0.5, 0.7] and m.kind == "mame"
  assert methods.describe_merge(mj.MergeConfig(tau=0.8)).tau == 0.8


@pytest.mark.parametrize("kwargs,match", [
    (dict(tau=float("inf")), "MergeConfig.tau must be a finite"),
    (dict(tau="0.5"), "MergeConfig.tau must be a finite"),
    (dict(tau=True), "MergeConfig.tau must be a finite"),
    (dict(tau=(0.5, 0.7), layers=(0, 1, 2)), r"MergeConfig.tau needs one tau per merge layer .*got 2"),
    (dict(tau=(0.5, float("nan")), layers=(0, 1)), r"MergeConfig.tau\[1\] must be a finite"),
    (dict(tau=np.zeros((2, 2)), layers=(0, 1)), "MergeConfig.tau must be a finite"),
    (dict(layers=(0, 1), capacities=(4,)), "one entry per merge layer"),
    (dict(capacities=(-1,) * 8), "capacities must be >= 0"),
    (dict(mode="approximate"), "mode must be one of"),
    (dict(metric="values"), "metric must be one of"),
    (dict(layers=(-1,)), "layers must be >= 0"),
])
def test_bad_merge_config(kwargs, match):
  with pytest.raises(ValueError, match=match):
    mj.MergeConfig(**kwargs)


def test_runner_refuses_layers_beyond_depth(setup):
  _, models, params = setup
  with pytest.raises(ValueError, match="beyond the model's depth"):
    mj.Runner(models["tok"].clone(merge=mj.MergeConfig(layers=(0, 9))), params["tok"])
  with pytest.raises(ValueError, match="r must be an int"):
    mj.ToMeConfig(r=-2)
