"""The ablation notebooks: each runs top to bottom in quick mode, and the committed files hold
the outputs of a full run (its mode line, the plots, a finding, no errors)."""

from __future__ import annotations

import os
import sys

import nbformat
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "notebooks"))
import execute


def _outputs(notebook):
  for cell in notebook.cells:
    if cell.cell_type == "code":
      yield from cell.get("outputs", [])


def _text(notebook) -> str:
  return "".join(o.get("text", "") for o in _outputs(notebook) if o.output_type == "stream")


def _images(notebook) -> int:
  return sum("image/png" in o.get("data", {}) for o in _outputs(notebook))


@pytest.mark.parametrize("name", execute.NOTEBOOKS)
def test_committed_notebook_holds_a_full_run(name):
  notebook = nbformat.read(os.path.join(execute.HERE, f"{name}.ipynb"), as_version=4)
  code = [c for c in notebook.cells if c.cell_type == "code"]
  assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), (
    "not run top to bottom in one kernel"
  )
  assert not [o for o in _outputs(notebook) if o.output_type == "error"]
  text = _text(notebook)
  assert "mode: full" in text and "mode: quick" not in text
  assert "FINDING:" in text
  assert _images(notebook) >= 1


@pytest.mark.slow
@pytest.mark.parametrize("name", execute.NOTEBOOKS)
def test_notebook_runs_in_quick_mode(name):
  notebook = execute.execute(name, "quick", cell_timeout=300)
  text = _text(notebook)
  assert "mode: quick" in text and "FINDING:" in text
  assert _images(notebook) >= 1
