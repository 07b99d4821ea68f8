"""Table 1 in one process (mame_jax.eval.loop): figures, sharding, CLI and configs."""

import io
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
import tensorflow_datasets as tfds
from PIL import Image

import mame_jax as mj
from mame_jax.cli import eval as eval_cli
from mame_jax.cli import flags
from mame_jax.configs import common
from mame_jax.eval import data, loop, report, timing
from mame_jax.models.merging import parse_layers
from mame_jax.models import checkpoints, load

TINY = dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8)
SIZE = 64
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  """A tiny 5-class ViT written as a big_vision .npz."""
  model = mj.Model(5, pool_type="tok", head_zeroinit=False, **TINY)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))["params"]
  path = tmp_path_factory.mktemp("ckpt") / "tiny.npz"
  checkpoints.save_npz(params, path)
  return str(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """The 14 skimage photographs as JPEGs in class folders c0..c4 (photo i in
  c{i % 5}), plus one truncated JPEG (c2/99.jpg, the 10th image in order)."""
  root = tmp_path_factory.mktemp("photos")
  for i, name in enumerate(data.PHOTOS):
    image = data.to_rgb_uint8(getattr(skimage.data, name)())
    image = Image.fromarray(image)
    image.thumbnail((96, 96))
    os.makedirs(root / f"c{i % 5}", exist_ok=True)
    image.save(root / f"c{i % 5}" / f"{i:02d}.jpg", quality=95)
  good = (root / "c2" / "02.jpg").read_bytes()
  (root / "c2" / "99.jpg").write_bytes(good[:len(good) // 3])
  return str(root)


@pytest.fixture(scope="module")
def run(ckpt, folder):
  """One evaluation: baseline, MaMe(0.5) in blocks 0-1, ToMe(r=4), batches of 4."""
  model, params = checkpoints.load_model(ckpt)
  stream = io.StringIO()
  result = loop.evaluate(model, params, folder, taus=[0.5], tome_r=[4], merge_layers="0-1",
                             batch_size=4, runs=2, warmup=0, stream=stream, progress=True)
  return model, params, result, stream.getvalue()


def _rows(result):
  return {r["method"]: r for r in result["rows"]}


# ----------------------------------------------------------------------------
# The figures


@pytest.fixture(scope="module")
def programs(run):
  """The baseline and MaMe forwards, jitted here, independently of the runner
  (MaMe at the settled capacities the table reports)."""
  model, _, result, _ = run
  cfg = mj.MergeConfig(tau=0.5, layers=(0, 1),
                       capacities=tuple(_rows(result)["mame"]["capacities"]))
  return {"baseline": jax.jit(lambda p, x: model.apply({"params": p}, x)),
          "mame": jax.jit(lambda p, x: model.clone(merge=cfg).apply({"params": p}, x))}


def _lean(model, cfg=None):
  """What the table times and counts: the forward returning only the logits, the
  tokens per block and, for MaMe, each merge layer's counts -- written here
  independently of the runner."""

  def forward(p, x):
    logits, aux = model.clone(merge=cfg).apply({"params": p}, x)
    out = {"tokens_per_block": aux["tokens_per_block"]}
    if cfg is not None:
      infos = [mj.models.merging.merge_records(aux)[l]["info"] for l in cfg.layers]
      out["num_preserved"] = jnp.stack([i.num_preserved for i in infos])
      out["overflow"] = jnp.stack([i.overflow for i in infos])
      out["dropped"] = jnp.stack([i.dropped for i in infos], axis=1)
    return logits, out

  return jax.jit(forward)


def test_table_figures_agree_with_a_direct_computation_on_the_same_batches(run, programs,
                                                                          folder):
  model, params, result, _ = run
  rows = _rows(result)
  loader = data.Loader(data.load_source(folder), data.preprocess_fn("big_vision", SIZE), 4,
                       warn=False)
  correct = {k: 0 for k in programs}
  tokens = {k: np.zeros(model.depth) for k in programs}
  preds = {k: [] for k in programs}
  first = None
  for batch in loader:
    first = batch.images if first is None else first
    v = batch.valid
    for name, program in programs.items():
      logits, aux = program(params, batch.images)
      if name == "mame":  # the settled schedule holds every batch: nothing dropped
        assert not any(bool(aux[f"block{l:02d}"]["merge"]["info"].overflow) for l in (0, 1))
      pred = np.asarray(jnp.argmax(logits, -1))
      correct[name] += int(np.sum(pred[v] == batch.labels[v]))
      tokens[name] += np.asarray(aux["tokens_per_block"])[v].sum(0)
      preds[name].append(pred[v])
  n = 14
  assert result["num_images"] == result["num_labelled"] == n
  for name, label in (("baseline", "baseline"), ("mame", "MaMe(tau=0.5)")):
    assert rows[name]["top1"] == pytest.approx(100 * correct[name] / n)
    np.testing.assert_allclose(rows[name]["tokens_per_layer"], tokens[name] / n)
    np.testing.assert_array_equal(result["predictions"][label], np.concatenate(preds[name]))
  cfg = mj.MergeConfig(tau=0.5, layers=(0, 1),
                       capacities=tuple(rows["mame"]["capacities"]))
  for name, lean in (("baseline", _lean(model)), ("mame", _lean(model, cfg))):
    assert rows[name]["gflops_per_image"] == pytest.approx(
        timing.gflops(lean, params, jnp.asarray(first)) / 4, rel=1e-6)
  assert rows["baseline"]["tokens_per_layer"] == [65.0, 65.0]
  assert rows["tome"]["tokens_per_layer"] == [61.0, 57.0]  # r = 4 per block
  assert rows["mame"]["mean_tokens_per_layer"] < 65
  for r in result["rows"]:
    assert r["ideal_speedup"] == pytest.approx(rows["baseline"]["gflops_per_image"]
                                               / r["gflops_per_image"])
    assert r["measured_speedup"] == pytest.approx(r["images_per_s"]
                                                  / rows["baseline"]["images_per_s"])


def test_rows_repeating_a_real_image_leave_the_real_rows_unchanged(run, programs, folder):
  # Why padding repeats a real image: MaMe's preservation mask is OR-ed over the
  # batch, and a repeated row only ORs in a mask that is already there.
  _, params, _, _ = run
  x = next(iter(data.Loader(data.load_source(folder), data.preprocess_fn("big_vision", SIZE),
                            4, warn=False))).images
  a = programs["mame"](params, x[[0, 1, 0, 0]])
  b = programs["mame"](params, x[[0, 1, 1, 0]])
  np.testing.assert_allclose(np.asarray(a[0])[:2], np.asarray(b[0])[:2], atol=1e-5)
  np.testing.assert_array_equal(np.asarray(a[1]["tokens_per_block"])[:2],
                                np.asarray(b[1]["tokens_per_block"])[:2])
  for layer in (0, 1):
    np.testing.assert_array_equal(a[1][f"block{layer:02d}"]["merge"]["info"].preserved,
                                  b[1][f"block{layer:02d}"]["merge"]["info"].preserved)


def test_report_has_one_row_per_method_and_counts_the_corrupt_image(run, folder):
  _, _, result, progress = run
  assert [r["name"] for r in result["rows"]] == ["baseline", "MaMe(tau=0.5)", "ToMe(r=4)"]
  assert [(r["tau"], r["r"]) for r in result["rows"]] == [(None, None), (0.5, None), (None, 4)]
  assert result["num_corrupt"] == 1
  assert os.path.relpath(result["corrupt"][0][0], folder) == os.path.join("c2", "99.jpg")
  text = report.format_report(result)
  for word in ("MaMe(tau=0.5)", "ToMe(r=4)", "ideal speedup", "1 corrupt image(s)",
               "64px big_vision preprocessing (crop_pct 0.875)"):  # auto: the family's
    assert word in text
  assert "warning: corrupt image" in progress
  assert "15/15" in progress and "img/s" in progress and "top1 baseline" in progress


def test_limit_evaluates_a_prefix_in_data_order(run, folder):
  model, params, full, _ = run
  part = loop.evaluate(model, params, folder, taus=(), batch_size=4, limit=6, runs=1,
                           warmup=0, progress=False)
  assert part["num_images"] == 6 and part["keys"] == full["keys"][:6]
  np.testing.assert_array_equal(part["predictions"]["baseline"],
                                full["predictions"]["baseline"][:6])


def test_imagenette_is_scored_against_imagenet_indices():
  model = mj.Model(1000, **TINY, pool_type="tok")
  params = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 32, 32, 3)))["params"]
  bias = np.zeros(1000, np.float32)
  bias[217] = 1.0  # always predicts ImageNet class 217, imagenette's label 1
  params = {**params, "head": {"kernel": jnp.zeros((32, 1000)), "bias": jnp.asarray(bias)}}
  with tfds.testing.mock_data(num_examples=16):
    raw = tfds.data_source("imagenette", split="validation")
    expected = 100 * np.mean([int(raw[i]["label"]) == 1 for i in range(16)])
    result = loop.evaluate(model, params, "imagenette", taus=(), batch_size=8, runs=1,
                               warmup=0, progress=False)
  assert result["num_labelled"] == 16
  assert result["rows"][0]["top1"] == pytest.approx(expected)


# ----------------------------------------------------------------------------
# Many devices


SHARDED = textwrap.dedent("""
    import json, sys
    from mame_jax.eval import loop
    from mame_jax.models import checkpoints, load
    model, params = checkpoints.load_model(sys.argv[1])
    out = {}
    for n in (4, 1):
      r = loop.evaluate(model, params, sys.argv[2], taus=[0.5], merge_layers=(0, 1),
                            batch_size=8, runs=1, warmup=0, num_devices=n, progress=False)
      out[n] = dict(rows=r["rows"], num_devices=r["num_devices"], keys=r["keys"],
                    num_corrupt=r["num_corrupt"],
                    predictions={k: v.tolist() for k, v in r["predictions"].items()})
    print("RESULT" + json.dumps(out))
""")


def test_sharded_over_four_devices_equals_one_device(ckpt, folder):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(  # the session's flags kept
      os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"))
  proc = subprocess.run([sys.executable, "-c", SHARDED, ckpt, folder], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.split("RESULT", 1)[1])
  four, one = out["4"], out["1"]
  assert (four["num_devices"], one["num_devices"]) == (4, 1)
  # 15 images in batches of 8: the second holds the corrupt image and one padding row.
  assert four["num_corrupt"] == one["num_corrupt"] == 1
  assert four["keys"] == one["keys"] and len(four["keys"]) == 14
  assert four["predictions"] == one["predictions"]
  for a, b in zip(four["rows"], one["rows"]):
    assert a["top1"] == b["top1"]
    assert a["tokens_per_layer"] == b["tokens_per_layer"]
    assert a["capacities"] == b["capacities"]
    assert a["gflops_per_image"] == pytest.approx(b["gflops_per_image"], rel=0.05)


# ----------------------------------------------------------------------------
# Command line and configs


def test_cli_prints_the_table_and_writes_json_rows_with_null_top1_when_unlabelled(
    ckpt, tmp_path, capsys):
  out = tmp_path / "eval.json"
  rc = eval_cli.cli_main(["--checkpoint", ckpt, "--data", "photos", "--limit", "4",
                          "--tau", "0.5", "--merge-layers", "0-1", "--batch-size", "4",
                          "--runs", "1", "--warmup", "0", "--no-progress", "--json", str(out),
                          "--preprocess", "timm", "--config.model.crop_pct=1.0"])
  assert rc == 0
  text = capsys.readouterr().out
  assert "MaMe(tau=0.5)" in text and "64px timm preprocessing (crop_pct 1.0)" in text
  payload = json.loads(out.read_text())
  assert payload["num_images"] == 4 and payload["data"] == "photos"
  assert (payload["preprocess"], payload["crop_pct"]) == ("timm", 1.0)
  assert [r["method"] for r in payload["rows"]] == ["baseline", "mame"]
  for row in payload["rows"]:
    assert row["top1"] is None
    for key in ("method", "tau", "r", "images_per_s", "gflops_per_image", "tokens_per_layer",
                "measured_speedup", "ideal_speedup"):
      assert key in row
  assert payload["rows"][0]["ideal_speedup"] == 1.0


def test_cli_without_a_checkpoint_is_a_clear_error(capsys):
  assert eval_cli.cli_main(["--data", "photos"]) == 2
  assert "no model: pass --checkpoint" in capsys.readouterr().err


CONFIG = """
from mame_jax.configs import common

def get_config(arg=None):
  c = common.eval_config()
  c.model.checkpoint = {ckpt!r}
  c.model.preprocess = "timm"
  c.input.data = {data!r}
  c.input.batch_size = 4
  c.input.limit = 6 if arg == "small" else None
  c.merge.tau = (0.5, 0.7)
  c.merge.tome_r = (3,)
  c.merge.layers = "0-1"
  return c
"""


def test_a_config_file_and_the_equivalent_flags_give_the_same_run(ckpt, folder, tmp_path,
                                                                  monkeypatch):
  config = tmp_path / "tiny_config.py"
  config.write_text(CONFIG.format(ckpt=ckpt, data=folder))
  calls = []

  class Captured(Exception):
    pass

  def fake_evaluate(model, params, data_name, **kwargs):
    calls.append((model, jax.tree.map(np.asarray, params), data_name, kwargs))
    raise Captured

  monkeypatch.setattr(loop, "evaluate", fake_evaluate)
  argvs = [["--config", f"{config}:small"],
           ["--checkpoint", ckpt, "--data", folder, "--tau", "0.5", "0.7", "--tome-r", "3",
            "--merge-layers", "0-1", "--batch-size", "4", "--limit", "6", "--preprocess",
            "timm"],
           ["--config", f"{config}:small", "--batch-size", "2"],
           ["--config", f"{config}:small", "--config.input.batch_size=2"]]
  for argv in argvs:
    with pytest.raises(Captured):
      eval_cli.cli_main(argv)
  (m1, p1, d1, k1), (m2, p2, d2, k2), (_, _, _, k3), (_, _, _, k4) = calls
  assert m1 == m2 and d1 == d2 == folder and k1 == k2
  jax.tree.map(np.testing.assert_array_equal, p1, p2)
  assert k1["taus"] == [0.5, 0.7] and k1["tome_r"] == [3] and k1["limit"] == 6
  assert k3 == {**k1, "batch_size": 2}  # the command line wins over the config
  assert k4 == k3                       # ... and so does a --config.a.b override


@pytest.mark.parametrize("name", ["deit_s", "deit_b", "mae_b", "mae_l", "mae_h", "augreg_b16"])
def test_every_paper_config_is_a_valid_config_of_its_command(name):
  path = os.path.join(REPO, "configs", f"{name}.py")
  config = flags.load_config_file(path)
  defaults = common.eval_config()
  defaults.lock()
  flags.merge_into(defaults, config, path)  # every field is one of eval's
  # Checkpoints are named by the table in models/load.py, which holds their URLs.
  assert load.is_url(load.KNOWN[config.model.checkpoint].url)
  assert config.merge.tau == (0.8,) and parse_layers(config.merge.layers) == tuple(range(8))
  doc = open(path).read()
  assert f"mame-jax eval --config configs/{name}.py" in doc
  assert ("Table 1" in doc) or ("Figure" in doc)
  small = flags.load_config_file(f"{path}:batch_size=64,tome_r=0,dtype=bfloat16")
  assert (small.input.batch_size, small.merge.tome_r, small.model.dtype) == (64, (), "bfloat16")


def test_layer_specs_parse_ranges_and_lists():
  assert parse_layers("0-7") == tuple(range(8))
  assert parse_layers("0,2,4-6") == (0, 2, 4, 5, 6)
  assert parse_layers([1, 3]) == (1, 3) and parse_layers(None) is None


def test_rows_are_timed_interleaved_on_the_first_batch(ckpt, folder, monkeypatch):
  # Every method's lean program goes into one time_interleaved call, on the same
  # batch; a fake clock makes the figures exact.
  seen = {}
  real = timing.time_interleaved

  def spy(fns, *, rounds, warmup):
    seen.update(fns=fns, rounds=rounds, warmup=warmup)
    ticks = iter(range(10_000))
    return real(fns, rounds=rounds, warmup=warmup, clock=lambda: 0.5 * next(ticks))
  monkeypatch.setattr(timing, "time_interleaved", spy)
  model, params = checkpoints.load_model(ckpt)
  result = loop.evaluate(model, params, folder, taus=[0.5], tome_r=[4], merge_layers="0-1",
                         batch_size=4, limit=8, runs=3, warmup=1, progress=False,
                         stream=io.StringIO())
  assert seen["rounds"] == 3 and seen["warmup"] == 1 and len(seen["fns"]) == 3
  firsts = {id(args[1]) for _, args in seen["fns"].values()}
  assert len(firsts) == 1  # one batch for every method
  for row in result["rows"]:
    assert row["median_s"] == 0.5 and row["iqr_s"] == 0.0
    assert row["images_per_s"] == pytest.approx(4 / 0.5)
