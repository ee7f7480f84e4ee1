"""Wall time and host memory of each phase of a run (load, evaluate, train, fold, export).

`summary.json` reports them as `phases`: `{name: {"s", "start", "rss_bytes",
"peak_rss_bytes"}}` in run order, so the time outside training steps and the phase that
set the process's memory peak can be read off one run. `peak_rss_bytes` is the process's
high-water mark so far (`getrusage`): the phase whose value first reaches the final peak is
the one that set it; `start` (seconds since the epoch) lets an outside sampler attribute
its samples to phases.
"""

from __future__ import annotations

import resource
import sys
import time

# The phases of `oftjax.train.run`, in the order a run passes them (a run skips those it
# has no work for: `export_lora` without `--export-lora`, ...).
PHASES = (
  "setup",
  "adapters",
  "load",
  "place",
  "eval_before",
  "train",
  "export_lora",
  "fold",
  "eval_after",
  "export_peft",
  "export_merged",
  "plot",
)


def current_rss_bytes() -> int:
  """The process's resident set size now (Linux `/proc/self/statm`; 0 where unavailable)."""
  try:
    with open("/proc/self/statm") as fh:
      return int(fh.read().split()[1]) * resource.getpagesize()
  except (OSError, IndexError, ValueError):
    return 0


def peak_rss_bytes() -> int:
  """The process's peak resident set size so far (`ru_maxrss`: KiB on Linux, bytes on macOS)."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak if sys.platform == "darwin" else peak * 1024


class PhaseClock:
  """Times consecutive phases: `mark(name)` ends the phase begun by the previous mark."""

  def __init__(self, start: float | None = None):
    self.phases: dict[str, dict] = {}
    self._since = time.time() if start is None else start

  def mark(self, name: str) -> None:
    """Records the phase `name` as ending now (a repeated name adds to its time)."""
    now = time.time()
    entry = self.phases.setdefault(name, {"s": 0.0, "start": self._since})
    entry["s"] += now - self._since
    entry["rss_bytes"] = current_rss_bytes()
    entry["peak_rss_bytes"] = peak_rss_bytes()
    self._since = now
