"""The model notebooks (generation, SigLIP zero-shot, vision tokens) run end to end, headless and
offline (tests/notebook_runner.py runs them; a separate file so that the second
pytest worker runs them beside the vision notebooks)."""

import re

import pytest

from tests.notebook_runner import MODELS, check_ran_offline, execute_offline, images_of, text_of


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  return execute_offline(MODELS, tmp_path_factory)


@pytest.mark.parametrize("name", MODELS)
def test_notebook_runs_offline_without_an_error(executed, name):
  check_ran_offline(executed, name)


def test_generation_shows_grids_and_psnr_against_tau(executed):
  nb, _, _ = executed["generation"]
  assert len(images_of(nb)) >= 2, "the sample grids and the PSNR / SSIM curves are displayed"
  text = text_of(nb)
  assert "| baseline" in text and "MaMe+MaRe tau=" in text and "ToMe-SD ratio=0.5" in text


def test_zero_shot_siglip_labels_with_and_without_mame(executed):
  nb, _, _ = executed["zero_shot_siglip"]
  text = text_of(nb)
  assert "randomly initialised two towers" in text and "SentencePiece model trained here" in text
  assert "probabilities sum to 1: True" in text
  assert "baseline:" in text and "MaMe tau=0.9:" in text and "measured speedup" in text
  assert images_of(nb), "the image tower's token clusters are displayed"



def test_vision_tokens_counts_both_runs_and_draws_the_tokens(executed):
  nb, _, _ = executed["vision_tokens"]
  text = text_of(nb)
  assert "randomly initialised CLIP-shaped ViT" in text
  assert "baseline: 256 -> 256 tokens" in text, "the plain encoder keeps every patch"
  merged = re.search(r"MaMe tau=0\.8: 256 -> (\d+) tokens", text)
  assert merged and int(merged.group(1)) < 256, "MaMe's token count is printed"
  kept = re.search(r"(\d+) tokens kept \(one patch each\), (\d+) patches merged into (\d+) "
                   r"tokens", text)
  assert kept and int(kept.group(1)) + int(kept.group(2)) == 256
  assert int(kept.group(1)) + int(kept.group(3)) == int(merged.group(1))
  assert "encoder speedup with MaMe" in text
  assert images_of(nb), "the kept and merged tokens are drawn"


def test_dense_saliency_restores_three_ways_and_draws_the_maps(executed):
  nb, _, _ = executed["dense_saliency"]
  text = text_of(nb)
  assert "randomly initialised saliency model" in text
  for way in ("MaRe before the norm", "copy-back", "MaRe after the norm"):
    assert re.search(rf"{way} +tokens after block \d+: \[\d+, \d+, \d+\]  r per image: "
                     r"-?\d\.\d{3}, -?\d\.\d{3}, -?\d\.\d{3}", text), way
  assert images_of(nb), "the maps are displayed side by side"
