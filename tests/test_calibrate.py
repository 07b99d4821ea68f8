"""Choosing tau automatically (mame_jax.eval.calibrate) on tokens whose statistics are known."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import mame_jax as mj
from mame_jax.cli import calibrate as calibrate_cli
from mame_jax.eval import calibrate as cal
from mame_jax.eval import timing
from mame_jax.models import checkpoints

# Known statistics. A depth-2 ViT whose blocks are identities (zero attention and
# MLP outputs) and whose tokens are the patches' colours, on a 32 px image of 16
# patches: the 8 destinations (odd positions) are 4 of colour A = e0 then 4 of
# colour B = e1; the 8 sources (even positions) come in pairs k = 0..3 with
# cos(source, A) = 0.8 and cos(source, B) = b_k. A source with tau < b_k has
# unequal positive weights to A and B, keeps only A (eq. 7) and merges; with
# b_k <= tau < 0.8 its only positive weights are the 4 equal ones to A, so it is
# preserved. Tokens after a merge in block 0: 1 + 8 + 2 * #{k : b_k <= tau}.
COS_A, COS_B = 0.8, (0.1, 0.25, 0.4, 0.55)


def crafted_model():
  model = mj.Model(4, width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8,
                   pool_type="tok", head_zeroinit=False)
  p = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  p = jax.tree.map(np.array, p)
  kernel = np.zeros((8, 8, 3, 32), np.float32)
  for c in range(3):
    kernel[:, :, c, c] = 1 / 64  # token = the patch's mean colour in features 0..2
  p["embedding"] = {"kernel": kernel, "bias": np.zeros(32, np.float32)}
  p["pos_embedding"] = np.zeros_like(p["pos_embedding"])
  for i in range(2):
    block = p["Transformer"][f"encoderblock_{i}"]
    for dense in (block["MultiHeadDotProductAttention_0"]["out"], block["MlpBlock_0"]["Dense_1"]):
      dense["kernel"], dense["bias"] = np.zeros_like(dense["kernel"]), np.zeros_like(dense["bias"])
  return model, p


def crafted_image():
  image = np.zeros((32, 32, 3), np.float32)
  for pos in range(16):
    if pos % 2:
      colour = (1, 0, 0) if pos < 8 else (0, 1, 0)
    else:
      b = COS_B[pos // 4]
      colour = (COS_A, b, np.sqrt(1 - COS_A ** 2 - b ** 2))
    r, c = divmod(pos, 4)
    image[8 * r:8 * r + 8, 8 * c:8 * c + 8] = 0.5 * np.asarray(colour)
  return image


@pytest.fixture(scope="module")
def crafted():
  model, params = crafted_model()
  return model, params, np.stack([crafted_image()] * 4)


def speedup_of(model, tokens_after_block0):
  base = cal.vit_gflops(model, [[17, 17]], (32, 32))[0]
  n = tokens_after_block0
  return base / cal.vit_gflops(model, [[n, n]], (32, 32), (0,))[0]


def test_analytic_flops_reproduce_the_papers_baseline_gflops():
  # Table 1 counts multiply-adds (fvcore); ours count 2 per multiply-add.
  for variant, length, paper in (("S/16", 224, 4.6), ("B/16", 224, 17.6), ("L/16", 224, 61.6),
                                 ("H/14", 224, 167.4)):
    model = mj.Model(1000, variant=variant, pool_type="tok")
    tokens = (length // model.patch_size[0]) ** 2 + 1
    gflops = cal.vit_gflops(model, [[tokens] * model.depth], (length, length))[0]
    assert gflops / 2 == pytest.approx(paper, rel=0.01)


def test_calibrated_tau_sits_just_below_the_known_threshold_and_meets_the_target(crafted):
  model, params, x = crafted
  # Meeting this target needs at most 13 tokens after block 0, i.e. tau < b_2 = 0.4.
  target = 0.5 * (speedup_of(model, 13) + speedup_of(model, 15))
  # Buckets of one token: the program runs the real tokens, no slack.
  fine = mj.MergeConfig(bucket_step=1)
  result = cal.calibrate(model, params, [x], target_speedup=target, merge_layers=(0,),
                         tol=1e-3, merge=fine)
  assert 0.4 - 2e-3 <= result.tau <= 0.4 + 1e-6
  assert result.met and result.speedup == pytest.approx(speedup_of(model, 13))
  assert result.real_speedup == pytest.approx(result.speedup)
  assert result.tokens_per_layer == [13.0, 13.0]
  assert result.merge == fine.replace(tau=result.tau, layers=(0,))
  # The runner, with the chosen tau, keeps exactly the calibrated tokens.
  _, aux = mj.Runner(model.clone(merge=result.merge), params)(x)
  np.testing.assert_array_equal(np.asarray(aux["tokens_per_block"]), 13)


def test_a_gflops_target_is_met_in_the_units_of_the_eval_table(crafted):
  model, params, x = crafted
  plain = jax.jit(lambda p, x: model.apply({"params": p}, x))
  xla = timing.gflops(plain, params, jnp.asarray(x)) / 4
  result = cal.calibrate(model, params, [x], target_gflops=xla / 1.2, merge_layers=(0,),
                         merge=mj.MergeConfig(bucket_step=1))
  assert result.xla_baseline_gflops == pytest.approx(xla)
  assert result.target_speedup == pytest.approx(1.2)
  # 1.2 needs 11 tokens (1.24), so tau < b_1 = 0.25 (up to float32 rounding of the cosine).
  assert 0.25 - 2e-3 <= result.tau <= 0.25 + 1e-6 and result.met
  # The analytic count is XLA's up to the element-wise work.
  assert result.baseline_gflops_per_image == pytest.approx(xla, rel=0.15)


def test_per_layer_taus_meet_the_target_and_run_like_any_merge_config(crafted):
  model, params, x = crafted
  target = 0.5 * (speedup_of(model, 13) + speedup_of(model, 15))
  fine = mj.MergeConfig(layers=(0, 1), bucket_step=1)
  result = cal.calibrate(model, params, [x], target_speedup=target, merge_layers=(0, 1),
                         per_layer=True, merge=fine)
  assert result.met and result.speedup >= target
  assert isinstance(result.tau, tuple) and len(result.tau) == 2
  assert type(result.merge) is mj.MergeConfig
  assert result.merge == cal.layerwise(fine, result.tau)
  runner = mj.Runner(model.clone(merge=result.merge), params)
  _, aux = runner(x)
  np.testing.assert_allclose(np.asarray(aux["tokens_per_block"]).mean(0),
                             result.tokens_per_layer)


def test_an_unreachable_target_is_a_clear_error(crafted):
  model, params, x = crafted
  with pytest.raises(ValueError, match="cannot reach a speedup of 10"):
    cal.calibrate(model, params, [x], target_speedup=10.0, merge_layers=(0,))
  with pytest.raises(ValueError, match="exactly one"):
    cal.calibrate(model, params, [x])


def test_calibration_targets_the_program_that_runs(crafted):
  """With 16-token buckets (``bucket_step=16``) a layer of N = 8 sources runs
  either 0 or 8 preserved slots: keeping 2 real preserved tokens (13 tokens, tau just below
  0.4) still runs all 17, so the target needs tau below b_0 = 0.1 (every source
  merges, the 0 bucket). The promise is then what the runner's program costs."""
  model, params, x = crafted
  target = 0.5 * (speedup_of(model, 13) + speedup_of(model, 15))
  result = cal.calibrate(model, params, [x], target_speedup=target, merge_layers=(0,),
                         merge=mj.MergeConfig(bucket_step=16))
  assert result.tau < 0.1 + 1e-6 and result.met
  runner = mj.Runner(model.clone(merge=result.merge), params)
  _, aux = runner(x)
  padded, paid = runner.paid_tokens(x.shape)
  assert padded[0] == paid[0] == result.tokens_per_layer[0] == 9  # the 0 bucket: no slack
  assert result.speedup == pytest.approx(speedup_of(model, 9))
  # The program-blind count (real tokens) of the tau the old rule picked, 0.4,
  # would have promised 13 tokens but run 17.
  coarse = mj.MergeConfig(tau=0.39, layers=(0,), bucket_step=16)
  runner = mj.Runner(model.clone(merge=coarse), params)
  _, aux = runner(x)
  padded, _ = runner.paid_tokens(x.shape)
  assert np.asarray(aux["tokens_per_block"])[0, 0] == 13 and padded[0] == 17
  # The default buckets scale with N (8 steps of ceil(8 / 8) = 1 here): no slack.
  runner = mj.Runner(model.clone(merge=coarse.replace(bucket_step=None)), params)
  runner(x)
  assert runner.paid_tokens(x.shape)[0][0] == 13
  # Packed execution pays for the real tokens in the token-wise layers.
  packed = coarse.replace(preserve="sample", execution="packed")
  runner = mj.Runner(model.clone(merge=packed), params)
  runner(x)
  runner(x)
  padded, paid = runner.paid_tokens(x.shape)
  assert padded[0] == 17 and paid[0] == pytest.approx(13, abs=1)


def test_layerwise_config_drops_layers_that_merge_nothing():
  base = mj.MergeConfig(layers=(0, 1, 2), metric="keys", capacities=(4, 4, 4))
  cfg = cal.layerwise(base, [0.5, 1.0, 0.7])
  assert type(cfg) is mj.MergeConfig  # a plain config: one tau per remaining layer
  assert cfg.layers == (0, 2) and cfg.tau == (0.5, 0.7) and cfg.tau_of(2) == 0.7
  assert cfg.metric == "keys" and cfg.capacities is None  # other options kept
  assert (cal.layerwise(mj.MergeConfig(layers=(0, 1, 2)), [0.6] * 3)
          == mj.MergeConfig(tau=0.6, layers=(0, 1, 2)))
  assert not cal.layerwise(base, [1.0, 1.0, 1.0]).active  # nothing left to merge
  with pytest.raises(ValueError, match="one tau per merge layer"):
    cal.layerwise(base, [0.5])
  with pytest.raises(ValueError, match="MergeConfig.tau needs one tau per merge layer"):
    mj.MergeConfig(layers=(0, 1), tau=(0.5,))


def test_cli_calibrates_on_the_first_images_and_evaluates_the_rest(crafted, tmp_path, capsys):
  model, params, x = crafted
  ckpt = tmp_path / "crafted.npz"
  checkpoints.save_npz(params, ckpt)
  image = np.clip(np.round((crafted_image() + 1) * 127.5), 0, 255).astype(np.uint8)
  for cls in ("a", "b"):
    (tmp_path / "data" / cls).mkdir(parents=True)
    for i in range(3):
      Image.fromarray(image).save(tmp_path / "data" / cls / f"{i}.png")
  out = tmp_path / "cal.json"
  rc = calibrate_cli.cli_main(["--checkpoint", str(ckpt), "--data", str(tmp_path / "data"),
                     "--preprocess", "siglip", "--target-speedup", "1.2",
                     "--merge-layers", "0", "--calib-images", "4", "--batch-size", "4",
                     "--runs", "1", "--warmup", "0", "--no-progress", "--json", str(out),
                     "--config.merge.bucket_step=1"])
  assert rc == 0
  assert "held-out evaluation" in capsys.readouterr().out
  payload = json.loads(out.read_text())
  assert payload["met"] and payload["speedup"] >= 1.2
  assert 0.2 < payload["tau"] < 0.3  # near b_1 = 0.25, moved a little by the uint8 PNGs
  heldout = payload["heldout"]
  assert heldout["num_images"] == 2  # 6 images, the first 4 calibrate
  assert [r["method"] for r in heldout["rows"]] == ["baseline", "mame"]
  assert heldout["rows"][1]["tau"] == pytest.approx(payload["tau"])
  assert heldout["rows"][1]["tokens_per_layer"] == [11.0, 11.0]
