"""`import oftjax` stays light: the library core pulls in no optional or heavy dependency."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("transformers", "torch", "matplotlib", "qwix", "datasets", "pyarrow")


def _imported_after(statement: str) -> list[str]:
  """Which of `HEAVY` a fresh interpreter holds in `sys.modules` after `statement`."""
  code = f"{statement}; import sys; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  return proc.stdout.split()


def test_import_oftjax_pulls_in_no_transformers_torch_matplotlib_or_qwix():
  assert _imported_after("import oftjax") == []
  assert _imported_after("import oftjax.quant") == ["qwix"]  # the check sees an import


def test_import_of_the_data_pipeline_pulls_in_no_datasets_or_pyarrow():
  assert _imported_after("import oftjax.data") == []  # Parquet and datasets load lazily
