"""Figures the docs quote from test measurements: committed JSON under `experiments/results/`.

A test measures a figure and calls `check`: the measurement must equal the committed
value, so the README and RELIABILITY.md, whose numbers `experiments/render_docs.py`
generates from these files, say what the test measures. A figure that depends on the
machine's speed (where a timed kill lands) goes through `record` instead, which only
writes. With `OFTJAX_RECORD_RESULTS=1` every test writes its measurement into the file,
e.g.

    OFTJAX_RECORD_RESULTS=1 python -m pytest -q tests/test_quant.py -k stored_bytes
    python experiments/render_docs.py
"""

from __future__ import annotations

import json
import math
import os
import re

from oftjax import atomic

RESULTS = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "results"
)
RECORD = os.environ.get("OFTJAX_RECORD_RESULTS") == "1"


def path_of(name: str) -> str:
  return os.path.join(RESULTS, f"{name}.json")


def load(name: str) -> dict:
  """The committed `experiments/results/<name>.json`."""
  with open(path_of(name)) as f:
    return json.load(f)


def _close(got, want, rel_tol: float) -> bool:
  if isinstance(want, dict):
    return (
      isinstance(got, dict)
      and got.keys() == want.keys()
      and all(_close(got[k], want[k], rel_tol) for k in want)
    )
  if isinstance(want, list):
    return (
      isinstance(got, list)
      and len(got) == len(want)
      and all(_close(g, w, rel_tol) for g, w in zip(got, want))
    )
  if isinstance(want, float) and isinstance(got, (int, float)):
    return math.isclose(got, want, rel_tol=rel_tol, abs_tol=0.0)
  return got == want


def as_quoted(message: str) -> str:
  """A message as the docs quote it, without what changes from run to run: orbax's
  hash-named data files and their sizes (`…/d/… is N bytes, expected M`) and library error
  details (`(NOT_FOUND: …)`)."""
  message = re.sub(r"/[0-9a-f]{8,}", "/…", message)
  message = re.sub(r"is \d+ bytes, expected \d+", "is N bytes, expected M", message)
  return re.sub(r"\(([A-Z][A-Z_]{3,}): .*\)(?=; )", r"(\1: …)", message)


def _write(name: str, key: str, value) -> None:
  try:
    data = load(name)
  except FileNotFoundError:
    data = {}
  data[key] = value
  os.makedirs(RESULTS, exist_ok=True)
  atomic.write_json(path_of(name), data, indent=1, sort_keys=True, trailing_newline=True)


def record(name: str, key: str, value) -> None:
  """Records `value` (with `OFTJAX_RECORD_RESULTS=1` only) for a figure that depends on
  the machine's speed, such as where a timed kill lands; nothing to compare it with."""
  if RECORD:
    _write(name, key, json.loads(json.dumps(value)))


def check(name: str, key: str, value, rel_tol: float = 0.0) -> None:
  """Asserts `value` equals entry `key` of results file `name` (or records it).

  Args:
    name: results file stem under `experiments/results/`.
    key: the entry (one per measurement, e.g. a parametrized case).
    value: the measured figure (JSON-serialisable); compared exactly unless `rel_tol`.
    rel_tol: relative tolerance for floats (for figures that depend on the machine).
  """
  value = json.loads(json.dumps(value))  # what a round trip through the file gives
  if RECORD:
    _write(name, key, value)
    return
  want = load(name).get(key)
  assert want is not None and _close(value, want, rel_tol), (
    f"measured {key}={value} but experiments/results/{name}.json holds {want}; if the change "
    f"is intended, rerun with OFTJAX_RECORD_RESULTS=1 and then experiments/render_docs.py"
  )
