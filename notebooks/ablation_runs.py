"""Finetuning runs for the ablation notebooks: one call per run, results as flat rows.

Every notebook reads its mode from `OFTJAX_NOTEBOOK_MODE` (`quick` in the test suite,
`full` for the committed outputs; see `notebooks/execute.py`) and sizes its sweep with
`pick`. `finetune` runs the real job (`oftjax.train.run`, the code behind
`experiments/finetune_gemma.py`) on the shipped tiny Gemma 3 and task, in a temporary
folder, silently, and returns what the ablations compare: task accuracy gained, retention
(what the base model already did) kept, step time, memory, adapter health and the per-step
curves.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile

# The job's shipped defaults (tiny Gemma 3, the task), as experiments/finetune_gemma.py sets them.
os.environ.setdefault(
  "OFTJAX_ASSETS",
  os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "assets"
  ),
)
MODE = os.environ.get("OFTJAX_NOTEBOOK_MODE", "full")
if MODE not in ("quick", "full"):
  raise ValueError(f"OFTJAX_NOTEBOOK_MODE must be quick or full (got {MODE!r})")


def pick(quick, full):
  """`quick` in the test suite's quick mode, `full` for the committed run."""
  return quick if MODE == "quick" else full


_CACHE: dict = {}


def finetune(**overrides) -> dict:
  """Runs one finetuning job with `RunConfig` fields `overrides`; returns a flat row.

  Defaults are the shipped job's, except: metrics every step (curves and spikes), one
  checkpoint at the end, and an eval set of 32 (quick) or 200 (full) examples. The row
  holds the config fields that were overridden, `accuracy`/`retention` before and after,
  `eval_loss`, `trainable_params`, `step_time_s`, `frozen_weight_bytes`, the last
  `max_q_norm`/`orthogonality_error` (OFT) and `curve`: the metrics rows. Identical
  calls in one kernel return the cached row.
  """
  from oftjax.train.config import RunConfig, finalize
  from oftjax.train.run import run

  key = json.dumps(overrides, sort_keys=True)
  if key in _CACHE:
    return _CACHE[key]
  settings = {"log_every": 1, "eval_limit": pick(32, 200), "keep_checkpoints": 1, **overrides}
  settings.setdefault("save_every", settings.get("steps", RunConfig.steps))
  out = tempfile.mkdtemp(prefix="oftjax_ablation_")
  config = finalize(RunConfig(**settings, output_dir=out, overwrite=True))
  try:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
      summary = run(config)
    with open(os.path.join(out, "metrics.jsonl")) as f:
      curve = [json.loads(line) for line in f]
  finally:
    shutil.rmtree(out, ignore_errors=True)
  last = curve[-1] if curve else {}
  row = {
    **overrides,
    "accuracy_before": summary["eval_before"]["accuracy"],
    "accuracy": summary["eval_after"]["accuracy"],
    "retention_before": summary.get("retention_before"),
    "retention": summary.get("retention_after"),
    "eval_loss": summary["eval_after"]["loss"],
    "trainable_params": summary["trainable_params"],
    "step_time_s": summary["step_time_s"],
    "frozen_weight_bytes": summary["frozen_weight_bytes"],
    "adapter_bytes": summary["adapter_bytes"],
    "skipped_steps": summary["skipped_steps"],
    "max_q_norm": last.get("max_q_norm"),
    "orthogonality_error": last.get("orthogonality_error"),
    "curve": curve,
  }
  _CACHE[key] = row
  return row


def table(rows: list[dict], columns: list[str]):
  """The `columns` of `rows` as a pandas-free text table (notebook outputs stay small)."""

  def fmt(v):
    if isinstance(v, float):
      return f"{v:.4g}"
    return str(v)

  cells = [[fmt(r.get(c)) for c in columns] for r in rows]
  widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(columns)]
  lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
  lines += ["  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in cells]
  print("\n".join(lines))


def finding(text: str) -> None:
  """Prints the notebook's conclusion, with its numbers, as one `FINDING:` line.

  The committed notebooks are checked for it (`tests/test_notebooks.py`).
  """
  print("FINDING:", text)
