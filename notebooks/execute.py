"""Runs the ablation notebooks top to bottom, in quick or full mode.

    python notebooks/execute.py --mode full                 # all, outputs written in place
    python notebooks/execute.py --mode quick neumann_terms  # one, outputs discarded

`full` is how the committed outputs are made (`make notebooks`); `quick` is what the
test suite runs. The mode reaches the kernel as `OFTJAX_NOTEBOOK_MODE`. A notebook that
fails leaves its committed file untouched and the command exits 1 naming the cell.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from oftjax import atomic  # noqa: E402

NOTEBOOKS = (
  "neumann_terms",
  "block_size",
  "oft_v1_vs_v2",
  "forgetting",
  "qoft_vs_qlora",
  "block_dropout",
)


def execute(name: str, mode: str, cell_timeout: int = 1800):
  """Executes `notebooks/<name>.ipynb` in `mode`; returns the executed notebook node."""
  notebook = nbformat.read(os.path.join(HERE, f"{name}.ipynb"), as_version=4)
  previous = os.environ.get("OFTJAX_NOTEBOOK_MODE")
  os.environ["OFTJAX_NOTEBOOK_MODE"] = mode  # the kernel inherits this process's environment
  try:
    NotebookClient(
      notebook, timeout=cell_timeout, kernel_name="python3", resources={"metadata": {"path": HERE}}
    ).execute()
  finally:
    if previous is None:
      os.environ.pop("OFTJAX_NOTEBOOK_MODE")
    else:
      os.environ["OFTJAX_NOTEBOOK_MODE"] = previous
  return notebook


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--mode", choices=("quick", "full"), required=True)
  parser.add_argument("names", nargs="*", default=list(NOTEBOOKS), help="notebooks to run")
  args = parser.parse_args(argv)
  unknown = [n for n in args.names if n not in NOTEBOOKS]
  if unknown:
    print(
      f"error: unknown notebook {unknown[0]!r}; choose from {', '.join(NOTEBOOKS)}", file=sys.stderr
    )
    return 2
  for name in args.names:
    t0 = time.time()
    try:
      notebook = execute(name, args.mode)
    except CellExecutionError as e:
      print(
        f"error: {name}.ipynb failed ({str(e).strip().splitlines()[-1]}); file unchanged",
        file=sys.stderr,
      )
      return 1
    if args.mode == "full":  # written whole or not at all
      path = os.path.join(HERE, f"{name}.ipynb")
      with atomic.replace_file(path) as f:
        nbformat.write(notebook, f)
    print(f"{name}: {args.mode} run in {time.time() - t0:.0f}s", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
