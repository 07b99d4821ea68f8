"""mame_jax.cpu and benchmarks/cpu_peer.py: the XLA settings the package applies
change no logits of the photographs, stand aside for a user's own XLA_FLAGS, and
the side-by-side benchmark answers --help and runs a tiny --quick configuration
without torch (and, where torch and timm are installed, with them)."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import cpu_peer
from mame_jax import cpu

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Logits of the project's photographs under a small random ViT, written to argv[1];
# argv[2] receives what mame_jax.cpu added to XLA_FLAGS and how many YNNPACK
# fusions the compiled program holds.
LOGITS = """
import json, sys
import jax, numpy as np
import mame_jax as mj
from mame_jax import cpu
from benchmarks.vit_throughput import photo_batch
model, params = mj.load_model(variant="Ti/16", gelu_approximate=False)
images = photo_batch(6)
forward = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])
np.save(sys.argv[1], np.asarray(forward(params, images)))
ynn = forward.lower(params, images).compile().as_text().count('"kind":"__ynn_fusion"')
json.dump(dict(applied=cpu.applied(), ynn=ynn), open(sys.argv[2], "w"))
"""


def _logits(tmp_path, name, **env):
  environ = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | env
  out, applied = tmp_path / f"{name}.npy", tmp_path / f"{name}.json"
  subprocess.run([sys.executable, "-c", LOGITS, str(out), str(applied)], cwd=ROOT, env=environ,
                 check=True, timeout=300, capture_output=True)
  return np.load(out), json.loads(applied.read_text())


def test_settings_change_no_logits(tmp_path):
  """The photographs' logits with the package's settings and with XLA's defaults
  (``MAME_JAX_CPU_SETTINGS=0``), each in a fresh process, agree to float32
  rounding, though the two programs differ (YNNPACK's fusions or none)."""
  with_settings, on = _logits(tmp_path, "with")
  without, off = _logits(tmp_path, "without", **{cpu.OPT_OUT_ENV: "0"})
  assert on["applied"] == cpu.SETTINGS and off["applied"] == {}
  if cpu.SETTINGS:  # the setting took effect: YNNPACK runs only without it
    assert on["ynn"] == 0 < off["ynn"]
  assert with_settings.shape == (6, 1000) and np.isfinite(with_settings).all()
  scale = np.abs(without).max()
  np.testing.assert_allclose(with_settings, without, rtol=0, atol=1e-5 * scale)


def test_settings_leave_a_users_flags_alone(monkeypatch):
  """A flag the user's XLA_FLAGS names is not added again; the others are, in
  XLA_FLAGS' spelling; the opt-out adds nothing."""
  monkeypatch.setattr(cpu, "SETTINGS", {"xla_cpu_use_onednn": True,
                                        "xla_cpu_experimental_ynn_fusion_type":
                                        "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"})
  monkeypatch.setattr(cpu, "_backends_started", lambda: False)
  env = {"XLA_FLAGS": "--xla_cpu_use_onednn=false --xla_dump_to=/tmp/x"}
  assert cpu.apply(env) == {"xla_cpu_experimental_ynn_fusion_type":
                            "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
  assert env["XLA_FLAGS"] == ("--xla_cpu_use_onednn=false --xla_dump_to=/tmp/x "
                              "--xla_cpu_experimental_ynn_fusion_type=dot,reduce")
  empty = {}
  assert cpu.apply(empty) == dict(cpu.SETTINGS)
  assert empty["XLA_FLAGS"] == ("--xla_cpu_use_onednn=true "
                                "--xla_cpu_experimental_ynn_fusion_type=dot,reduce")
  opted_out = {cpu.OPT_OUT_ENV: "0"}
  assert cpu.apply(opted_out) == {} and "XLA_FLAGS" not in opted_out


def test_settings_wait_for_no_running_backend(monkeypatch):
  """Once jax runs a backend, XLA has read its flags: nothing is added."""
  monkeypatch.setattr(cpu, "SETTINGS", {"xla_cpu_use_onednn": True})
  monkeypatch.setattr(cpu, "_backends_started", lambda: True)
  env = {}
  assert cpu.apply(env) == {} and env == {}


def test_help_names_the_flags():
  out = subprocess.run([sys.executable, "-m", "benchmarks.cpu_peer", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, check=True).stdout
  for flag in ("--quick", "--no-peer", "--json", "--variants", "--batches", "--parts",
               "--flag-names", "ops", "profile", "flags"):
    assert flag in out


def test_quick_without_torch(tmp_path, monkeypatch):
  """With torch unimportable the project's rows run alone, the JSON says why, and
  the section renders it."""
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
  path = tmp_path / "cpu_peer.json"
  cpu_peer.main(["--quick", "--json", str(path)])
  run = json.loads(path.read_text())
  assert run["versions"]["jax"] and run["weights"] == "random" and run["dtype"] == "float32"
  assert "not importable" in run["peer_note"] and run["real_tome"] is False
  defaults = ["baseline (XLA defaults)"] if cpu.SETTINGS else []
  assert [r["method"] for r in run["rows"]] == ["baseline", "mame", "tome"] + defaults
  for row in run["rows"]:
    assert row["framework"] == "jax" and row["batch"] == 2 and row["images_per_s"] > 0
    assert row["gflops_per_image"] > 0 and "vs_peer" not in row
  text = "\n".join(cpu_peer.section([path]))
  assert run["command"] in text and "Weights: random" in text
  assert "not measured: this run had no PyTorch peer" in text


def test_quick_with_timm(tmp_path):
  """Where torch and timm are installed, timm's model of the same shapes runs in
  the same rounds and the baseline and ToMe rows carry their ratio to it."""
  pytest.importorskip("torch")
  pytest.importorskip("timm")
  path = tmp_path / "cpu_peer.json"
  cpu_peer.main(["--quick", "--json", str(path)])
  run = json.loads(path.read_text())
  by = {r["method"]: r for r in run["rows"]}
  assert by["timm"]["framework"] == "torch" and run["versions"]["torch"]
  assert by["baseline"]["peer"] == "timm"
  assert by["tome"]["peer"] == ("tome (real)" if run["real_tome"] else "timm")
  for method in ("baseline", "tome"):
    row = by[method]
    assert row["vs_peer"] == pytest.approx(row["images_per_s"]
                                           / by[row["peer"]]["images_per_s"])
  assert "Targets" in "\n".join(cpu_peer.section([path]))
