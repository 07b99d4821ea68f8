"""The model notebooks (generation, SigLIP zero-shot) run end to end, headless and
offline (tests/notebook_runner.py runs them; a separate file so that the second
pytest worker runs them beside the vision notebooks)."""

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

