"""The vision notebooks run end to end, headless and offline; every committed
notebook is stripped and opens in Colab (tests/notebook_runner.py runs them)."""

import json

import nbformat
import pytest

from tests.notebook_runner import (COLAB, NAMES, NOTEBOOKS, VISION, check_ran_offline,
                                   execute_offline, images_of, text_of)


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  return execute_offline(VISION, tmp_path_factory)


def test_every_notebook_is_tested():
  assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)


@pytest.mark.parametrize("name", VISION)
def test_notebook_runs_offline_without_an_error(executed, name):
  check_ran_offline(executed, name)


def test_token_clusters_draws_the_figure(executed):
  nb, _, _ = executed["token_clusters"]
  assert images_of(nb), "Figure 1 is displayed"
  assert "every patch's shares add up to 1: True" in text_of(nb)


def test_differentiable_merge_learns_tau_and_checks_the_rule(executed):
  text = text_of(executed["differentiable_merge"][0])
  assert "the rule gives the op's count for every tau: True" in text
  assert "learned tau" in text


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_is_stripped_and_opens_in_colab(name):
  raw = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())
  nb = nbformat.reads(json.dumps(raw), as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, "outputs must be stripped"
  assert COLAB.format(name) in nb.cells[0].source
  install = nb.cells[1].source
  assert "import mame_jax" in install and "except ImportError" in install and "%pip install" in install
  assert "pretrained_or_random" in nb.cells[3].source
