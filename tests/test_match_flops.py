"""FLOP-matched comparison in one command (mame_jax.eval.matching and
``mame-jax eval --match-gflops-of-tau``): ToMe, EViT and DiffRate set to the
GFLOPs of a MaMe tau."""

import contextlib
import io
import json

import numpy as np
import pytest

import mame_jax as mj
from mame_jax import cli
from mame_jax.eval import matching
from mame_jax.eval.calibrate import vit_gflops
from mame_jax.models.merging import DiffRateConfig, EViTConfig, ToMeConfig
from tests import test_evaluate

ckpt, folder = test_evaluate.ckpt, test_evaluate.folder  # fixtures: tiny ViT, photo folders

# Analytic GFLOPs of a matched ToMe / EViT row may miss MaMe's by this much: their
# counts move in whole tokens (one token of the tiny model's 65 is ~1.2%).
TOL = 0.03
DEIT_S = dict(num_classes=1000, variant="S/16", pool_type="tok")


@pytest.fixture(scope="module")
def matched(ckpt, folder, tmp_path_factory):
  """One matched evaluation: MaMe(0.5) in blocks 0-1, everything in one batch of 16
  (the 14 photographs and a corrupt one), EViT in block 0 (the model has 2)."""
  out = tmp_path_factory.mktemp("match") / "match.json"
  argv = ["eval", "--checkpoint", ckpt, "--data", folder, "--match-gflops-of-tau", "0.5",
          "--tau", "--merge-layers", "0-1", "--config.merge.evit_layers=0",
          "--batch-size", "16", "--runs", "1", "--warmup", "0", "--no-progress",
          "--json", str(out)]
  text = io.StringIO()
  with contextlib.redirect_stdout(text):
    assert cli.main(argv) == 0
  return text.getvalue(), json.loads(out.read_text())


def test_every_matched_row_costs_what_mame_costs(matched):
  table, result = matched
  rows = {r["method"]: r for r in result["rows"]}
  assert list(rows) == ["baseline", "mame", "tome", "evit"]
  match = {r["name"]: r for r in result["match"]["rows"]}
  target = result["match"]["rows"][0]["target_gflops"]
  # MaMe measured on the same images: its matched figure is the target itself.
  assert match[rows["mame"]["name"]]["matched_gflops"] == pytest.approx(target, rel=1e-6)
  assert target < 0.95 * rows["baseline"]["gflops_per_image"]   # tau=0.5 does merge
  for kind in ("tome", "evit"):
    # "matched" comes from the tokens the row really kept in the evaluation, so it
    # also checks that the matcher's planned schedule is the model's.
    assert abs(match[rows[kind]["name"]]["off_target_pct"]) < 100 * TOL, kind
    # XLA's count (element-wise work, selection) stays near the target too.
    assert rows[kind]["gflops_per_image"] == pytest.approx(target, rel=0.15), kind
  assert rows["tome"]["r"] > 0 and rows["evit"]["name"].startswith("EViT(keep=0.")
  # The table has every row with its GFLOPs next to the target, and says why there
  # is no DiffRate row.
  for name in (r["name"] for r in result["rows"]):
    assert table.count(f"| {name} ") == 2, name
  assert "FLOP-matched to MaMe(tau=0.5)" in table and "off target %" in table
  assert "no DiffRate row" in table and result["match"]["notes"]


def test_a_bad_match_argument_fails_naming_it(ckpt, folder, capsys):
  base = ["eval", "--checkpoint", ckpt, "--data", folder, "--no-progress"]
  with pytest.raises(SystemExit) as e:
    cli.main(base + ["--match-gflops-of-tau", "half"])
  assert e.value.code == 2 and "--match-gflops-of-tau" in capsys.readouterr().err
  assert cli.main(base + ["--match-gflops-of-tau", "1.5"]) == 2
  err = capsys.readouterr().err
  assert "--match-gflops-of-tau (eval.match_tau)" in err and "[-1, 1)" in err
  # EViT's default blocks (3, 6, 9) do not exist in a 2-block model.
  assert cli.main(base + ["--config.eval.match_tau=0.5"]) == 2
  assert "merge.evit_layers" in capsys.readouterr().err


def test_planned_tokens_follow_each_methods_rules():
  model = mj.Model(**DEIT_S)
  # ToMe removes r per block until its clip, half of the patch tokens, bites.
  assert matching.planned_tokens(model, ToMeConfig(r=16), 197)[:2] == [181, 165]
  assert matching.planned_tokens(model, ToMeConfig(r=200), 197)[:3] == [99, 50, 26]
  # EViT at 0.7 in blocks 3, 6, 9: 196 -> 138 + fused -> 98 + fused -> 70 + fused.
  assert matching.planned_tokens(model, EViTConfig(0.7), 197)[2:] == (
      [197] + [140] * 3 + [100] * 3 + [72] * 3)
  assert matching.planned_tokens(model, EViTConfig(0.7, fuse=False), 197)[3] == 139
  dr = DiffRateConfig.from_spec("deit_small@2.3")
  assert matching.planned_tokens(model, dr, 197) == list(dr.merge)
  with pytest.raises(TypeError, match="MaMe's counts depend on the data"):
    matching.planned_tokens(model, mj.MergeConfig(), 197)


def test_evit_and_tome_matches_meet_an_analytic_target():
  model = mj.Model(**DEIT_S)
  hw = (224, 224)
  base = matching.schedule_gflops(model, None, hw)
  assert base == pytest.approx(float(vit_gflops(model, np.full((1, 12), 197), hw)[0]))
  for frac in (0.5, 0.7):
    target = frac * base
    evit = matching.evit_keep_matching(model, hw, target)
    tome = matching.tome_r_matching(model, hw, target)
    assert evit.layers == (3, 6, 9) and 0 < evit.keep_rate < 1
    # Within half a step: EViT's keep rate moves one token at a time, ToMe's r one
    # token per block (about 3.3% of DeiT-S's GFLOPs per step).
    for cfg, rel in ((evit, 0.01), (tome, 0.017)):
      assert matching.schedule_gflops(model, cfg, hw) == pytest.approx(target, rel=rel)
    # ToMe's r is the nearest there is: one more or one fewer is farther off.
    gap = lambda r: abs(matching.schedule_gflops(model, ToMeConfig(r=r), hw) - target)
    assert gap(tome.r) <= min(gap(tome.r - 1), gap(tome.r + 1))
  # Below what keeping one token costs: the smallest rate; above the plain model: 1.
  assert matching.evit_keep_matching(model, hw, 0.0).keep_rate < 0.01
  assert matching.evit_keep_matching(model, hw, 2 * base).keep_rate == 1.0


def test_diffrate_takes_its_published_schedule_nearest_the_target():
  small, hw = mj.Model(**DEIT_S), (224, 224)
  assert matching.diffrate_model_of(small) == "deit_small"
  assert matching.diffrate_model_of(mj.Model(1000, variant="B/16", pool_type="gap")) == "mae_base"
  assert matching.diffrate_model_of(mj.Model(5, width=32, depth=2, num_heads=2)) is None
  costs = {c.label: matching.schedule_gflops(small, c, hw)
           for c in matching.fitting_schedules(small, hw, ["deit_small"])}
  assert sorted(costs) == ["deit_small@2.3", "deit_small@2.5", "deit_small@2.7",
                           "deit_small@2.9", "deit_small@3.1"]
  assert costs["deit_small@2.3"] < costs["deit_small@2.5"] < costs["deit_small@3.1"]
  for label, g in costs.items():  # each published schedule is nearest to its own cost
    assert matching.diffrate_matching(small, hw, g).label == label
  mid = 0.3 * costs["deit_small@2.3"] + 0.7 * costs["deit_small@2.5"]
  assert matching.diffrate_matching(small, hw, mid).label == "deit_small@2.5"
  # Other image sizes: no published schedule fits (counts for 197 tokens).
  assert matching.diffrate_matching(small, (160, 160), mid) is None
