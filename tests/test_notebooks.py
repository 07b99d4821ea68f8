"""The notebooks run end to end, headless and offline (MAME_JAX_OFFLINE=1).

Each notebook runs in its own Jupyter kernel (nbclient + ipykernel, the
``notebooks`` extra), one after another: kernels started side by side from
threads stalled for minutes with jupyter_client 8.10 (about 270 s against 34 s
in turn). Any error in any cell fails its test.
"""

import json
import os
import pathlib
import time

import pytest

try:  # never skipped: without the notebooks extra these tests fail, loudly
  import nbclient
  import nbformat
except ImportError as e:
  raise ImportError(f"{e}: the notebook tests need pip install '.[test,notebooks]'") from e

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NAMES = ("token_clusters", "differentiable_merge", "benchmark", "generation",
         "zero_shot_siglip")
COLAB = "https://colab.research.google.com/github/mame-jax/mame-jax/blob/main/notebooks/{}.ipynb"


def _execute(name, workdir):
  nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
  start = time.perf_counter()
  try:
    nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                            resources={"metadata": {"path": str(workdir)}}).execute()
  except Exception as e:  # pylint: disable=broad-except  # a cell's error, a timeout, a dead kernel
    return nb, e, time.perf_counter() - start
  return nb, None, time.perf_counter() - start


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  """{name: (notebook with outputs, error or None, seconds)}."""
  old = os.environ.get("MAME_JAX_OFFLINE")
  os.environ["MAME_JAX_OFFLINE"] = "1"   # the kernels inherit the environment
  try:
    return {n: _execute(n, tmp_path_factory.mktemp(n)) for n in NAMES}
  finally:
    if old is None:
      os.environ.pop("MAME_JAX_OFFLINE")
    else:
      os.environ["MAME_JAX_OFFLINE"] = old


def _text(nb):
  out = []
  for cell in nb.cells:
    for o in cell.get("outputs", []):
      out.append(o.get("text", "") + o.get("data", {}).get("text/plain", ""))
  return "\n".join(out)


def test_the_three_notebooks_are_there():
  assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_offline_without_an_error(executed, name):
  nb, error, seconds = executed[name]
  assert error is None, f"{name}.ipynb failed:\n{error}"
  assert "randomly initialised" in _text(nb), "the offline fallback must say so"
  print(f"{name}.ipynb: {seconds:.1f} s")


def test_token_clusters_draws_the_figure(executed):
  nb, _, _ = executed["token_clusters"]
  pngs = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
  assert pngs, "Figure 1 is displayed"
  assert "every patch's shares add up to 1: True" in _text(nb)


def test_differentiable_merge_learns_tau_and_checks_the_rule(executed):
  text = _text(executed["differentiable_merge"][0])
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


def test_generation_shows_grids_and_psnr_against_tau(executed):
  nb, _, _ = executed["generation"]
  pngs = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
  assert len(pngs) >= 2, "the sample grids and the PSNR / SSIM curves are displayed"
  text = _text(nb)
  assert "| baseline" in text and "MaMe+MaRe tau=" in text and "ToMe-SD ratio=0.5" in text


def test_zero_shot_siglip_labels_with_and_without_mame(executed):
  nb, _, _ = executed["zero_shot_siglip"]
  text = _text(nb)
  assert "randomly initialised two towers" in text and "SentencePiece model trained here" in text
  assert "probabilities sum to 1: True" in text
  assert "baseline:" in text and "MaMe tau=0.9:" in text and "measured speedup" in text
  pngs = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
  assert pngs, "the image tower's token clusters are displayed"

