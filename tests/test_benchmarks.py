"""Every benchmark script runs both ways; benchmarks/generation.py end to end at the
tiniest settings, and its section in BENCHMARKS.md (benchmarks/run_all.py)."""

import concurrent.futures
import json
import os
import pathlib
import runpy
import subprocess
import sys
import warnings

import numpy as np
import pytest

from benchmarks import generation, run_all

SCRIPTS = sorted(p for p in (pathlib.Path(__file__).resolve().parents[1] / "benchmarks").glob(
    "*.py") if p.name != "__init__.py")

FIELDS = ("L", "D", "method", "setting", "tokens_input", "tokens_attended", "tokens_real",
          "latency_ms", "iqr_ms", "gflops", "measured_speedup", "ideal_speedup", "dropped")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  path = tmp_path_factory.mktemp("gen") / "generation_cpu.json"
  generation.main(["--tokens", "64", "--width", "32", "--depth", "1", "--rounds", "1",
                   "--warmup", "0", "--taus", "0.5", "1.0", "--removes", "0.5",
                   "--ratios", "0", "0.5", "--json", str(path)])
  return path, json.loads(path.read_text())


def test_generation_json_rows(run):
  _, out = run
  assert out["command"].startswith("python -m benchmarks.generation --tokens 64")
  assert out["device"]["platform"] == "cpu" and "PHOTOS" in out["tokens"]["source"]
  rows = {(r["method"], r["setting"].split(" ")[0]): r for r in out["rows"]}
  assert set(rows) == {("baseline", ""), ("mame_exact", "tau=0.5"), ("mame_exact", "tau=1.0"),
                       ("mame_fixed", "tau=0.8"), ("tome_sd", "ratio=0.0"),
                       ("tome_sd", "ratio=0.5")}
  for row in out["rows"]:
    assert all(k in row for k in FIELDS), row
    assert row["tokens_input"] == 64 and 0 < row["tokens_real"] <= row["tokens_attended"] <= 64
    assert row["latency_ms"] > 0 and row["iqr_ms"] >= 0 and row["gflops"] > 0
    assert np.isclose(row["measured_speedup"],
                      rows[("baseline", "")]["latency_ms"] / row["latency_ms"])
    assert np.isclose(row["ideal_speedup"], rows[("baseline", "")]["gflops"] / row["gflops"])
  # Nothing merges: every token is attended, the program costs the baseline's.
  for key in (("baseline", ""), ("mame_exact", "tau=1.0"), ("tome_sd", "ratio=0.0")):
    assert rows[key]["tokens_attended"] == rows[key]["tokens_real"] == 64, key
    assert rows[key]["ideal_speedup"] == pytest.approx(1.0), key
  # Merging: fewer tokens attended and fewer FLOPs.
  assert rows[("tome_sd", "ratio=0.5")]["tokens_attended"] == 32
  fixed = rows[("mame_fixed", "tau=0.8")]
  assert fixed["tokens_attended"] == 32 and fixed["capacities"] == [0]
  exact = rows[("mame_exact", "tau=0.5")]
  assert exact["tokens_real"] < 64 and exact["dropped"] == 0
  assert exact["gflops"] < rows[("baseline", "")]["gflops"]


def test_generation_section_renders_the_json(run, tmp_path, monkeypatch):
  path, out = run
  (tmp_path / "results").mkdir()
  (tmp_path / "results" / path.name).write_text(path.read_text())
  monkeypatch.chdir(tmp_path)
  text = "\n".join(run_all.generation_section())
  assert out["command"] in text and out["date"] in text and "shared" in text
  assert text.count("| mame_exact ") == 2 and "| tome_sd " in text
  (tmp_path / "results" / path.name).unlink()
  assert run_all.generation_section() == []


def test_every_script_runs_as_a_module_and_as_a_file(tmp_path, monkeypatch, capsys):
  """``python -m benchmarks.X`` (the form the docs give) and ``python benchmarks/X.py``
  (benchmarks/__init__.py), each answering ``--help``: as a module in this process,
  the way ``-m`` runs it (``runpy``); as a file in a fresh interpreter started
  elsewhere, without PYTHONPATH, two at a time."""
  assert len(SCRIPTS) >= 13 and all(p.name != "__init__.py" for p in SCRIPTS)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  as_file = lambda path: subprocess.run([sys.executable, str(path), "--help"], cwd=tmp_path,
                                        env=env, capture_output=True, text=True, timeout=300)
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    files = pool.map(as_file, SCRIPTS)
    for path in SCRIPTS:
      monkeypatch.setattr(sys, "argv", [path.name, "--help"])
      with warnings.catch_warnings(), pytest.raises(SystemExit) as e:
        # runpy notes that this test already imported the module; -m would not have.
        warnings.simplefilter("ignore", RuntimeWarning)
        runpy.run_module(f"benchmarks.{path.stem}", run_name="__main__", alter_sys=True)
      assert e.value.code == 0 and "usage:" in capsys.readouterr().out, path.name
    failed = {path.name: run.stderr[-800:] for path, run in zip(SCRIPTS, files)
              if run.returncode or "usage:" not in run.stdout}
  assert not failed
