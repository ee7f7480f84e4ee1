"""Orbax checkpoints of a run: trainable tree, optimizer state, step, data position, RNG.

Each step is written by ``ocp.CheckpointManager`` (atomic: a step directory appears only
once complete); the last ``keep`` steps are kept. A JSON item carries the data-stream
position and the run's config fingerprint, so ``--resume`` refuses a different config.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class RunCheckpoints:
  """Thin wrapper over ``orbax.checkpoint.CheckpointManager`` for one run directory."""

  def __init__(self, directory: str, keep: int, save_every: int):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every,
                                           create=True, enable_async_checkpointing=False)
    self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: dict, meta: dict, force: bool = False) -> bool:
    """Saves ``state`` (arrays) and ``meta`` (JSON) at ``step``; returns whether it saved."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    saved = self.manager.save(step, args=args, force=force)
    self.manager.wait_until_finished()
    return saved

  def restore(self, step: int, like: dict) -> tuple[dict, dict]:
    """Restores ``(state, meta)`` at ``step`` into the structure/shardings of ``like``."""
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]

  def read_meta(self, step: int) -> dict:
    """The JSON item of ``step`` alone (cheap; used to vet ``--resume`` before any work)."""
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def close(self) -> None:
    self.manager.close()
