"""The state a run carries from step to step, into its checkpoints and into its outputs.

One value, `RunState`, is what the training loop takes and returns, what a
checkpoint stores (its arrays as orbax's `state` item, its counters in the JSON `meta`
item beside the run's fingerprint) and what the run's outputs read.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any


@dataclasses.dataclass(frozen=True)
class RunState:
  """A run after `step` optimizer steps.

  Attributes:
    trainable: the trained tree (the adapters, or every weight with `--method full`).
    opt_state: the optimizer's state of `trainable`.
    step: optimizer steps done.
    data_state: where the training stream stands (`PackedBatches.state`); `None`
      before the first batch of a fresh run.
    skipped_steps: steps skipped because their loss or gradient was not finite.
    loss: the loss of the last step that was applied (NaN before any).
  """

  trainable: Any
  opt_state: Any
  step: int = 0
  data_state: dict | None = None
  skipped_steps: int = 0
  loss: float = math.nan

  def replace(self, **changes) -> RunState:
    """A copy with `changes` (`dataclasses.replace`)."""
    return dataclasses.replace(self, **changes)

  def arrays(self) -> dict:
    """The array part, as a checkpoint stores it: `{'trainable', 'opt_state'}`."""
    return {"trainable": self.trainable, "opt_state": self.opt_state}

  def counters(self) -> dict:
    """The JSON part, as a checkpoint's `meta` item stores it."""
    return {
      "step": self.step,
      "data_state": self.data_state,
      "skipped_steps": self.skipped_steps,
      "loss": self.loss,
    }

  def save(self, checkpoints, meta: dict) -> None:
    """Saves this state at its step into `checkpoints` (a `RunCheckpoints`), with `meta`."""
    checkpoints.save(self.step, self.arrays(), {**meta, **self.counters()}, force=True)

  def restore(self, checkpoints, step: int) -> tuple[RunState, dict]:
    """The state saved at `step`, placed as this one's arrays are; and the saved `meta`."""
    arrays, meta = checkpoints.restore(step, self.arrays())
    state = RunState(
      arrays["trainable"],
      arrays["opt_state"],
      step=step,
      data_state=meta["data_state"],
      skipped_steps=int(meta.get("skipped_steps", 0)),
      loss=meta.get("loss", math.nan),
    )
    return state, meta
