"""Source maps and pictures of the vision tokens a language model reads.

A small random CLIP image tower written in the transformers layout
(tests/test_clip.py's writer); MaMe in both blocks, tokens of the last block
(and the penultimate, LLaVA's). The maps must be aligned with the tokens
``vision_tokens`` returns: token ``t`` holds the patches whose ``hard`` label is
``t``, with the class token dropped and padding as ``pad_to`` asks.
"""

import numpy as np
import pytest

import mame_jax
from mame_jax.models import merging
from mame_jax.vis import pictures, sources
from mame_jax.vision_tokens import kept_and_merged, patch_counts, token_sources
from tests.test_clip import ARCHS, smooth_images, write_clip_folder

ARCH = ARCHS["quick_gelu"]                       # 32 px, patch 8: 16 patches
PATCHES = (ARCH["image"] // ARCH["patch"]) ** 2


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  path = tmp_path_factory.mktemp("clip_vision")
  write_clip_folder(path, ARCH, vocab=10, eos_id=1, vision_only=True)
  return path


@pytest.fixture(scope="module")
def images():
  return smooth_images(2, ARCH["image"], seed=3)


def _tower(folder, merge):
  return mame_jax.load_model(str(folder), tower="img", merge=merge)


@pytest.fixture(scope="module")
def runs(folder, images):
  """tokens, sizes, mask and map (class token dropped) of the last block: plain
  (tau=1), MaMe (tau=0.5), ToMe (r=3, whole shares); and the plain ones of the
  penultimate block (LLaVA's) with the class token kept."""
  out = {}
  for name, merge in (("tau1", merging.MergeConfig(tau=1.0, layers=(0, 1))),
                      ("mame", merging.MergeConfig(tau=0.5, layers=(0, 1))),
                      ("tome", merging.ToMeConfig(r=3))):
    model, params = _tower(folder, merge)
    out[name] = mame_jax.vision_tokens(model, params, images, return_sources=True)
    out[name + "_model"] = model, params
  model, params = out["tau1_model"]
  out["tau1_cls"] = mame_jax.vision_tokens(model, params, images, layer=-2,
                                           drop_special=False, return_sources=True)
  return out


def _np(tree):
  return [np.asarray(a) for a in tree]


@pytest.mark.parametrize("name", ["tau1", "mame", "tome"])
def test_hard_labels_index_the_returned_tokens(runs, name):
  tokens, sizes, mask, smap = runs[name]
  tokens, sizes, mask = _np((tokens, sizes, mask))
  hard, soft = np.asarray(smap.hard), np.asarray(smap.soft)
  assert hard.shape == (2, PATCHES) and soft.shape == (2, PATCHES, tokens.shape[1])
  assert smap.num_special == 0 and smap.grid == (4, 4)
  np.testing.assert_array_equal(smap.token_mask, mask)
  for b in range(2):
    real = int(mask[b].sum())
    # Every real token is the largest holder of some patch, and only real tokens are.
    assert sorted(set(hard[b].tolist())) == list(range(real)), (b, hard[b])
    # Token t's patches are those labelled t: it holds the largest share of each.
    np.testing.assert_array_equal(soft[b].argmax(-1), hard[b])
  # The shares held by each token are the sizes vision_tokens tracked itself.
  np.testing.assert_allclose(soft.sum(1), sizes, atol=1e-5)
  assert not soft[~np.broadcast_to(mask[:, None], soft.shape)].any()


def test_map_with_class_token_and_padding(runs, images):
  # Keeping the class token: labels index the sequence with it (patch p is token
  # p + 1), the class token holds no patch.
  _, sizes_cls, mask_cls, with_cls = runs["tau1_cls"]
  np.testing.assert_array_equal(with_cls.hard, np.broadcast_to(np.arange(1, PATCHES + 1),
                                                               (2, PATCHES)))
  assert with_cls.num_special == 1 and mask_cls.shape == (2, PATCHES + 1)
  assert not np.asarray(sizes_cls)[:, 0].any() and not np.asarray(with_cls.soft)[..., 0].any()
  # pad_to: the map grows (or shrinks) with the tokens; labels stay.
  _, _, mask, smap = runs["mame"]
  model, params = runs["mame_model"]
  length = mask.shape[1]
  real = int(np.asarray(mask).sum(-1).max())
  for pad in (length + 3, real):
    padded = token_sources(model, params, images, pad_to=pad)
    assert padded.soft.shape == (2, PATCHES, pad) and padded.token_mask.shape == (2, pad)
    np.testing.assert_array_equal(padded.hard, smap.hard)
    n = min(pad, length)
    np.testing.assert_array_equal(padded.soft[..., :n], np.asarray(smap.soft)[..., :n])
    assert not np.asarray(padded.soft)[..., n:].any()


def test_sizes_are_patch_counts_where_shares_are_whole(runs):
  # tau >= 1: nothing merges, token t is patch t.
  _, sizes, mask, smap = runs["tau1"]
  np.testing.assert_array_equal(smap.hard, np.broadcast_to(np.arange(PATCHES), (2, PATCHES)))
  np.testing.assert_array_equal(patch_counts(smap), sizes)
  np.testing.assert_array_equal(sizes, np.ones((2, PATCHES)))
  # ToMe: every patch wholly in one token, so sizes count the labels.
  _, sizes, mask, smap = runs["tome"]
  assert (np.asarray(sizes).max(-1) > 1).all()
  np.testing.assert_allclose(patch_counts(smap), sizes, atol=1e-6)


@pytest.mark.parametrize("name", ["tau1", "mame", "tome"])
def test_kept_and_merged_add_up(runs, name):
  _, _, mask, smap = runs[name]
  c = {k: np.asarray(v) for k, v in kept_and_merged(smap).items()}
  np.testing.assert_array_equal(c["kept"] + c["merged_patches"] + c["dropped"], PATCHES)
  np.testing.assert_array_equal(c["kept"] + c["merged"], np.asarray(mask).sum(-1))
  if name == "tau1":
    assert (c["kept"] == PATCHES).all() and not c["merged"].any()
  else:
    assert (c["merged"] > 0).all() and (c["merged_patches"] >= 2 * c["merged"]).all()


def test_dropped_patches_counted():
  """A fixed capacity too small for the preserved sources drops tokens: their
  patches have no holder (-1) and the counts still add up (a map by hand: one
  token of three patches, two kept, one patch dropped)."""
  hard = np.array([[0, 0, -1, 1, 0, 2]])
  soft = np.zeros((1, 6, 4), np.float32)
  for p, t in enumerate(hard[0]):
    if t >= 0:
      soft[0, p, t] = 1
  smap = sources.SourceMap(soft=soft, hard=hard, mixing=np.swapaxes(soft, 1, 2),
                           token_mask=np.array([[True, True, True, False]]), grid=(2, 3))
  np.testing.assert_array_equal(patch_counts(smap), [[3, 1, 1, 0]])
  c = {k: np.asarray(v).tolist() for k, v in kept_and_merged(smap).items()}
  assert c == {"kept": [2], "merged": [1], "merged_patches": [3], "dropped": [1]}
  pic = pictures.vision_token_image(np.zeros((4, 6, 3)), hard[0], (2, 3))
  assert pic.shape == (4, 6, 3) and not pic[:2, 4:].any()   # the dropped patch is black


def test_picture_keeps_patches_plain_and_marks_merges(runs, images):
  size = 48
  plain = pictures.vision_token_image(images[0], runs["tau1"][3].hard[0], (4, 4), size=size)
  merged_map = runs["mame"][3]
  merged = pictures.vision_token_image(images[0], merged_map.hard[0], (4, 4), size=size)
  for pic in (plain, merged):
    assert pic.shape == (size, size, 3) and pic.dtype == np.float32
    assert 0 <= pic.min() and pic.max() <= 1
  photo = (images[0][np.arange(size) * 32 // size][:, np.arange(size) * 32 // size] + 1) / 2
  np.testing.assert_allclose(plain, photo, atol=1e-6)   # nothing merged: the photograph
  assert np.abs(merged - plain).max() > 0.1
  # Kept patches stay the photograph (away from the outlines of merged neighbours).
  hard = np.asarray(merged_map.hard[0])
  counts = np.bincount(hard)
  cell = size // 4
  for p in np.flatnonzero(counts[hard] == 1):
    y, x = divmod(int(p), 4)
    inner = np.s_[y * cell + 1:(y + 1) * cell - 1, x * cell + 1:(x + 1) * cell - 1]
    np.testing.assert_allclose(merged[inner], photo[inner], atol=1e-6)
  for p in np.flatnonzero(counts[hard] > 1):
    y, x = divmod(int(p), 4)
    inner = np.s_[y * cell + 1:(y + 1) * cell - 1, x * cell + 1:(x + 1) * cell - 1]
    assert np.abs(merged[inner] - photo[inner]).max() > 1e-3


def test_figure_size_and_titles(runs, images, tmp_path):
  rows = [("tau=1", runs["tau1"][3]), ("MaMe tau=0.5", runs["mame"][3])]
  out = tmp_path / "tokens.png"
  fig = pictures.vision_token_figure(images, rows, names=["a", "b"], out_path=out, panel=64)
  fig.canvas.draw()
  rgba = np.asarray(fig.canvas.buffer_rgba())
  width, height = pictures.figure_size(2, 2, 64)
  assert rgba.shape == (height, width, 4) and out.stat().st_size > 0
  titles = [ax.get_title() for ax in fig.axes]
  n = int(np.asarray(runs["mame"][2]).sum(-1)[1])
  assert titles[:3] == ["a", f"tau=1: {PATCHES} -> {PATCHES} tokens",
                        f"MaMe tau=0.5: {PATCHES} -> {int(runs['mame'][2][0].sum())} tokens"]
  assert titles[-1] == f"MaMe tau=0.5: {PATCHES} -> {n} tokens" and n < PATCHES
