"""Executes every notebook in ``notebooks/`` top to bottom; a cell that errors fails the test.

Notebooks run at their small size (``ENTNORM_QUICK=1``) with ``notebooks/`` as the working
directory, in the ``python3`` kernel, which jupyter_client starts with the interpreter running the
tests (``sys.executable``), so the project's environment is used. Outputs are not written back.
"""

from __future__ import annotations

import os
import pathlib

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))
TIMEOUT_S = 300  # per cell; a notebook's quick mode should take well under a minute in all


def run_notebook(path: pathlib.Path, *, quick: bool = True):
  """Executes ``path`` in ``notebooks/`` and returns the executed notebook (raises on error)."""
  nb = nbformat.read(path, as_version=4)
  env_before = os.environ.get("ENTNORM_QUICK")
  os.environ["ENTNORM_QUICK"] = "1" if quick else "0"
  try:
    client = nbclient.NotebookClient(
      nb,
      timeout=TIMEOUT_S,
      kernel_name="python3",
      resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()
  finally:
    if env_before is None:
      os.environ.pop("ENTNORM_QUICK", None)
    else:
      os.environ["ENTNORM_QUICK"] = env_before
  return nb


def test_there_are_notebooks():
  assert any(p.name.startswith("01_") for p in PATHS), f"no notebooks found in {NOTEBOOKS}"


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_notebook_runs(path):
  nb = run_notebook(path)
  ran = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
  assert ran and all(c.get("execution_count") for c in ran), f"{path.name}: a cell did not run"
  errors = [o for c in ran for o in c.get("outputs", []) if o.get("output_type") == "error"]
  assert not errors, f"{path.name}: {errors[0].get('ename')}: {errors[0].get('evalue')}"
