"""Specification of mame_jax.eval.video and the video paths of the eval loop, the
CLI and the source maps: videos the test encodes itself with PyAV decode into
the frames VideoMAE's test-time rule picks (an independent transcription of it
below), a corrupt file and a too-short video are counted and reported without
stopping the run, ``mame-jax eval`` runs a tiny VideoMAE folder end to end,
the source maps of a video keep every tubelet's shares adding up to one, and
``mame-jax visualize --video`` draws them as strips (refusing an image model)."""

import json

import jax
import numpy as np
import pytest

from mame_jax.cli import eval as eval_cli
from mame_jax.eval import data as data_lib
from mame_jax.eval import loop, report, video
from mame_jax.models import videomae
from mame_jax.models.merging import MergeConfig, ToMeConfig
from mame_jax.vis import pictures, sources

FRAMES, TUBELET, SIZE, PATCH = 4, 2, 32, 8
SAMPLING = video.Sampling(num_frames=FRAMES, stride=2, size=SIZE)


# ----------------------------------------------------------------------------
# The reference rule, transcribed (VideoMAE's VideoClsDataset, mode="test")


def reference_views(num_video_frames, clip_len, stride, segments, crops, long_side, short):
  """Dense indices padded with the last one; then per (segment, crop) the
  temporal start int(k * step_t) and spatial start int(j * step_s)."""
  index = [x for x in range(0, num_video_frames, stride)]
  while len(index) < clip_len:
    index.append(index[-1])
  step_s = 1.0 * (long_side - short) / (crops - 1)
  step_t = max(1.0 * (len(index) - clip_len) / (segments - 1), 0)
  return index, [(int(k * step_t), int(j * step_s)) for k in range(segments)
                 for j in range(crops)]


@pytest.mark.parametrize("n,clip,stride,segments,crops,long_side", [
    (300, 16, 4, 5, 3, 298), (40, 16, 4, 5, 3, 224), (7, 16, 4, 2, 2, 300), (64, 16, 4, 3, 3, 225)])
def test_frame_indices_and_view_starts_follow_the_reference(n, clip, stride, segments, crops,
                                                            long_side):
  index, views = reference_views(n, clip, stride, segments, crops, long_side, 224)
  assert video.frame_indices(n, clip, stride).tolist() == index
  got = [(t, s) for t in video.view_starts(len(index), clip, segments)
         for s in video.view_starts(long_side, 224, crops)]
  assert got == views
  # One view is the centred one (the reference divides by zero there).
  assert video.view_starts(20, 16, 1) == [2] and video.view_starts(10, 16, 1) == [0]


def test_sampling_cuts_the_reference_clips_and_crops_out_of_the_frames():
  # 12 sampled frames of 8 x 20 px already at the short side: frame f, column c
  # holds f * 20 + c, so every output pixel names its frame and column.
  f, c = np.meshgrid(np.arange(12), np.arange(20), indexing="ij")
  frames = np.broadcast_to((f * 20 + c)[:, None, :, None], (12, 8, 20, 3)).astype(np.uint8)
  s = video.Sampling(num_frames=4, stride=1, size=8, clips=3, crops=2)
  out = s.preprocess(frames)
  assert out.shape == (6, 4, 8, 8, 3) and out.dtype == np.float32
  _, views = reference_views(12, 4, 1, 3, 2, 20, 8)
  for v, (t0, x0) in enumerate(views):
    want = frames[t0:t0 + 4, :, x0:x0 + 8].astype(np.float32) / 127.5 - 1
    np.testing.assert_array_equal(out[v], want)
  # Resizing: the short side to `size`, the long side truncated, then one centred crop.
  one = video.Sampling(num_frames=4, stride=1, size=16).preprocess(frames)
  assert one.shape == (4, 16, 16, 3) and video.resized_shape(8, 20, 16) == (16, 40)
  assert np.all(one >= -1) and np.all(one <= 1)


# ----------------------------------------------------------------------------
# Files decoded with PyAV


def grey_video(n, h=32, w=48, step=12):
  """Frame i is a flat grey of level 10 + step * i (clear after lossy coding)."""
  levels = (10 + step * np.arange(n)) % 250
  return np.broadcast_to(levels[:, None, None, None], (n, h, w, 3)).astype(np.uint8)


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory):
  """Two classes of short videos, a corrupt file and a too-short video."""
  root = tmp_path_factory.mktemp("videos")
  for name, n in (("a", 9), ("b", 12)):
    (root / name).mkdir()
    video.encode(root / name / "v0.mp4", grey_video(n))
    video.encode(root / name / "v1.mp4", grey_video(n, step=9)[::-1])
  (root / "a" / "broken.mp4").write_bytes(b"\x00\x01 not a video" * 50)
  video.encode(root / "b" / "short.mp4", grey_video(2))
  (root / "b" / "notes.txt").write_text("not a video: ignored")
  return root


def test_decoded_frames_are_the_every_stride_th_ones(video_folder):
  frames, count = video.decode(video_folder / "b" / "v0.mp4", stride=4)
  assert count == 12 and frames.shape == (3, 32, 48, 3) and frames.dtype == np.uint8
  every, count = video.decode(video_folder / "b" / "v0.mp4")
  assert count == 12 and every.shape == (12, 32, 48, 3)
  np.testing.assert_array_equal(frames, every[::4])
  # The greys come back in order (lossy coding moves them a little).
  np.testing.assert_allclose(every.mean((1, 2, 3)), 10 + 12 * np.arange(12), atol=12)
  assert np.all(np.diff(every.mean((1, 2, 3))) > 0)


def test_the_folder_source_counts_corrupt_and_too_short_videos(video_folder):
  source = video.load_source(str(video_folder), SAMPLING)
  assert len(source) == 6 and source.label_names == ("a", "b")
  loader = data_lib.Loader(source, SAMPLING.preprocess, 4, warn=False, workers=2)
  batches = list(loader)
  rows = np.concatenate([b.images[b.valid] for b in batches])
  labels = np.concatenate([b.labels[b.valid] for b in batches])
  assert rows.shape == (4, FRAMES, SIZE, SIZE, 3) and labels.tolist() == [0, 0, 1, 1]
  names = sorted(n.rsplit("/", 1)[-1] for n, _ in loader.corrupt)
  assert names == ["broken.mp4", "short.mp4"]
  assert video.count_problems(loader.corrupt) == {"corrupt_files": 1, "too_short": 1}
  # a/v0 (9 frames of 32 x 48): frames 0, 2, 4, 6, the centred 32 x 32 crop.
  every, _ = video.decode(video_folder / "a" / "v0.mp4")
  want = every[[0, 2, 4, 6], :, 8:40].astype(np.float32) / 127.5 - 1
  np.testing.assert_array_equal(rows[0], want)
  # min_frames=1 keeps the 2-frame video: frame 0 and then its last sampled frame
  # (frame 0 again: stride 2) repeated.
  short = video.Sampling(num_frames=FRAMES, stride=2, size=SIZE, min_frames=1)
  path = video_folder / "b" / "short.mp4"
  clip = short.preprocess(video.folder_source(video_folder, short).fetch((str(path), 0))[0])
  first = video.decode(path)[0][0, :, 8:40].astype(np.float32) / 127.5 - 1
  np.testing.assert_array_equal(clip, np.broadcast_to(first, clip.shape))


def test_a_tfds_video_dataset_is_read_through_data_source(monkeypatch):
  import tensorflow_datasets as tfds

  class Fake(list):  # what tfds.data_source returns: indexable examples + info
    dataset_info = type("Info", (), {"features": {"label": type(
        "L", (), {"names": ["x", "y"]})()}})()
  examples = Fake([{"video": grey_video(8, 24, 24), "label": 1},
                   {"video": grey_video(1, 24, 24), "label": 0}])
  asked = {}

  def data_source(name, split, data_dir, download):
    asked.update(name=name, split=split, download=download)
    return examples
  monkeypatch.setattr(tfds, "data_source", data_source)
  source = video.load_source("ucf101", SAMPLING)
  assert asked == {"name": "ucf101", "split": "test", "download": False}
  frames, label = source.fetch(0)
  assert label == 1 and frames.shape == (FRAMES, 24, 24, 3)
  np.testing.assert_allclose(frames.mean((1, 2, 3)), [10, 34, 58, 82], atol=1)
  with pytest.raises(video.TooShortVideo, match="1 frames"):
    source.fetch(1)
  assert source.label_names == ("x", "y")


# ----------------------------------------------------------------------------
# Evaluation end to end


@pytest.fixture(scope="module")
def tiny_videomae(tmp_path_factory):
  model = videomae.Model(2, width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=PATCH,
                         tubelet_size=TUBELET, image_size=SIZE, num_frames=FRAMES)
  x = np.zeros((1, FRAMES, SIZE, SIZE, 3), np.float32)
  # Random weights from the shapes alone: nothing to compile.
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: rng.normal(0, 0.3, a.shape).astype(np.float32), shapes)
  folder = videomae.save_transformers(params, tmp_path_factory.mktemp("vmae") / "m", model)
  return model, params, folder


def test_mame_jax_eval_runs_a_videomae_folder_on_a_video_folder(tiny_videomae, video_folder,
                                                               tmp_path, capsys):
  _, _, folder = tiny_videomae
  out = tmp_path / "r.json"
  rc = eval_cli.cli_main([
      "--checkpoint", str(folder), "--data", str(video_folder), "--tau", "0.9",
      "--tome-r", "4", "--runs", "1", "--warmup", "0", "--batch-size", "4",
      "--no-progress", "--json", str(out), "--config.video.stride=2"])
  assert rc == 0
  text = capsys.readouterr().out
  assert "videos/s" in text and "1 too short" in text and "1 corrupt" in text
  result = json.loads(out.read_text())
  assert result["unit"] == "videos" and result["num_images"] == 4
  assert (result["num_too_short"], result["num_corrupt_files"]) == (1, 1)
  assert result["sampling"]["num_frames"] == FRAMES and result["sampling"]["stride"] == 2
  names = [r["name"] for r in result["rows"]]
  assert names == ["baseline", "MaMe(tau=0.9)", "ToMe(r=4)"]
  base, _, tome = result["rows"]
  assert base["tokens_per_layer"] == [32.0, 32.0]          # 2 x 4 x 4 tubelets
  assert tome["tokens_per_layer"] == [28.0, 24.0]
  for row in result["rows"]:
    assert row["videos_per_s"] > 0 and row["gflops_per_image"] > 0
    assert row["top1"] is not None and row["ideal_speedup"] > 0
  assert tome["ideal_speedup"] > 1


def test_several_views_average_their_softmax(tiny_videomae, video_folder):
  model, params, _ = tiny_videomae
  s = {"stride": 2, "clips": 2, "crops": 2, "min_frames": 1}
  result = loop.evaluate(model, params, str(video_folder / "a"), taus=(), batch_size=2,
                         runs=1, warmup=0, progress=False, sampling=s)
  assert result["views"] == 4 and result["num_images"] == 2 and result["num_corrupt"] == 1
  sampling = video.Sampling(**{"num_frames": FRAMES, "size": SIZE, **s})
  source = video.load_source(str(video_folder / "a"), sampling)
  x = np.stack([sampling.preprocess(source.fetch(r)[0]) for r in source.records()
                if not r[0].endswith("broken.mp4")])
  logits, _ = jax.jit(model.apply)({"params": params}, x.reshape(-1, *x.shape[2:]))
  want = video.average_views(np.asarray(logits), 4).argmax(-1)
  np.testing.assert_array_equal(result["predictions"]["baseline"], want)
  assert "2 clip(s) x 2 crop(s)" in report.format_report(result)


# ----------------------------------------------------------------------------
# Source maps and pictures


def test_video_source_maps_sum_to_one_per_tubelet_and_draw_as_strips(tiny_videomae, tmp_path):
  model, params, _ = tiny_videomae
  clip = np.random.default_rng(0).uniform(-1, 1, (1, FRAMES, SIZE, SIZE, 3)).astype(np.float32)
  # The configs draw_video uses below: its programs are then the cached ones.
  for merge in (MergeConfig(tau=0.5, layers=(0, 1)), ToMeConfig(r=6, layers=(0, 1))):
    maps, aux = pictures.merge_maps(model, params, clip, merge)
    assert len(maps) == 2 and maps[0].grid == (2, 4, 4)
    for smap, n in zip(maps, np.asarray(aux["tokens_per_block"])[0]):
      np.testing.assert_allclose(np.asarray(smap.soft).sum(-1), 1.0, atol=1e-5)
      assert int(smap.num_groups[0]) == n == int(smap.num_tokens[0])
  assert int(maps[-1].num_tokens[0]) == 20                  # ToMe: 32 -> 26 -> 20
  strip = pictures.video_strip(clip[0], np.asarray(maps[1].hard[0]), (2, 4, 4), size=40)
  assert strip.shape == (40, 80, 3)
  fig, counts = pictures.draw_video(model, params, clip[0], tau=0.5, layers=(0, 1),
                                    tome_r=6, out_path=tmp_path / "v.png", panel=40)
  assert list(counts) == ["MaMe tau=0.5", "ToMe r=6"]
  assert counts["ToMe r=6"].tolist() == [[26, 20]]
  assert tuple(fig.canvas.get_width_height()) == (80, 5 * (40 + pictures.TITLE_PX))
  assert (tmp_path / "v.png").stat().st_size > 0
  with pytest.raises(ValueError, match="grid"):
    pictures.video_figure(clip[0], [("x", [sources.identity_map(1, 4)])], [0])


# ----------------------------------------------------------------------------
# mame-jax visualize --video


def test_mame_jax_visualize_draws_a_video_as_strips_and_refuses_a_mismatch(
    tiny_videomae, video_folder, tmp_path, capsys):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from mame_jax.cli import visualize  # pylint: disable=import-outside-toplevel
  model, _, folder = tiny_videomae
  clip = video_folder / "a" / "v0.mp4"  # 9 frames of 32 x 48
  # The clip is the evaluation's: every 4th frame (0, 4, 8, then 8 again), the
  # centred 32 x 32 crop.
  every, _ = video.decode(clip)
  want = every[[0, 4, 8, 8], :, 8:40].astype(np.float32) / 127.5 - 1
  np.testing.assert_array_equal(visualize.read_video(clip, model), want)
  out = tmp_path / "strip.png"
  # The settings of the source-map test above: its compiled programs serve.
  rc = visualize.cli_main(["--checkpoint", str(folder), "--video", str(clip), "--tau", "0.5",
                           "--tome-r", "6", "--layers", "0,1", "--panel", "40",
                           "--out", str(out)])
  text = capsys.readouterr()
  assert rc == 0, text.err
  assert "MaMe tau=0.5" in text.out and "ToMe r=6" in text.out and f"wrote {out}" in text.out
  assert "tokens after blocks 0-1: 26 20" in text.out            # ToMe: 32 -> 26 -> 20
  with Image.open(out) as im:                # 2 tubelets x 40 px; frames + 2 x 2 strips
    assert im.size == (80, 5 * (40 + pictures.TITLE_PX))
  # A video for an image model, images for a video model, both at once.
  assert visualize.cli_main(["--video", str(clip), "--out", str(tmp_path / "x.png")]) == 2
  assert "--video needs a video model" in capsys.readouterr().err
  assert visualize.cli_main(["--checkpoint", str(folder), "astronaut",
                             "--out", str(tmp_path / "y.png")]) == 2
  assert "is a video model (VideoMAE): pass --video FILE" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:
    visualize.parse(["astronaut", "--video", str(clip)])
  assert e.value.code == 2 and "not both" in capsys.readouterr().err
  assert visualize.cli_main(["--checkpoint", str(folder), "--video",
                             str(video_folder / "a" / "broken.mp4"),
                             "--out", str(tmp_path / "z.png")]) == 2
  assert "PyAV cannot decode it" in capsys.readouterr().err
  assert not any((tmp_path / n).exists() for n in ("x.png", "y.png", "z.png"))


def test_the_throughput_section_times_each_tome_r_once_and_says_when_mame_merged_nothing(
    tmp_path):
  from benchmarks import video_throughput  # pylint: disable=import-outside-toplevel
  committed = json.loads(open(video_throughput.JSON).read())
  seen = [(r["batch"], r["method"]) for r in committed["rows"]]
  assert len(seen) == len(set(seen))  # one row per distinct ToMe r
  assert all(isinstance(r["matches_tau"], list) for r in committed["rows"] if "r" in r)

  def row(batch, method, left, **kw):
    return dict(model="VideoMAE-S-sized", batch=batch, method=method, tokens=1568,
                tokens_per_layer=[1568.0, left], videos_per_s=1.0, gflops_per_video=100.0,
                measured_speedup=1.0, ideal_speedup=1.0, measured_over_ideal=1.0, **kw)
  run = dict(command="python -m benchmarks.video_throughput", device="cpu", date="2026-12-01",
             dtype="float32", rows=[row(1, "mame 0.9", 900.0, tau=0.9),
                                    row(8, "mame 0.9", 1560.0, tau=0.9),
                                    row(8, "tome 0", 1568.0, r=0, matches_tau=[0.9])])
  path = tmp_path / "video.json"
  path.write_text(json.dumps(run))
  text = "\n".join(video_throughput.section(str(path)))
  assert "batch 8 mame 0.9: merged almost nothing (1560 of 1568 tokens left)" in text
  assert "batch 1 mame 0.9: merged" not in text and "No GPU figures yet" in text
