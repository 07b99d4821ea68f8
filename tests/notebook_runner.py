"""Runs the notebooks headless and offline (MAME_JAX_OFFLINE=1) for the notebook
tests (tests/test_notebooks.py and tests/test_notebooks_models.py).

Each notebook runs in its own Jupyter kernel (nbclient + ipykernel, the
``notebooks`` extra). Within a test file they run one after another: kernels
started side by side from threads stalled for minutes with jupyter_client 8.10
(about 270 s against 34 s in turn). The notebooks are split over two test files
so that pytest's two workers (``--dist loadfile``) run the two halves at once,
each in its own process.
"""

import os
import pathlib
import time

try:  # never skipped: without the notebooks extra these tests fail, loudly
  import nbclient
  import nbformat
except ImportError as e:
  raise ImportError(f"{e}: the notebook tests need pip install '.[test,notebooks]'") from e

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
# Every notebook, by the test file that executes it.
VISION = ("token_clusters", "differentiable_merge", "benchmark")
MODELS = ("generation", "zero_shot_siglip", "vision_tokens", "dense_saliency")
NAMES = VISION + MODELS
COLAB = "https://colab.research.google.com/github/mame-jax/mame-jax/blob/main/notebooks/{}.ipynb"


def execute(name, workdir):
  """``(notebook with outputs, error or None, seconds)``."""
  nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
  start = time.perf_counter()
  try:
    nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                            resources={"metadata": {"path": str(workdir)}}).execute()
  except Exception as e:  # pylint: disable=broad-except  # a cell's error, a timeout, a dead kernel
    return nb, e, time.perf_counter() - start
  return nb, None, time.perf_counter() - start


def execute_offline(names, tmp_path_factory):
  """``{name: execute(name, ...)}`` with ``MAME_JAX_OFFLINE=1`` (the kernels
  inherit the environment)."""
  old = os.environ.get("MAME_JAX_OFFLINE")
  os.environ["MAME_JAX_OFFLINE"] = "1"
  try:
    return {n: execute(n, tmp_path_factory.mktemp(n)) for n in names}
  finally:
    if old is None:
      os.environ.pop("MAME_JAX_OFFLINE")
    else:
      os.environ["MAME_JAX_OFFLINE"] = old


def text_of(nb):
  out = []
  for cell in nb.cells:
    for o in cell.get("outputs", []):
      out.append(o.get("text", "") + o.get("data", {}).get("text/plain", ""))
  return "\n".join(out)


def images_of(nb):
  return [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]


def check_ran_offline(executed, name):
  nb, error, seconds = executed[name]
  assert error is None, f"{name}.ipynb failed:\n{error}"
  assert "randomly initialised" in text_of(nb), "the offline fallback must say so"
  print(f"{name}.ipynb: {seconds:.1f} s")
