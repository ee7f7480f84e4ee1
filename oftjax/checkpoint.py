"""Orbax checkpoints of a run: trainable tree, optimizer state, step, data position, RNG.

Each step is written by `ocp.CheckpointManager` (atomic: a step directory appears only
once complete); the last `keep` steps are kept. A JSON item carries the data-stream
position and the run's config fingerprint, so a resumed run can refuse a different config.

Damage is survived, never loaded (RELIABILITY.md):

- A process killed while saving leaves `<step>.orbax-checkpoint-tmp` behind: it is
  reported with a warning and ignored (orbax replaces it when that step is saved again).
- After each save the main process writes `oftjax-integrity.json` into the step folder
  (size and SHA-256 of every file). `RunCheckpoints.latest_step` verifies the newest
  step against it; a damaged step (truncated, altered or missing files, unreadable JSON)
  is moved aside to `<step>.damaged` with a warning and the previous step is used. A step
  saved without the manifest (killed between orbax's commit and the manifest write) gets
  structural checks only. If no usable step remains (`NoUsableStepError`), or a
  restore fails anyway, a one-line `CheckpointError` names the step.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import orbax.checkpoint as ocp

from oftjax import atomic

INTEGRITY = "oftjax-integrity.json"
TMP_MARK = ".orbax-checkpoint-tmp"
_UNHASHED = ("_CHECKPOINT_METADATA", INTEGRITY)  # orbax may rewrite its own step metadata
_warned: set[str] = set()


class CheckpointError(ValueError):
  """An unusable checkpoint: one line naming the step and what to do."""


class NoUsableStepError(CheckpointError):
  """Every saved step is damaged: the run can only start again from scratch.

  Attributes:
    problem: the message without its remedy (which step, what is wrong with it).
  """

  def __init__(self, problem: str):
    super().__init__(f"{problem}; start the run again from scratch")
    self.problem = problem


def _warn(text: str) -> None:
  if jax.process_index() == 0 and text not in _warned:
    _warned.add(text)
    print(f"warning: {text}", flush=True)


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  line = text.splitlines()[0] if text else type(e).__name__
  return line if len(line) <= 200 else line[:200] + "..."


def _files(step_dir: str) -> list[str]:
  out = []
  for root, _, names in os.walk(step_dir):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), step_dir)
      if rel not in _UNHASHED and not name.startswith(atomic.TMP_PREFIX):
        out.append(rel)
  return sorted(out)


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def write_integrity(step_dir: str) -> None:
  """Records size and SHA-256 of every file of a finished step (atomically)."""
  files = {
    rel: [os.path.getsize(os.path.join(step_dir, rel)), _sha256(os.path.join(step_dir, rel))]
    for rel in _files(step_dir)
  }
  atomic.write_json(
    os.path.join(step_dir, INTEGRITY), {"format": 1, "files": files}, sort_keys=True
  )


def step_problem(step_dir: str) -> str | None:
  """What is wrong with a committed step folder, or `None` when it looks intact."""
  manifest = os.path.join(step_dir, INTEGRITY)
  if os.path.exists(manifest):
    try:
      with open(manifest) as f:
        files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError):
      return f"{INTEGRITY} is unreadable"
    for rel, (size, digest) in sorted(files.items()):
      path = os.path.join(step_dir, rel)
      if not os.path.isfile(path):
        return f"{rel} is missing"
      if os.path.getsize(path) != size:
        return f"{rel} is {os.path.getsize(path)} bytes, expected {size}"
      if _sha256(path) != digest:
        return f"{rel} does not match its checksum"
  for rel in (os.path.join("meta", "metadata"), os.path.join("state", "_METADATA")):
    try:
      with open(os.path.join(step_dir, rel), "rb") as f:
        json.loads(f.read())
    except FileNotFoundError:
      return f"{rel} is missing"
    except (OSError, ValueError):
      return f"{rel} is not valid JSON"
  return None


class RunCheckpoints:
  """Thin wrapper over `orbax.checkpoint.CheckpointManager` for one run directory."""

  def __init__(self, directory: str, keep: int, save_every: int):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      save_interval_steps=save_every,
      create=True,
      enable_async_checkpointing=False,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def half_written(self) -> list[str]:
    """Names of step folders a killed save left unfinished (never loaded)."""
    if not os.path.isdir(self.directory):
      return []
    return sorted(n for n in os.listdir(self.directory) if TMP_MARK in n)

  def latest_step(self) -> int | None:
    """Newest intact step (damaged ones are set aside with a warning); `None` if none."""
    for name in self.half_written():
      _warn(
        f"checkpoint {name} in {self.directory} was half-written (the run was killed "
        "while saving); ignored"
      )
    damaged = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      problem = step_problem(os.path.join(self.directory, str(step)))
      if problem is None:
        if damaged:
          self._set_aside(damaged)
          for bad, why in damaged:
            _warn(f"checkpoint step {bad} is damaged ({why}); resuming from step {step} instead")
        return step
      damaged.append((step, problem))
    if damaged:
      step, why = damaged[0]
      self.close()  # unusable; callers that stop on the error need not close it
      raise NoUsableStepError(
        f"checkpoint step {step} in {self.directory} is damaged ({why}) "
        "and no earlier step is usable"
      )
    return None

  def _set_aside(self, damaged) -> None:
    """Renames damaged steps to `<step>.damaged` (main process) so they are never loaded."""
    if jax.process_index() == 0:
      for step, _ in damaged:
        src = os.path.join(self.directory, str(step))
        dst = src + ".damaged"
        if os.path.exists(dst):
          import shutil

          shutil.rmtree(dst)
        os.replace(src, dst)
    self.manager.reload()

  def save(self, step: int, state: dict, meta: dict, force: bool = False) -> bool:
    """Saves `state` (arrays) and `meta` (JSON) at `step`; returns whether it saved."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    saved = self.manager.save(step, args=args, force=force)
    self.manager.wait_until_finished()
    if saved and jax.process_index() == 0:
      write_integrity(os.path.join(self.directory, str(step)))
    return saved

  def restore(self, step: int, like: dict) -> tuple[dict, dict]:
    """Restores `(state, meta)` at `step` into the structure/shardings of `like`."""
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
    try:
      out = self.manager.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
        ),
      )
    except Exception as e:  # orbax/tensorstore raise many kinds; the user needs one line
      self.close()
      raise CheckpointError(
        f"checkpoint step {step} in {self.directory} cannot be restored "
        f"({_first_line(e)}); move it aside to resume from an earlier "
        "step"
      ) from None
    return out["state"], out["meta"]

  def read_meta(self, step: int) -> dict:
    """The JSON item of `step` alone (cheap; used to vet a resume before any work)."""
    try:
      return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
        "meta"
      ]
    except Exception as e:  # see restore()
      self.close()
      raise CheckpointError(
        f"checkpoint step {step} in {self.directory}: its metadata cannot "
        f"be read ({_first_line(e)})"
      ) from None

  def close(self) -> None:
    self.manager.close()
