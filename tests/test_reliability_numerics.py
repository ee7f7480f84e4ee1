"""Numerics watched (RELIABILITY.md): orthogonality warning, non-finite steps skipped or stopping the run,
and no NaN/Inf ever written to a checkpoint or a PEFT adapter."""

import json
import math
import os
import shutil
import types

from finetune_helpers import read_jsonl
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import recorded_results
from reliability_helpers import job, reference_run, run
import safetensors.numpy

from oftjax.train.loop import ORTHOGONALITY_TOLERANCE

HUGE_LR = "1000"  # one step of Adam at this rate takes ‖Q‖ to ~1e4: the next loss is NaN


def _checkpoint_arrays(out):
  """Every array of every checkpoint step of a run folder (restored without a target)."""
  import orbax.checkpoint as ocp

  found = {}
  directory = os.path.join(out, "checkpoints")
  for name in sorted(os.listdir(directory)):
    if name.isdigit():
      restored = ocp.StandardCheckpointer().restore(os.path.join(directory, name, "state"))
      found[int(name)] = [np.asarray(x) for x in jax.tree_util.tree_leaves(restored)]
  return found


def test_orthogonality_is_logged_and_warned_when_the_series_breaks(rel):
  ref = reference_run(rel)  # --lr 0.05 drives ‖Q‖ past 1 within a few steps on this model
  rows = read_jsonl(ref / "metrics.jsonl")
  assert all("max_q_norm" in r and "orthogonality_error" in r for r in rows)
  first = next(r["step"] for r in rows if r["orthogonality_error"] > ORTHOGONALITY_TOLERANCE)
  stdout = (rel / "reference.stdout").read_text()
  assert f"> {ORTHOGONALITY_TOLERANCE} at step {first} (max ‖Q‖ = " in stdout
  assert stdout.count("warning: orthogonality error") == 1  # once, not every step
  below = [r for r in rows if r["step"] < first]
  assert all(r["orthogonality_error"] <= ORTHOGONALITY_TOLERANCE for r in below)
  # ‖Q‖ passes 1 and from the warning on the error grows every step (the series stops
  # approximating a rotation; measured: 0.06 at the warning, 317 at step 24)
  assert max(r["max_q_norm"] for r in rows) >= 1.0
  after = [r["orthogonality_error"] for r in rows if r["step"] >= first]
  assert all(b > a for a, b in zip(after, after[1:])), after
  warned = next(r for r in rows if r["step"] == first)
  recorded_results.check(
    "reliability_numerics",
    "orthogonality_warning",
    {"step": first, "max_q_norm": round(warned["max_q_norm"], 3)},
    0.02,
  )


def test_nonfinite_steps_are_skipped_counted_and_never_saved(rel, tmp_path):
  out = tmp_path / "skip"
  proc = run(rel, job(rel, out, "--lr", HUGE_LR, steps=6))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "the loss or gradient is not finite; step skipped" in proc.stdout
  rows = read_jsonl(out / "metrics.jsonl")
  skipped = [r["step"] for r in rows if r["skipped"]]
  # from the first non-finite step on, every step is skipped: the weights stay as they were
  assert skipped and skipped == list(range(skipped[0], rows[-1]["step"] + 1)), skipped
  before = next(r for r in rows if r["step"] == skipped[0] - 1)
  assert before["max_q_norm"] > 1e3 and math.isfinite(before["loss"]), before
  assert f"warning: step {skipped[0]}: the loss or gradient is not finite" in proc.stdout
  recorded_results.check(
    "reliability_numerics",
    "nonfinite",
    {
      "first_skipped_step": skipped[0],
      "last_step": rows[-1]["step"],
      "max_q_norm_before": round(before["max_q_norm"]),
    },
    0.05,
  )
  assert [r["skipped_steps"] for r in rows] == [
    sum(1 for s in skipped if s <= r["step"]) for r in rows
  ]
  assert all(math.isfinite(r["loss"]) for r in rows if not r["skipped"])
  summary = json.loads((out / "summary.json").read_text())
  assert math.isfinite(summary["final_loss"])  # the last applied step's loss, not NaN
  adapter = safetensors.numpy.load_file(str(out / "peft_adapter" / "adapter_model.safetensors"))
  assert all(np.isfinite(v).all() for v in adapter.values())
  for step, arrays in _checkpoint_arrays(out).items():
    assert all(np.isfinite(a).all() for a in arrays if a.dtype.kind == "f"), step


def test_on_nonfinite_stop_exits_nonzero_and_saves_nothing_nonfinite(rel, tmp_path):
  out = tmp_path / "stop"
  proc = run(rel, job(rel, out, "--lr", HUGE_LR, "--on-nonfinite", "stop", steps=6))
  assert proc.returncode == 2
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: step ") and "not finite" in last and "--on-nonfinite stop" in last
  # the same step the skipping run skips first (the two runs are identical up to it)
  step = int(last.split()[2].rstrip(":"))
  recorded_results.check("reliability_numerics", "nonfinite_stop_step", step)
  rows = read_jsonl(out / "metrics.jsonl")
  assert [r["step"] for r in rows] == list(range(1, step)), rows
  assert "Traceback" not in proc.stderr
  assert not (out / "summary.json").exists() and not (out / "peft_adapter").exists()
  assert rows and all(math.isfinite(r["loss"]) and not r["skipped"] for r in rows)
  for step, arrays in _checkpoint_arrays(out).items():
    assert all(np.isfinite(a).all() for a in arrays if a.dtype.kind == "f"), step


def test_nan_init_adapter_is_refused(rel, tmp_path):
  ref = reference_run(rel)
  bad = tmp_path / "nan_adapter"
  shutil.copytree(ref / "peft_adapter", bad)
  path = str(bad / "adapter_model.safetensors")
  tensors = safetensors.numpy.load_file(path)
  name = sorted(tensors)[0]
  tensors[name] = tensors[name].copy()
  tensors[name][0, 0] = np.nan
  safetensors.numpy.save_file(tensors, path)
  out = tmp_path / "out"
  proc = run(rel, job(rel, out, "--init-adapter", str(bad), steps=6))
  assert proc.returncode == 2, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "NaN" in last and "Traceback" not in proc.stderr
  assert not (out / "summary.json").exists() and not (out / "peft_adapter").exists()
  assert not (out / "checkpoints").exists() or not any(
    n.isdigit() for n in os.listdir(out / "checkpoints")
  )


# ----------------------------------------------------------------------------- loop unit test


class _Compiled:
  """Stands in for the compiled train step: finite loss, weights blow up at `bad_step`."""

  def __init__(self, bad_step):
    self.calls, self.bad_step = 0, bad_step

  def lower(self, *args):
    return types.SimpleNamespace(compile=lambda: self)

  def memory_analysis(self):
    return None  # as a backend without memory analysis

  def __call__(self, trainable, opt_state, frozen, batch):
    self.calls += 1
    value = jnp.inf if self.calls >= self.bad_step else float(self.calls)
    trainable = {"w": jnp.full((2, 2), value, jnp.float32)}
    aux = {"token_accuracy": jnp.float32(0), "grad_norm": jnp.float32(1), "skipped": jnp.int32(0)}
    return trainable, opt_state, jnp.float32(1.0), aux


class _Checkpoints:
  def __init__(self):
    self.saved = []

  def save(self, step, state, meta, force=False):
    assert all(bool(jnp.isfinite(x).all()) for x in state["trainable"].values())
    self.saved.append(step)


class _Stream:
  state = {"epoch": 0, "row": 0}

  def __next__(self):
    return {"inputs": np.zeros((1, 4), np.int32), "segment_ids": np.ones((1, 4), np.int32)}


def _config(**kw):
  base = dict(
    steps=6,
    grad_accum=1,
    log_every=1,
    save_every=2,
    method="oft",
    parameterization="cayley_neumann",
    on_nonfinite="skip",
    lr=1e-3,
    warmup_steps=0,
    eval_every=None,
  )
  return types.SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize("bad_step", [1, 4])
def test_weights_that_turn_nonfinite_are_never_saved(bad_step):
  from oftjax import sharding
  from oftjax.train.config import UsageError
  from oftjax.train.loop import LoopIO, TrainStep, train_loop
  from oftjax.train.state import RunState

  ckpt = _Checkpoints()
  with pytest.raises(UsageError) as err:
    train_loop(
      _config(),
      RunState({"w": jnp.zeros((2, 2))}, {}),
      TrainStep(_Compiled(bad_step), {}, sharding.make_mesh("")),
      LoopIO(_Stream(), ckpt, None, {}, types.SimpleNamespace(stop=False)),
    )
  first_save = 2 * ((bad_step + 1) // 2)
  assert f"step {first_save}: the trainable weights became NaN or Inf" in str(err.value)
  assert ckpt.saved == ([] if bad_step <= 2 else [2])


def test_nonfinite_starting_weights_are_refused_before_training():
  from oftjax import sharding
  from oftjax.train.config import UsageError
  from oftjax.train.loop import LoopIO, TrainStep, train_loop
  from oftjax.train.state import RunState

  step = _Compiled(99)
  with pytest.raises(UsageError, match="NaN or Inf before training"):
    train_loop(
      _config(),
      RunState({"w": jnp.full((2, 2), jnp.nan)}, {}),
      TrainStep(step, {}, sharding.make_mesh("")),
      LoopIO(_Stream(), _Checkpoints(), None, {}, types.SimpleNamespace(stop=False)),
    )
  assert step.calls == 0


class _CountingStream:
  """A stream whose `state` is the number of batches handed out so far."""

  def __init__(self):
    self.rows = 0

  @property
  def state(self):
    return {"epoch": 0, "row": self.rows}

  def __next__(self):
    self.rows += 1
    return {"inputs": np.zeros((1, 4), np.int32), "segment_ids": np.ones((1, 4), np.int32)}


class _MetaCheckpoints(_Checkpoints):
  def save(self, step, state, meta, force=False):
    super().save(step, state, meta, force)
    self.saved[-1] = (step, meta["data_state"]["row"])


def test_checkpoints_record_the_steps_own_stream_position():
  """The loop reads batch k+1 while step k runs; step k's checkpoint still says k batches."""
  from oftjax import sharding
  from oftjax.train.loop import LoopIO, TrainStep, train_loop
  from oftjax.train.state import RunState

  ckpt, stream, step = _MetaCheckpoints(), _CountingStream(), _Compiled(99)
  state, stats = train_loop(
    _config(),
    RunState({"w": jnp.zeros((2, 2))}, {}),
    TrainStep(step, {}, sharding.make_mesh("")),
    LoopIO(stream, ckpt, None, {}, types.SimpleNamespace(stop=False)),
  )
  assert ckpt.saved == [(2, 2), (4, 4), (6, 6)]
  assert state.data_state == {"epoch": 0, "row": 6} and stream.rows == 6  # none read past the end
  assert step.calls == 6 and stats.tokens == 6 * 4
