"""benchmarks/siglip_throughput.py: the model it times is SigLIP B/16's image tower at
512 px, and its BENCHMARKS.md section renders a run's JSON with command, device, date
and what was not measured (the run itself takes minutes: its JSON is committed under
results/)."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import siglip_throughput as bench
from mame_jax.eval import matching

RESULTS = pathlib.Path(__file__).resolve().parent.parent / "results" / "siglip_throughput.json"


def test_the_timed_model_is_siglip_b16s_image_tower_at_512_px():
  model, params = bench.siglip_b16(512)
  assert (model.width, model.depth, model.num_heads, model.mlp_dim) == (768, 12, 12, 3072)
  assert model.pool_type == "map" and not model.has_class_token and not model.num_classes
  assert params["pos_embedding"].shape == (1, 1024, 768)  # 32 x 32 patches, no class slot
  assert "MAPHead_0" in params and "head" not in params
  out = jax.eval_shape(lambda p, x: model.apply({"params": p}, x)[0], params,
                       jax.ShapeDtypeStruct((1, 512, 512, 3), jnp.float32))
  assert out.shape == (1, 768)


def run_json(batches):
  rows = []
  for b in batches:
    base = dict(batch=b, method="baseline", images_per_s=2.0, gflops_per_image=200.0)
    mame = dict(batch=b, method="mame(0.9)", tau=0.9, images_per_s=2.4, gflops_per_image=150.0)
    mame2 = dict(batch=b, method="mame(0.95)", tau=0.95, images_per_s=2.7, gflops_per_image=150.0)
    tome = dict(batch=b, method="tome(r=20)", r=20, matches_tau=[0.9, 0.95], images_per_s=2.6,
                gflops_per_image=150.0)
    for row in (base, mame, mame2, tome):
      row.update(tokens_per_layer=[1024.0], measured_speedup=row["images_per_s"] / 2.0,
                 ideal_speedup=200.0 / row["gflops_per_image"])
      rows.append(row)
  return dict(device={"platform": "cpu", "description": "cpu x1 (2 cores)"},
              date="2026-12-01", dtype="float32", batches=batches, runs=2,
              command="python -m benchmarks.siglip_throughput --quick", rows=rows)


def test_section_renders_the_run_and_says_what_is_missing(tmp_path):
  path = tmp_path / "siglip_throughput.json"
  path.write_text(json.dumps(run_json([1])))
  text = "\n".join(bench.section(path))
  assert "`python -m benchmarks.siglip_throughput --quick`" in text
  assert "cpu x1 (2 cores)" in text and "2026-12-01" in text and "Weights: random" in text
  assert text.count("| mame(0.9) ") == 1 and "| tome(r=20) " in text
  assert "batch 32: not measured" in text and "batch 1: not measured" not in text
  assert "on a GPU: not measured" in text
  assert "batch 1 mame(0.9): 2.40 img/s, below its GFLOPs-matched tome(r=20)" in text
  assert "mame(0.95): 2.70" not in text  # faster than the ToMe row it shares
  assert text.count("| tome(r=20) ") == 1 and "| 0.9, 0.95 " in text
  assert "not measured yet" in "\n".join(bench.section(tmp_path / "none.json")).lower()


def test_section_says_when_mame_merged_almost_nothing_at_a_batch(tmp_path):
  run = run_json([1, 32])
  for row in run["rows"]:
    if row["method"].startswith("mame"):
      row["tokens_per_layer"] = [1024.0, 1000.0 if row["tau"] == 0.9 else 500.0]
  path = tmp_path / "siglip_throughput.json"
  path.write_text(json.dumps(run))
  text = "\n".join(bench.section(path))
  assert ("batch 32 mame(0.9): merged almost nothing (1000 of 1024 tokens left). "
          "MaMe's preservation mask is batch-wide") in text
  assert "any of the batch's 32 images keeps it" in text
  # At batch 1 the row is reported too, but the note does not blame the batch.
  assert ("batch 1 mame(0.9): merged almost nothing (1000 of 1024 tokens left). At batch 1 "
          "no other of the images can keep a token") in text
  assert text.count("batch-wide") == 1
  assert "mame(0.95): merged" not in text and "not measured in this run" not in text
  assert "baseline's work" not in text  # no row does the baseline's work here


def test_section_says_when_rows_doing_the_baselines_work_differ_from_it(tmp_path):
  run = run_json([32])
  tome0 = dict(batch=32, method="tome(r=0)", r=0, matches_tau=[], images_per_s=2.3,
               gflops_per_image=200.0, tokens_per_layer=[1024.0], measured_speedup=1.15,
               ideal_speedup=1.0)
  run["rows"].append(tome0)
  path = tmp_path / "siglip_throughput.json"
  path.write_text(json.dumps(run))
  text = "\n".join(bench.section(path))
  assert ("batch 32 tome(r=0): does about the baseline's work (ideal 1.00x) yet measured "
          "1.15x: at this batch the measured speedups carry about 15% of this machine's "
          "drift between rows (2 runs each)") in text
  tome0["measured_speedup"] = 1.02
  path.write_text(json.dumps(run))
  assert "baseline's work" not in "\n".join(bench.section(path))


def test_taus_matching_one_r_share_one_tome_row():
  model = bench.mj.Model(None, variant="B/16", pool_type="map", class_token=False)
  out = bench.tome_r_per_tau(model, 1024, {0.8: 0.25, 0.9: 0.25, 0.95: 0.6})
  assert [taus for _, taus in out] == [[0.8, 0.9], [0.95]]
  assert [r for r, _ in out] == [matching.tome_r_for_ratio(model, 1024, q) for q in (0.25, 0.6)]
  assert out[0][0] > out[1][0] > 0  # the cheaper target merges more


def test_each_distinct_r_is_timed_once():
  # Two taus >= 1 merge nothing: both match r = 0, which gets one row.
  model = bench.mj.Model(None, width=32, depth=2, num_heads=1, mlp_dim=64, patch_size=16,
                         pool_type="map", class_token=False)
  params = bench.load.random_params(model, 64)
  images = jnp.zeros((1, 64, 64, 3), jnp.float32)
  rows = bench.bench_batch(model, params, images, (1.0, 1.5), runs=1, warmup=0)
  assert [r["method"] for r in rows] == ["baseline", "mame(1)", "mame(1.5)", "tome(r=0)"]
  assert rows[-1]["matches_tau"] == [1.0, 1.5] and rows[1]["capacities"] == []


def test_committed_results_render():
  out = json.loads(RESULTS.read_text())
  methods = [(r["batch"], r["method"]) for r in out["rows"]]
  assert len(methods) == len(set(methods))  # each ToMe r timed once
  for m in (r for r in out["rows"] if r["method"].startswith("mame")):
    shared = [r for r in out["rows"] if m["tau"] in r.get("matches_tau", [])
              and r["batch"] == m["batch"]]
    assert len(shared) == 1 and isinstance(shared[0]["matches_tau"], list)
  assert out["rows"][0]["method"] == "baseline" and 1 in out["batches"]
  assert out["rows"][0]["tokens_per_layer"][0] == 1024.0
  assert all(np.isfinite(r["ideal_speedup"]) for r in out["rows"])
  assert out["command"] in "\n".join(bench.section(RESULTS))
