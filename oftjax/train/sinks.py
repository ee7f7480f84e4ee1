"""Where the training loop's metric rows go: metrics.jsonl, TensorBoard, Weights & Biases.

Every backend is a `MetricsSink`, a peer of the others (`MetricsLog`,
`TensorBoardSink`, `WandbSink`): the loop writes each row once, to the
`FanOut` of the run's sinks that `open_sinks` builds. A row is a flat dict
`{'kind': ..., 'step': ..., <name>: <number>, ...}` with `kind` one of

- `'train'`: the training loss and the step's other figures (`--log-every`),
- `'eval'`: the evaluator's metrics (`--eval-every`), as `summary.json`'s `eval_after`,
- `'speed'`: training tokens per second since the previous log line (wall-clock).

TensorBoard and W&B name a scalar `<kind>/<name>` (`train/loss`, `eval/accuracy`,
`speed/tokens_per_s`). On `--resume` each sink forgets what it holds past the
checkpoint, so the resumed run neither repeats nor loses a row.

References: tensorboardX `SummaryWriter` (its `purge_step`), wandb `init`/`log`.
"""

from __future__ import annotations

import json
import numbers
import os
import secrets
import time
from typing import Protocol

EVENT_FILE_PREFIX = "events.out.tfevents."


def kind_of(row: dict) -> str:
  """A metrics row's kind; rows written before kinds existed are training rows."""
  return row.get("kind", "train")


def _parse(line: str) -> dict | None:
  """A metrics line, or None for a line torn by a crash mid-write (it is dropped)."""
  try:
    return json.loads(line)
  except json.JSONDecodeError:
    return None


class MetricsSink(Protocol):
  """A backend that records metric rows."""

  def write(self, row: dict) -> None:
    """Records one row (see the module docstring)."""

  def close(self) -> None:
    """Flushes and releases the backend."""


def scalars(row: dict) -> dict[str, float]:
  """`{'<kind>/<name>': value}` of a row's numbers (not its `kind` and `step`)."""
  return {
    f"{kind_of(row)}/{name}": float(value)
    for name, value in row.items()
    if name not in ("kind", "step")
    and isinstance(value, numbers.Real)
    and not isinstance(value, bool)
  }


class FanOut:
  """Writes each row to every sink of `sinks`, in order; itself a `MetricsSink`."""

  def __init__(self, sinks: list):
    self.sinks = list(sinks)

  def write(self, row: dict) -> None:
    for sink in self.sinks:
      sink.write(row)

  def close(self) -> None:
    for sink in self.sinks:
      sink.close()


class MetricsLog:
  """metrics.jsonl: one JSON object per train and eval row (a `sinks.MetricsSink`).

  Speed rows (wall-clock tokens/s) are left out, so the file is a deterministic record:
  an interrupted and resumed run writes the same file as an uninterrupted one. On resume
  the rows past the checkpoint are dropped (they are rerun).

  Attributes:
    rows: the rows in the file.
  """

  KINDS = ("train", "eval")

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

  def write(self, row: dict) -> None:
    """Appends `row` (synced to disk) unless it is of a kind the file leaves out."""
    if kind_of(row) not in self.KINDS:
      return
    clean = {
      k: (float(v) if isinstance(v, float) or hasattr(v, "dtype") else v) for k, v in row.items()
    }
    self.rows.append(clean)
    with open(self.path, "a") as f:
      f.write(json.dumps(clean, sort_keys=True) + "\n")
      f.flush()
      os.fsync(f.fileno())

  def close(self) -> None:
    """Nothing to release: every row is synced as it is written."""


def event_files(logdir: str) -> list[str]:
  """The TensorBoard event files directly in `logdir` (none when it does not exist)."""
  if not os.path.isdir(logdir):
    return []
  return sorted(f for f in os.listdir(logdir) if f.startswith(EVENT_FILE_PREFIX))


class TensorBoardSink:
  """Every row's `scalars` as TensorBoard scalar events, at the row's step.

  Args:
    logdir: the event files' folder (created if missing).
    purge_step: when resuming after step `s`, `s + 1`: TensorBoard hides the events
      an earlier writer of `logdir` recorded at that step or later (they are rerun).
  """

  def __init__(self, logdir: str, purge_step: int | None = None):
    from tensorboardX import SummaryWriter  # only runs that ask for it import it

    # tensorboardX names a file by the second and the host: a writer started in the same
    # second as the last one (a quick resume) would replace its file; nanoseconds keep both,
    # in the order TensorBoard reads them (by name).
    self.writer = SummaryWriter(
      logdir, purge_step=purge_step, flush_secs=30, filename_suffix=f".{time.time_ns()}"
    )

  def write(self, row: dict) -> None:
    for tag, value in scalars(row).items():
      self.writer.add_scalar(tag, value, global_step=row["step"])
    self.writer.flush()  # a killed run keeps every row it logged, as metrics.jsonl does

  def close(self) -> None:
    self.writer.close()


class WandbSink:
  """Every row's `scalars` logged to a Weights & Biases run, at the row's step.

  The run's id is kept in `<output_dir>/wandb_run_id`, so `--resume` continues the
  same W&B run. W&B keeps the first value it received for a step: rows that a crashed run
  logged past its last checkpoint stay as first logged (metrics.jsonl holds the rerun's).

  Args:
    output_dir: the run's folder (W&B writes its local files under it).
    config: the run's flags, shown as the W&B run's config.
    resume: continue the W&B run recorded in `output_dir`.

  Raises:
    ImportError: `wandb` is not installed (the job checks this before starting).
  """

  ID_FILE = "wandb_run_id"

  def __init__(self, output_dir: str, config: dict, resume: bool):
    import wandb

    id_path = os.path.join(output_dir, self.ID_FILE)
    if resume and os.path.exists(id_path):
      with open(id_path) as f:
        run_id = f.read().strip()
    else:
      run_id = secrets.token_hex(8)
      with open(id_path, "w") as f:
        f.write(run_id + "\n")
    self.run = wandb.init(
      id=run_id,
      resume="allow",
      dir=output_dir,
      config=config,
      name=os.path.basename(os.path.abspath(output_dir)),
    )

  def write(self, row: dict) -> None:
    self.run.log(scalars(row), step=row["step"])

  def close(self) -> None:
    self.run.finish()


def open_sinks(c, resume_step: int | None) -> tuple[MetricsLog, FanOut]:
  """The run's sinks: metrics.jsonl, with TensorBoard (`--tensorboard`) and W&B (`--wandb`).

  Args:
    c: the run's `RunConfig`.
    resume_step: the checkpoint's step when resuming, else `None`.

  Returns:
    The metrics.jsonl sink (its `rows` feed the summary and the plot) and the fan-out of
    every sink, which the loop writes to.
  """
  log = MetricsLog(os.path.join(c.output_dir, "metrics.jsonl"), resume_step)
  sinks = [log]
  if c.tensorboard:
    sinks.append(TensorBoardSink(c.tensorboard, None if resume_step is None else resume_step + 1))
  if c.wandb:
    sinks.append(WandbSink(c.output_dir, dict(vars(c)), resume=resume_step is not None))
  return log, FanOut(sinks)
