"""Run outputs: the loss plot (metrics.jsonl is written by `sinks.MetricsLog`)."""

from __future__ import annotations

import math

from oftjax.train.sinks import kind_of


def plot_loss(rows: list[dict], path: str, title: str) -> None:
  """Saves the training-loss curve (and the eval loss, where evaluated) as a PNG.

  Uses a bare `Figure` (no pyplot), so it neither needs nor changes the process's
  matplotlib backend (a notebook calling the job keeps its inline plots).
  """
  from matplotlib.figure import Figure

  fig = Figure(figsize=(6, 3.5), dpi=120)
  ax = fig.subplots()
  for kind, style in (("train", "-"), ("eval", "o-")):
    points = [
      (r["step"], r["loss"])
      for r in rows
      if kind_of(r) == kind and math.isfinite(r.get("loss", math.nan))
    ]
    if points:
      ax.plot(*zip(*points), style, label=f"{kind} loss")
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
