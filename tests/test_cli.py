"""The `mame-jax` command: demo and convert."""

import numpy as np
import jax

from mame_jax import cli
from mame_jax.models import checkpoints, vit


def test_demo_prints_tokens_per_block_for_each_tau(capsys):
  assert cli.main(["demo", "--image-size", "64", "--tau", "0.7", "1.0", "--layers", "2",
                   "--figure", "", "--no-throughput"]) == 0
  out = capsys.readouterr().out
  assert "randomly initialised ViT-Ti/16" in out
  rows = {line.split()[0]: line.split()[1:13] for line in out.splitlines()[2:5]}
  assert [float(v) for v in rows["plain"]] == [17.0] * 12
  assert [float(v) for v in rows["1.0"]] == [17.0] * 12     # tau >= 1 merges nothing
  kept = [float(v) for v in rows["0.7"]]
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


def test_unknown_subcommand_is_an_error(capsys):
  assert cli.main(["frobnicate"]) == 2
  assert "unknown subcommand 'frobnicate'" in capsys.readouterr().err
