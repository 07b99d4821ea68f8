"""benchmarks/real_backbone.py: its command line answers --help, its crops are
seeded and all different, a tiny random run (nothing downloaded) writes every
field, and its BENCHMARKS.md section -- the page's first -- renders a run with its
command, device, date and whether the weights are real."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import real_backbone as bench
from benchmarks import run_all

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIELDS = ("batch", "method", "images_per_s", "ms_per_batch", "iqr_ms", "gflops_per_image",
          "compile_s", "measured_speedup", "ideal_speedup", "measured_over_ideal",
          "tokens_per_layer", "padded_per_layer", "final_tokens", "cls_cosine_mean",
          "cls_cosine_min", "patch_cosine_mean", "patch_cosine_min")


def test_help_names_the_flags():
  out = subprocess.run([sys.executable, "-m", "benchmarks.real_backbone", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60, check=True).stdout
  for flag in ("--quick", "--json", "--batches", "--taus", "--runs", "--warmup", "--dtype",
               "--model"):
    assert flag in out
  assert bench.REAL in out and "random" in out


def test_crops_are_seeded_and_all_different():
  crops = bench.photo_crops(16, size=32, seed=0)
  assert crops.shape == (16, 32, 32, 3) and crops.dtype == np.float32
  assert crops.min() >= -1 and crops.max() <= 1
  flat = crops.reshape(16, -1)
  assert len({row.tobytes() for row in flat}) == 16
  np.testing.assert_array_equal(bench.photo_crops(8, size=32, seed=0), crops[:8])
  assert not np.array_equal(bench.photo_crops(8, size=32, seed=1), crops[:8])
  boxes = bench.crop_boxes(16)
  assert [b[0] for b in boxes[:2]] == list(bench.PHOTOS[:2]) and boxes[14][0] == bench.PHOTOS[0]
  assert boxes[0] != boxes[14]  # the same photograph, another crop


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  path = tmp_path_factory.mktemp("rb") / "real_backbone.json"
  bench.main(["--model", "tiny", "--image-size", "56", "--batches", "2", "--taus", "0.3",
              "--variants", "sample", "budget+packed", "--every-variant-at",
              "--runs", "1", "--warmup", "0",
              "--json", str(path)])
  return path, json.loads(path.read_text())


def test_a_tiny_run_writes_every_field(tiny_run):
  _, run = tiny_run
  assert run["weights"] == "random" and run["model"] == "tiny"
  assert run["command"].startswith("python -m benchmarks.real_backbone --model tiny")
  assert run["batches"] == [2] and run["taus"] == [0.3] and run["merge_layers"] == [0, 1]
  assert run["architecture"]["tokens"] == 17 and run["inputs"]["seed"] == 0
  methods = [r["method"] for r in run["rows"]]
  assert methods[:3] == ["baseline", "mame(0.3) sample", "mame(0.3) budget+packed"]
  assert methods[3].startswith("tome(r=")
  for row in run["rows"]:
    assert all(f in row for f in FIELDS), sorted(set(FIELDS) - set(row))
    assert row["batch"] == 2 and row["images_per_s"] > 0 and row["gflops_per_image"] > 0
    assert len(row["tokens_per_layer"]) == len(row["padded_per_layer"]) == 2
    assert all(t <= p for t, p in zip(row["tokens_per_layer"], row["padded_per_layer"]))
    for k in ("cls_cosine_mean", "cls_cosine_min", "patch_cosine_mean", "patch_cosine_min"):
      assert -1 <= row[k] <= 1
    assert np.isclose(row["ideal_speedup"],
                      run["rows"][0]["gflops_per_image"] / row["gflops_per_image"])
  mame = run["rows"][1]
  assert mame["final_tokens"] < 17 and "MaRe" in mame["restore"]  # it merged: MaRe undid it
  assert mame["patch_cosine_mean"] < 1 and mame["cls_cosine_min"] <= mame["cls_cosine_mean"]
  budget = run["rows"][2]
  assert budget["merge_fields"]["mode"] == "budget" and budget["packed_sizes"]
  assert budget["padded_per_layer"][-1] <= mame["padded_per_layer"][-1]
  assert run["rows"][3]["matches_tau"] == [0.3] and "unmerge" in run["rows"][3]["restore"]


def run_json(weights="real", batches=(1, 8), platform="cpu"):
  def row(method, ips, gflops, tokens, cls, patch, **kw):
    return dict(batch=1, method=method, images_per_s=ips, iqr_ms=1.0, gflops_per_image=gflops,
                measured_speedup=ips / 10.0, ideal_speedup=9.0 / gflops,
                measured_over_ideal=ips / 10.0 / (9.0 / gflops), final_tokens=tokens[-1],
                tokens_per_layer=tokens, padded_per_layer=[round(t) for t in tokens],
                cls_cosine_mean=cls, cls_cosine_min=cls, patch_cosine_mean=patch,
                patch_cosine_min=patch, **kw)
  mame = row("mame(0.8) paper", 14.0, 5.0, [200.0, 120.0], 0.97, 0.95, tau=0.8,
             variant="paper")
  mame["padded_per_layer"] = [209, 129]
  rows = [row("baseline", 10.0, 9.0, [257.0, 257.0], 1.0, 1.0), mame,
          row("tome(r=60)", 15.0, 4.8, [197.0, 137.0], 0.98, 0.93, r=60, matches_tau=[0.8],
              matches=["mame(0.8) paper"])]
  return dict(device="cpu: cpu x1 (2 cores), jax 0.10.2", platform=platform,
              date="2026-12-07", dtype="float32", batches=list(batches), weights=weights,
              model=bench.REAL if weights == "real" else "random",
              about=bench.STAND_INS["random"],
              command="python -m benchmarks.real_backbone --batches 1 8", merge_layers=[0, 1],
              inputs=dict(rule="crop i from photo i mod 14, a random square, resized", photos=14,
                          seed=0, crop_area=[0.25, 1.0]), rows=rows)


def test_section_renders_a_run_and_says_whether_its_weights_are_real(tmp_path):
  path = tmp_path / "real_backbone.json"
  path.write_text(json.dumps(run_json()))
  text = "\n".join(bench.section(path, tmp_path / "no_gpu.json"))
  assert "`python -m benchmarks.real_backbone --batches 1 8`" in text
  assert "cpu x1 (2 cores)" in text and "2026-12-07" in text
  assert f"Weights: real -- the trained checkpoint `{bench.REAL}`" in text
  assert "Weights: random" not in text
  assert "| mame(0.8) paper " in text and "| tome(r=60) " in text and "| baseline " in text
  assert "- batch 1 mame(0.8) paper: [200.0, 120.0] (padded [209, 129])" in text
  assert "- batch 1 tome(r=60): [197.0, 137.0]\n" in text + "\n"  # no padding: said once
  assert "batch 64: not measured" in text and "batch 8: not measured" not in text
  assert "batch 256 in bf16 on a GPU: not measured" in text
  assert "mame(0.8) paper: 14.00 img/s, below its GFLOPs-matched tome(r=60)" in text
  assert "mame(0.8) paper: cls_cosine_mean 0.9700, below" in text
  # The targets, each with its figure (measured 1.40x against an ideal 1.80x).
  assert "measured / ideal >= 0.85: missed by batch 1 mame(0.8) paper (0.78)" in text
  assert "patch_cosine_mean 0.9500, below" not in text  # ahead of ToMe there
  # The random stand-in says so, plainly.
  path.write_text(json.dumps(run_json("random")))
  text = "\n".join(bench.section(path, tmp_path / "no_gpu.json"))
  assert "Weights: random" in text and "not the trained checkpoint" in text
  assert "Weights: real" not in text
  assert "not measured yet" in "\n".join(bench.section(tmp_path / "none.json")).lower()


def test_section_adds_a_gpu_run(tmp_path):
  path, gpu_path = tmp_path / "real_backbone.json", tmp_path / "real_backbone_gpu.json"
  path.write_text(json.dumps(run_json(batches=(1, 8, 64))))
  gpu = run_json(batches=(256,), platform="gpu")
  gpu.update(device="gpu: NVIDIA H100 x1, jax 0.10.2", dtype="bfloat16",
             command="python -m benchmarks.real_backbone --batches 256 --dtype bfloat16")
  gpu_path.write_text(json.dumps(gpu))
  text = "\n".join(bench.section(path, gpu_path))
  assert "On a GPU: `python -m benchmarks.real_backbone --batches 256 --dtype bfloat16`" in text
  assert "NVIDIA H100" in text and "on a GPU: not measured" not in text
  assert "not measured in this run" not in text and "- GPU batch 1 mame(0.8) paper" in text


def test_benchmarks_md_opens_with_the_real_backbone(tmp_path, monkeypatch):
  op = json.loads((ROOT / "results" / "merge_op.json").read_text())
  vit = json.loads((ROOT / "results" / "vit_throughput.json").read_text())
  (tmp_path / "results").mkdir()
  (tmp_path / "results" / "real_backbone.json").write_text(json.dumps(run_json()))
  monkeypatch.chdir(tmp_path)
  text = run_all.render(op, vit, "python -m benchmarks.run_all --render-only", True)
  headings = [l for l in text.splitlines() if l.startswith("## ")]
  assert headings[0] == "## A real backbone: DINOv2-S/14 at 224 px, baseline, MaMe, ToMe"
  # then the real dense model on that backbone (no JSON here: how to make it), then
  # the random-weights sections
  assert headings[1] == "## Dense outputs: the saliency map through restoration"
  assert headings[2] == "## The merge op beside one self-attention"
  assert "Weights: real" in text


def test_every_section_says_where_its_weights_come_from():
  """Rendered from the committed JSON, each BENCHMARKS.md section says whether its
  figures come from a trained checkpoint, random weights or a training run of
  its own."""
  op = json.loads((ROOT / "results" / "merge_op.json").read_text())
  vit = json.loads((ROOT / "results" / "vit_throughput.json").read_text())
  text = run_all.render(op, vit, "python -m benchmarks.run_all --render-only", True)
  sections = text.split("\n## ")[1:]
  assert len(sections) >= 13
  for section in sections:
    title = section.splitlines()[0]
    assert "Weights: " in section, title
