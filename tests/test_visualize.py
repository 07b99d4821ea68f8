"""Token-cluster pictures and the ``mame-jax visualize`` CLI (mame_jax.vis.pictures)."""

import os

import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest

import mame_jax as mj
from mame_jax.models import checkpoints
from mame_jax.cli import visualize as visualize_cli
from mame_jax.eval import data
from mame_jax.models import load
from mame_jax.models.merging import parse_layers
from mame_jax.vis import pictures

RANDOM_VIT = load.random_vit


def tiny_vit(image_size=224, **kw):
  """Stands in for the CLI's random ViT: small enough to compile in seconds."""
  return RANDOM_VIT(64, depth=2, width=32, seed=kw.get("seed", 0))


@pytest.fixture
def tiny(monkeypatch):
  monkeypatch.setattr(load, "random_vit", tiny_vit)
  return tiny_vit()


def test_cluster_image_paints_each_group_with_the_mean_colour_of_its_patches():
  # 2 x 2 patches of 16 px: red, green / blue, white; the top two share a token.
  rgb = np.zeros((32, 32, 3))
  rgb[:16, :16], rgb[:16, 16:], rgb[16:, :16], rgb[16:, 16:] = (1, 0, 0), (0, 1, 0), (0, 0, 1), 1
  pic = pictures.cluster_image(rgb * 2 - 1, np.array([5, 5, 7, 9]), (2, 2), line=(0.5, 0.5, 0.5))
  assert pic.shape == (32, 32, 3)
  np.testing.assert_allclose(pic[4, 4], (0.5, 0.5, 0))      # mean of red and green
  np.testing.assert_allclose(pic[4, 28], (0.5, 0.5, 0))
  np.testing.assert_allclose(pic[28, 4], (0, 0, 1))
  np.testing.assert_allclose(pic[28, 28], (1, 1, 1))
  np.testing.assert_allclose(pic[4, 15], (0.5, 0.5, 0))     # no line inside a group
  np.testing.assert_allclose(pic[15, 4], (0.5, 0.5, 0.5))   # a line between groups
  np.testing.assert_allclose(pic[28, 15], (0.5, 0.5, 0.5))


def test_cluster_image_scales_to_any_size_and_paints_dropped_patches_black():
  rgb = np.random.default_rng(0).uniform(-1, 1, (32, 32, 3))
  pic = pictures.cluster_image(rgb, np.array([1, -1, 1, 1]), (2, 2), size=100)
  assert pic.shape == (100, 100, 3)
  np.testing.assert_allclose(pic[20, 80], 0)


def test_every_patch_its_own_token_gives_the_patch_mean_image():
  rgb = np.random.default_rng(1).uniform(-1, 1, (32, 32, 3))
  pic = pictures.cluster_image(rgb, np.arange(4), (2, 2))
  np.testing.assert_allclose(pic[5, 5], (rgb[:16, :16].mean((0, 1)) + 1) / 2, rtol=1e-5)


def test_figure_png_has_the_expected_pixel_size(tmp_path, tiny):
  model, params = tiny
  images = np.stack([data.load_image(n, 64) for n in ("astronaut", "coffee")])
  fig, counts = pictures.draw(model, params, images, tau=0.5, layers=(0, 1), tome_r=3,
                               out_path=tmp_path / "fig.png", panel=96)
  png = matplotlib.image.imread(tmp_path / "fig.png")
  width, height = pictures.figure_size(4, 2, panel=96)        # 2 images x (MaMe, ToMe)
  assert png.shape[:2] == (height, width) == (4 * (96 + pictures.TITLE_PX), 3 * 96)
  assert set(counts) == {"MaMe tau=0.5", "ToMe r=3"}
  assert counts["ToMe r=3"][:, 1].tolist() == [11, 11]         # 17 - 3 - 3
  assert (counts["MaMe tau=0.5"][:, 1] < 17).all()


def test_cli_draws_the_figure_and_says_the_model_is_random(tmp_path, tiny, capsys):
  import skimage.io
  photo = tmp_path / "photo.png"
  skimage.io.imsave(photo, (np.random.default_rng(0).uniform(0, 1, (40, 60, 3)) * 255).astype(np.uint8))
  out = tmp_path / "out.png"
  rc = visualize_cli.cli_main([str(photo), "astronaut", "--tau", "0.5", "--layers", "0-1",
                           "--out", str(out), "--panel", "64"])
  assert rc == 0
  text = capsys.readouterr().out
  assert "randomly initialised" in text and f"wrote {out}" in text
  assert "MaMe tau=0.5" in text and "astronaut" in text
  png = matplotlib.image.imread(out)
  assert png.shape[:2] == (2 * (64 + pictures.TITLE_PX), 3 * 64)


def test_cli_rejects_an_unknown_image(tmp_path, tiny, capsys):
  rc = visualize_cli.cli_main(["no_such_photo", "--out", str(tmp_path / "x.png"), "--layers", "0"])
  assert rc == 2
  assert "neither an image file nor a skimage.data photograph" in capsys.readouterr().err
  assert not (tmp_path / "x.png").exists()


def test_cli_rejects_layers_beyond_the_model(tmp_path, tiny, capsys):
  rc = visualize_cli.cli_main(["astronaut", "--layers", "0-7", "--out", str(tmp_path / "x.png")])
  assert rc == 2
  assert "layers must be blocks of the model" in capsys.readouterr().err


def test_layers_parse_ranges_and_lists():
  assert parse_layers("0-7") == tuple(range(8))
  assert parse_layers("0,2, 4") == (0, 2, 4)
  assert parse_layers("3") == (3,)
  assert parse_layers("0-2,6") == (0, 1, 2, 6)
  with pytest.raises(ValueError, match="'a-b'"):
    parse_layers("a-b")


def test_load_image_reads_files_and_skimage_photographs(tmp_path):
  import skimage.io
  grey = tmp_path / "grey.png"
  skimage.io.imsave(grey, np.tile(np.arange(80, dtype=np.uint8), (50, 1)))
  img = data.load_image(str(grey), 64)
  assert img.shape == (64, 64, 3) and img.dtype == np.float32
  assert -1 <= img.min() < img.max() <= 1
  np.testing.assert_allclose(img[..., 0], img[..., 2])
  photo = data.load_image("chelsea", 48)
  assert photo.shape == (48, 48, 3) and -1 <= photo.min() and photo.max() <= 1
  with pytest.raises(ValueError, match="skimage.data"):
    data.load_image("data_dir")


def test_offline_gives_the_random_model_and_says_so(monkeypatch, tiny):
  monkeypatch.setenv(load.OFFLINE_ENV, "1")
  model, params, note = load.pretrained_or_random("http://never.used/x.npz")
  assert note.startswith("offline") and "randomly initialised" in note
  assert model.depth == 2


def test_a_failed_download_falls_back_to_the_random_model(monkeypatch, tmp_path, tiny):
  monkeypatch.delenv(load.OFFLINE_ENV, raising=False)
  _, _, note = load.pretrained_or_random("http://127.0.0.1:9/x.npz", timeout=2,
                                              cache_dir=tmp_path)
  assert note.startswith("could not get") and "randomly initialised" in note
  assert list(tmp_path.iterdir()) == [], "no half-written file left behind"


def test_a_reachable_checkpoint_is_downloaded_cached_and_loaded(monkeypatch, tmp_path):
  monkeypatch.delenv(load.OFFLINE_ENV, raising=False)
  model, params = load.random_vit(32, depth=1, width=32)
  src = tmp_path / "src" / "tiny.npz"
  src.parent.mkdir()
  checkpoints.save_npz(params, src, layout="old")               # the AugReg file layout
  cache = tmp_path / "cache"
  loaded, got, note = load.pretrained_or_random(src.as_uri(), cache_dir=cache)
  assert note.startswith("checkpoint ") and "tiny.npz" in note
  assert len(list(cache.glob("*tiny.npz"))) == 1
  assert loaded.depth == 1 and loaded.width == 32
  np.testing.assert_allclose(np.asarray(got["embedding"]["kernel"]),
                             np.asarray(params["embedding"]["kernel"]))
  os.remove(src)                                                # the cache is read next time
  _, _, again = load.pretrained_or_random(src.as_uri(), cache_dir=cache)
  assert again.startswith("checkpoint ") and "tiny.npz" in again


def test_demo_figure_draws_the_bundled_photographs(tmp_path, tiny, capsys):
  # tau and r as in the figure test above: the compiled programs are reused.
  out = pictures.demo_figure(tmp_path / "demo.png", images=("astronaut", "coffee"),
                              tau=0.5, tome_r=3, layers=(0, 1), panel=64)
  assert out.exists()
  png = matplotlib.image.imread(out)
  assert png.shape[:2] == pictures.figure_size(4, 2, panel=64)[::-1]
  assert "randomly initialised" in capsys.readouterr().out


def test_merge_maps_run_each_image_alone():
  # MaMe's preservation is batch-wide: in a batch an image keeps what any image keeps.
  model, params = load.random_vit(64, depth=1, width=32)
  images = jnp.asarray(np.stack([data.load_image(n, 64) for n in ("astronaut", "coffee")]))
  cfg = mj.MergeConfig(tau=0.5, layers=(0,))
  maps, aux = pictures.merge_maps(model, params, images, cfg)
  alone, _ = pictures.merge_maps(model, params, images[1:], cfg)
  np.testing.assert_array_equal(np.asarray(maps[0].hard[1]), np.asarray(alone[0].hard[0]))
  assert aux["tokens_per_block"].shape == (2, 1)


def test_matched_tome_removes_about_as_many_tokens_as_mame(tiny):
  # ToMe's r is clipped per block to half the tokens: the match simulates the clip,
  # so the ToMe row ends as close to MaMe's count as any r can bring it.
  model, params = tiny
  images = np.stack([data.load_image(n, 64) for n in ("astronaut", "coffee")])
  _, counts = pictures.draw(model, params, images, tau=0.5, layers=(0, 1), tome_r="match")
  (_, mame), (label, tome) = counts.items()
  r = int(label.split("r=")[1])
  target = mame[:, 1].mean()
  assert tome[:, 1].tolist() == [pictures.tome_token_counts(17, r, 2)[-1]] * 2
  assert abs(tome[0, 1] - target) == min(
      abs(pictures.tome_token_counts(17, q, 2)[-1] - target) for q in range(18))


def test_evit_and_diffrate_rows_show_kept_fused_and_pruned_patches(tmp_path, tiny):
  # 64 px, 16-px patches: 16 patches + the class token, 2 blocks.
  model, params = tiny
  images = np.stack([data.load_image(n, 64) for n in ("astronaut", "coffee")])
  evit = mj.EViTConfig(keep_rate=0.5, layers=(0,))
  dr = mj.DiffRateConfig(prune=(13, 9), merge=(11, 7))
  _, counts = pictures.draw(model, params, images, tau=0.5, layers=(0, 1), extra=[evit, dr],
                            out_path=tmp_path / "fig.png", panel=64)
  png = matplotlib.image.imread(tmp_path / "fig.png")
  assert png.shape[:2] == pictures.figure_size(2 * 3, 2, panel=64)[::-1]  # 3 rows an image
  assert list(counts) == ["MaMe tau=0.5", "EViT(keep=0.5)", "DiffRate(schedule)"]
  assert counts["EViT(keep=0.5)"][:, 0].tolist() == [1 + 8 + 1] * 2
  assert counts["DiffRate(schedule)"][:, 1].tolist() == [7, 7]
  # EViT after block 0: the 8 kept tokens (1..8) hold one patch each, the fused
  # token (9, the last) the 8 others: keep + 1 groups, the class token holds none.
  maps, _ = pictures.merge_maps(model, params, images, evit)
  for hard in np.asarray(maps[0].hard):
    assert sorted(set(hard.tolist())) == list(range(1, 10))
    assert (hard == 9).sum() == 8 and all((hard == t).sum() == 1 for t in range(1, 9))
  # DiffRate: 4 patches pruned in block 0, 2 tokens (>= 1 patch each) in block 1 --
  # they belong to no token (-1) and are painted black; the 6 tokens left are groups.
  dmaps, _ = pictures.merge_maps(model, params, images, dr)
  for b, hard in enumerate(np.asarray(dmaps[1].hard)):
    assert (hard == -1).sum() >= 6 and len(set(hard[hard >= 0].tolist())) == 6
    pic = pictures.cluster_image(images[b], hard, (4, 4), size=64)
    p = int(np.flatnonzero(hard == -1)[0])
    np.testing.assert_allclose(pic[16 * (p // 4) + 8, 16 * (p % 4) + 8], 0)


def test_cli_draws_evit_and_rejects_a_diffrate_schedule_for_another_depth(tmp_path, tiny,
                                                                         capsys):
  out = tmp_path / "out.png"
  assert visualize_cli.cli_main(["astronaut", "--layers", "0-1", "--evit", "0.5",
                                 "--evit-layers", "0", "--out", str(out), "--panel", "64"]) == 0
  assert "EViT(keep=0.5)" in capsys.readouterr().out
  assert matplotlib.image.imread(out).shape[:2] == (2 * (64 + pictures.TITLE_PX), 3 * 64)
  # DiffRate's DeiT-S schedule has 12 blocks; the random ViT here has 2.
  assert visualize_cli.cli_main(["astronaut", "--layers", "0-1", "--diffrate",
                                 "deit_small@2.3", "--out", str(tmp_path / "x.png")]) == 2
  assert "12 blocks; the model has 2" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    visualize_cli.cli_main(["astronaut", "--diffrate", "deit_small"])
  assert "--diffrate" in capsys.readouterr().err
