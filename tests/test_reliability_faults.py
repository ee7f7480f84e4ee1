"""Faults survived (RELIABILITY.md): SIGKILL/SIGINT at seeded points, damaged checkpoints.

The shared set-up (tiny model, small task, reference run, compile cache) is in
`reliability_helpers.py`; its session folder is the `rel` fixture (`conftest.py`).
"""

import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

from finetune_helpers import SCRIPT, read_jsonl
import jax.numpy as jnp
import pytest
import recorded_results
from reliability_helpers import SAVE_EVERY, STEPS, env_for, job, reference_run, run


def adapter_bytes(out):
  with open(os.path.join(out, "peft_adapter", "adapter_model.safetensors"), "rb") as f:
    return f.read()


# ----------------------------------------------------------------------------- SIGKILL chain


def _logged_step(out):
  """Largest step in metrics.jsonl (tolerates a file being rewritten under us)."""
  try:
    with open(out / "metrics.jsonl") as f:
      text = f.read()
  except FileNotFoundError:
    return 0
  steps = [0]
  for line in text.splitlines():
    try:
      steps.append(json.loads(line)["step"])
    except (ValueError, KeyError):
      pass
  return max(steps)


def _tmp_steps(out):
  names = os.listdir(out / "checkpoints") if (out / "checkpoints").is_dir() else []
  return sorted(int(n.split(".")[0]) for n in names if ".orbax-checkpoint-tmp" in n)


def _committed(out):
  names = os.listdir(out / "checkpoints") if (out / "checkpoints").is_dir() else []
  return sorted(int(n) for n in names if n.isdigit())


# Six interruptions of one run: 5 x SIGKILL (2 during a checkpoint write, 1 after the last
# checkpoint, i.e. while the outputs are written) and 1 x SIGINT; each restart uses --resume.
INTERRUPTIONS = ("step", "save", "step", "sigint", "save", "final")


@pytest.mark.slow  # a heavy end-to-end run: CI's second stage
def test_sigkill_at_seeded_points_then_resume_is_bit_identical(rel, tmp_path):
  ref = reference_run(rel)
  rng = random.Random(9)
  out = tmp_path / "chain"
  seen, log, pending_warning = 0, [], None
  for i, kind in enumerate(INTERRUPTIONS):
    stdout, stderr = tmp_path / f"p{i}.out", tmp_path / f"p{i}.err"
    with open(stdout, "w") as fo, open(stderr, "w") as fe:
      resume = ["--resume"] if i else []
      proc = subprocess.Popen(
        [sys.executable, SCRIPT, *job(rel, out, *resume)], stdout=fo, stderr=fe, env=env_for(rel)
      )
    if kind in ("step", "sigint"):
      target = max(seen, SAVE_EVERY) + rng.randint(1, 3)  # after the first checkpoint
      cond = lambda: _logged_step(out) >= target
    elif kind == "save":  # a checkpoint being written right now
      target = max(seen, SAVE_EVERY)
      cond = lambda: any(s > target for s in _tmp_steps(out))
    else:  # the last checkpoint is committed: outputs are being written
      target, last = STEPS, out / "checkpoints" / str(STEPS)
      stale = last.is_dir()  # a previous kill came just after it: wait for this run's restore
      cond = lambda: last.is_dir() and (not stale or "resumed from" in stdout.read_text())
    deadline = time.time() + 240
    while not cond():
      assert proc.poll() is None and time.time() < deadline, (
        f"run {i} ended before its {kind} point: {stderr.read_text()[-2000:]}"
      )
      time.sleep(0.003)
    if kind == "step":
      time.sleep(rng.uniform(0.0, 0.2))
    proc.send_signal(signal.SIGINT if kind == "sigint" else signal.SIGKILL)
    code = proc.wait(timeout=120)
    text = stdout.read_text()
    if pending_warning is not None:  # the restart reported the half-written step it ignored
      assert f"checkpoint {pending_warning}.orbax-checkpoint-tmp" in text and "half-written" in text
    assert "resumed from step" in text or i == 0
    if kind == "sigint":
      assert code == 0, stderr.read_text()[-2000:]
      assert "received SIGINT" in text and "rerun with --resume" in text
    else:
      assert code == -signal.SIGKILL
    assert not (out / "summary.json").exists()
    tmp = _tmp_steps(out)
    pending_warning = tmp[-1] if tmp else None
    log.append(
      {
        "run": i,
        "signal": "SIGINT" if kind == "sigint" else "SIGKILL",
        "point": kind,
        "trigger": target,
        "logged_step": _logged_step(out),
        "half_written": tmp,
        "committed": _committed(out),
      }
    )
    seen = max([seen, _logged_step(out), *tmp])
  print("\n" + "\n".join(json.dumps(r) for r in log))
  assert any(r["half_written"] for r in log if r["point"] == "save"), (
    f"no kill landed inside a checkpoint write: {log}"
  )
  proc = run(rel, job(rel, out, "--resume"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  if pending_warning is not None:
    assert "half-written" in proc.stdout
  assert adapter_bytes(out) == adapter_bytes(ref)
  assert read_jsonl(out / "metrics.jsonl") == read_jsonl(ref / "metrics.jsonl")
  summary, expected = (json.loads((d / "summary.json").read_text()) for d in (out, ref))
  assert summary["final_loss"] == expected["final_loss"]
  assert summary["eval_after"] == expected["eval_after"]
  recorded_results.record("reliability_faults", "sigkill_chain", log)  # RELIABILITY.md quotes it


# ----------------------------------------------------------------------------- damaged checkpoints


def _largest_file(step_dir):
  files = [
    f
    for f in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True)
    if os.path.isfile(f)
  ]
  return max(files, key=os.path.getsize)


@pytest.mark.slow
def test_damaged_latest_checkpoint_is_skipped_and_resume_is_bit_identical(rel, tmp_path):
  ref = reference_run(rel)
  out = tmp_path / "damaged"
  shutil.copytree(ref, out)
  victim = _largest_file(out / "checkpoints" / str(STEPS))
  os.truncate(victim, os.path.getsize(victim) // 2)
  proc = run(rel, job(rel, out, "--resume"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  previous = STEPS - SAVE_EVERY
  assert f"warning: checkpoint step {STEPS} is damaged" in proc.stdout
  assert f"resuming from step {previous} instead" in proc.stdout
  assert f"resumed from step {previous}" in proc.stdout
  assert (out / "checkpoints" / f"{STEPS}.damaged").is_dir()
  assert adapter_bytes(out) == adapter_bytes(ref)
  assert read_jsonl(out / "metrics.jsonl") == read_jsonl(ref / "metrics.jsonl")
  warning = next(line for line in proc.stdout.splitlines() if "is damaged" in line)
  recorded_results.check(
    "reliability_faults",
    "damaged_step_warning",
    recorded_results.as_quoted(warning.replace(str(out), "…")),
  )


# ----------------------------------------------------------------------------- RunCheckpoints unit


def _saved(tmp_path, steps=(1, 2, 3)):
  from oftjax.checkpoint import RunCheckpoints

  ckpt = RunCheckpoints(str(tmp_path / "ck"), 5, 1)
  for s in steps:
    ckpt.save(s, {"w": jnp.full((8, 4), float(s))}, {"step": s}, force=True)
  ckpt.close()
  return tmp_path / "ck"


def _latest(directory):
  from oftjax.checkpoint import RunCheckpoints

  ckpt = RunCheckpoints(str(directory), 5, 1)
  try:
    return ckpt.latest_step()
  finally:
    ckpt.close()


def test_half_written_step_is_ignored_with_a_warning(tmp_path, capsys):
  directory = _saved(tmp_path)
  (directory / "4.orbax-checkpoint-tmp").mkdir()
  (directory / "4.orbax-checkpoint-tmp" / "_CHECKPOINT_METADATA").write_text("{}")
  assert _latest(directory) == 3
  out = capsys.readouterr().out
  assert "warning: checkpoint 4.orbax-checkpoint-tmp" in out and "half-written" in out


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "delete", "manifest", "meta json"])
def test_damaged_step_falls_back_to_the_previous_one(tmp_path, capsys, damage):
  from oftjax.checkpoint import INTEGRITY, RunCheckpoints

  directory = _saved(tmp_path)
  step3 = directory / "3"
  victim = _largest_file(step3)
  if damage == "truncate":
    os.truncate(victim, 3)
  elif damage == "bitflip":
    with open(victim, "r+b") as f:
      byte = f.read(1)
      f.seek(0)
      f.write(bytes([byte[0] ^ 1]))
  elif damage == "delete":
    os.remove(victim)
  elif damage == "manifest":
    (step3 / INTEGRITY).write_text("{trunc")
  else:
    (step3 / INTEGRITY).unlink()  # a step saved before the manifest: structural checks only
    (step3 / "meta" / "metadata").write_text("{trunc")
  assert _latest(directory) == 2
  out = capsys.readouterr().out
  assert "warning: checkpoint step 3 is damaged" in out and "resuming from step 2" in out
  ckpt = RunCheckpoints(str(directory), 5, 1)
  state, meta = ckpt.restore(ckpt.latest_step(), {"w": jnp.zeros((8, 4))})
  assert float(state["w"][0, 0]) == 2.0 and meta == {"step": 2}
  ckpt.close()


def test_every_step_damaged_is_one_line_error_naming_the_step(tmp_path):
  from oftjax.checkpoint import CheckpointError

  directory = _saved(tmp_path, steps=(1, 2))
  for s in (1, 2):
    os.truncate(_largest_file(directory / str(s)), 1)
  with pytest.raises(CheckpointError) as err:
    _latest(directory)
  assert "checkpoint step 2" in str(err.value) and len(str(err.value).splitlines()) == 1


def test_restore_failure_is_one_line_error_naming_the_step(tmp_path):
  from oftjax.checkpoint import INTEGRITY, CheckpointError, RunCheckpoints

  directory = _saved(tmp_path, steps=(1,))
  (directory / "1" / INTEGRITY).unlink()  # unverifiable (legacy) step whose data is gone
  for f in glob.glob(str(directory / "1" / "state" / "**" / "d" / "*"), recursive=True):
    os.remove(f)
  ckpt = RunCheckpoints(str(directory), 5, 1)
  assert ckpt.latest_step() == 1
  with pytest.raises(CheckpointError) as err:
    ckpt.restore(1, {"w": jnp.zeros((8, 4))})
  assert "checkpoint step 1" in str(err.value) and len(str(err.value).splitlines()) == 1
  ckpt.close()
