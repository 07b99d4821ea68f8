"""The `mame-jax` command: demo and convert."""

import numpy as np
import jax
import pytest

from mame_jax import cli
from mame_jax.models import checkpoints, load, vit


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
  """The demo downloads its checkpoint when online: tests run it offline, with a
  private cache."""
  monkeypatch.setenv(load.OFFLINE_ENV, "1")
  monkeypatch.setenv(load.CACHE_ENV, str(tmp_path / "cache"))


def offline_lines(out):
  return [l for l in out.splitlines() if "offline" in l and "random" in l]


def test_demo_prints_tokens_per_block_for_each_tau(capsys):
  assert cli.main(["demo", "--image-size", "64", "--tau", "0.5", "1.0", "--layers", "2",
                   "--figure", "", "--no-throughput"]) == 0
  out = capsys.readouterr().out
  assert "randomly initialised ViT-Ti/16" in out
  rows = {line.split()[0]: line.split()[1:13] for line in out.splitlines()
          if line.split()[0] in ("plain", "0.5", "1.0")}
  assert [float(v) for v in rows["plain"]] == [17.0] * 12
  assert [float(v) for v in rows["1.0"]] == [17.0] * 12     # tau >= 1 merges nothing
  kept = [float(v) for v in rows["0.5"]]
  assert kept[0] < 17 and kept[1] <= kept[0] and kept[2:] == [kept[1]] * 10


def test_convert_writes_a_big_vision_npz_with_the_same_model(tmp_path, capsys):
  model = vit.Model(5, width=32, depth=1, num_heads=2, patch_size=8, pool_type="tok",
                    gelu_approximate=False, input_norm=(checkpoints.IMAGENET_MEAN,
                                                        checkpoints.IMAGENET_STD))
  x = np.random.default_rng(0).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
  params = jax.jit(model.init)(jax.random.key(0), x)["params"]
  src, dst = tmp_path / "deit.safetensors", tmp_path / "deit.npz"
  checkpoints.save_timm(params, src, kind="deit")
  assert cli.main(["convert", str(src), str(dst)]) == 0
  loaded, loaded_params = checkpoints.load_model(dst)
  np.testing.assert_allclose(loaded.apply({"params": loaded_params}, x)[0],
                             model.apply({"params": params}, x)[0], atol=1e-5)
  assert "wrote" in capsys.readouterr().out


def test_demo_draws_the_picture_and_the_throughput_line(tmp_path, capsys):
  out_png = tmp_path / "demo.png"
  assert cli.main(["demo", "--image-size", "64", "--tau", "0.7", "--layers", "2",
                   "--figure", str(out_png)]) == 0
  out = capsys.readouterr().out
  assert out_png.stat().st_size > 0 and f"wrote {out_png}" in out
  line = next(l for l in out.splitlines() if l.startswith("throughput"))
  assert "baseline" in line and "MaMe tau=0.7" in line and "ideal" in line
  # The caption says what the ToMe row matches, with both final counts.
  caption = next(l for l in out.splitlines() if l.startswith(f"wrote {out_png}"))
  mame = [float(v) for v in caption.split("(mean of ")[1].split(")")[0].split(", ")]
  r = int(caption.split("ToMe r=")[1].split()[0])
  tome = int(caption.split(f"ToMe r={r} with ")[1].split()[0])
  assert f"MaMe tau=0.7 ends block 1 with {np.mean(mame):.1f} tokens" in caption
  counts = lambda q: [17 - min(q, 8), 17 - min(q, 8) - min(q, (16 - min(q, 8)) // 2)][-1]
  assert tome == counts(r)
  assert abs(tome - np.mean(mame)) == min(abs(counts(q) - np.mean(mame)) for q in range(18))


def test_demo_offline_says_so_in_one_line_and_runs_a_random_model(capsys):
  assert cli.main(["demo", "--image-size", "32", "--tau", "0.9", "--layers", "1",
                   "--figure", "", "--no-throughput"]) == 0
  lines = offline_lines(capsys.readouterr().out)
  assert len(lines) == 1 and load.OFFLINE_ENV in lines[0] and "augreg_s16" in lines[0]


def test_demo_without_network_falls_back_to_a_random_model(monkeypatch, tmp_path, capsys):
  monkeypatch.delenv(load.OFFLINE_ENV)
  monkeypatch.setitem(load.KNOWN, "augreg_s16",
                      load.Known("http://127.0.0.1:9/S_16.npz", None, "unreachable"))
  assert cli.main(["demo", "--image-size", "32", "--tau", "0.9", "--layers", "1",
                   "--figure", "", "--no-throughput", "--timeout", "2"]) == 0
  lines = offline_lines(capsys.readouterr().out)
  assert len(lines) == 1 and "could not get augreg_s16" in lines[0]
  assert "randomly initialised ViT-Ti/16" in lines[0]
  assert list((tmp_path / "cache").iterdir()) == []


def test_demo_checkpoint_overrides_the_default(tmp_path, capsys):
  model, params = load.random_vit(32, depth=2, width=32)
  path = tmp_path / "mine.npz"
  checkpoints.save_npz(params, path)
  assert cli.main(["demo", "--checkpoint", str(path), "--image-size", "32", "--tau", "0.9",
                   "--layers", "1", "--figure", "", "--no-throughput"]) == 0
  out = capsys.readouterr().out
  assert f"checkpoint {path}" in out and not offline_lines(out)


def test_unknown_subcommand_is_an_error(capsys):
  assert cli.main(["frobnicate"]) == 2
  assert "unknown subcommand 'frobnicate'" in capsys.readouterr().err
