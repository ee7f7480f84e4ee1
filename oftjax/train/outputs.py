"""Run outputs: metrics.jsonl, summary.json (written last, atomically) and the loss plot."""

from __future__ import annotations

import json
import math
import os


def _parse(line: str) -> dict | None:
  """A metrics line, or None for a line torn by a crash mid-write (it is dropped)."""
  try:
    return json.loads(line)
  except json.JSONDecodeError:
    return None


class MetricsLog:
  """Appends one JSON object per logged step; on resume drops lines past the checkpoint."""

  def __init__(self, path: str, resume_step: int | None = None):
    self.path = path
    rows = []
    if resume_step is not None and os.path.exists(path):
      with open(path) as f:
        rows = [_parse(line) for line in f if line.strip()]
      rows = [r for r in rows if r is not None and r["step"] <= resume_step]
    with open(path, "w") as f:
      f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    self.rows = rows

  def append(self, row: dict) -> None:
    clean = {
      k: (float(v) if isinstance(v, float) or hasattr(v, "dtype") else v) for k, v in row.items()
    }
    self.rows.append(clean)
    with open(self.path, "a") as f:
      f.write(json.dumps(clean, sort_keys=True) + "\n")
      f.flush()
      os.fsync(f.fileno())


def plot_loss(rows: list[dict], path: str, title: str) -> None:
  """Saves the training-loss curve as a PNG.

  Uses a bare `Figure` (no pyplot), so it neither needs nor changes the process's
  matplotlib backend (a notebook calling the job keeps its inline plots).
  """
  from matplotlib.figure import Figure

  fig = Figure(figsize=(6, 3.5), dpi=120)
  ax = fig.subplots()
  steps = [r["step"] for r in rows if math.isfinite(r.get("loss", math.nan))]
  ax.plot(steps, [r["loss"] for r in rows if r["step"] in steps], label="train loss")
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
