"""benchmarks/dense.py: its map fidelity measures, and its BENCHMARKS.md section
rendered from a run's JSON (the timed run itself is a benchmark, not a test)."""

import json

import numpy as np

from benchmarks import dense


def test_map_fidelity_measures():
  rng = np.random.default_rng(0)
  ref = rng.uniform(size=(3, 20, 20))
  same = dense.map_fidelity(ref, ref)
  assert same == dict(map_r_mean=1.0, map_r_min=1.0, map_mae=0.0, top10_iou=1.0)
  # an affine change keeps r = 1 but not the error; the inverted map: r = -1, no overlap
  scaled = dense.map_fidelity(0.5 * ref + 0.2, ref)
  assert abs(scaled["map_r_mean"] - 1) < 1e-12 and scaled["map_mae"] > 0.1
  assert scaled["top10_iou"] == 1.0
  flipped = dense.map_fidelity(1 - ref, ref)
  assert abs(flipped["map_r_min"] + 1) < 1e-12 and flipped["top10_iou"] == 0.0


def test_section_renders_the_run(tmp_path):
  row = dict(images_per_s=10.0, iqr_ms=1.0, gflops_per_image=7.0, measured_speedup=1.0,
             ideal_speedup=1.0, measured_over_ideal=1.0, tokens=257.0, map_r_mean=1.0,
             map_r_min=1.0, map_mae=0.0, top10_iou=1.0)
  rows = [dict(row, method="baseline")]
  for place in dense.PLACEMENTS:
    rows.append(dict(row, method=f"mame(0.8) {place}", tau=0.8, placement=place,
                     map_r_mean=0.9, ideal_speedup=1.5, measured_speedup=1.3))
  rows.append(dict(row, method="tome(r=9) end, copy", matches_tau=[0.8], map_r_mean=0.95))
  run = dict(command="python -m benchmarks.dense --quick", device="cpu", dtype="float32",
             date="2026-12-06", weights="real", model=dense.REAL, about="", images=8,
             merge_layers=list(range(8)), inputs=dict(rule="crop i from photo i", seed=0),
             rows=rows)
  path = tmp_path / "dense.json"
  path.write_text(json.dumps(run))
  text = "\n".join(dense.section(path))
  assert "## Dense outputs" in text and "Weights: real" in text
  assert "| mame(0.8) end, mare before norm" in text and "| tome(r=9) end, copy" in text
  assert "- tau 0.8: end, mare before norm r = 0.900 (ideal 1.50x, measured 1.30x)" in text
  assert "- tome(r=9) end, copy (matching tau 0.8): r = 0.950" in text
  assert ("- tau 0.8: MaMe's most faithful `end` row (end, mare before norm, r = 0.900) is "
          "below tome(r=9) end, copy at the same backbone cost (r = 0.950)") in text
  assert "Not measured yet" in "\n".join(dense.section(tmp_path / "missing.json"))
