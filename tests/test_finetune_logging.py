"""The job's logging: eval rows (`--eval-every`), `--remat`, TensorBoard and W&B sinks."""

import importlib.util
import json
import os
import re
import shutil
import sys
import types

from event_files import read_scalars
from finetune_helpers import SCRIPT, job_args, read_jsonl
import numpy as np
import pytest

from oftjax.train import sinks
from oftjax.train.objective import lr_schedule

_spec = importlib.util.spec_from_file_location("finetune_gemma", SCRIPT)
finetune = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(finetune)


def _refused(capsys, argv) -> str:
  capsys.readouterr()
  code = finetune.main(argv)
  err = capsys.readouterr().err.strip()
  assert code == 2, err
  assert len(err.splitlines()) == 1 and "Traceback" not in err, err
  return err


@pytest.mark.parametrize("value", ["0", "-2"])
def test_eval_every_must_be_positive(capsys, tmp_path, value):
  err = _refused(capsys, ["--eval-every", value, "--output-dir", str(tmp_path / "run")])
  assert "--eval-every must be a positive integer" in err, err
  assert not (tmp_path / "run").exists()


def test_wandb_without_the_package_says_how_to_install_it(capsys, tmp_path, monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
  )
  err = _refused(capsys, ["--wandb", "--output-dir", str(tmp_path / "run")])
  assert "--wandb" in err and "pip install wandb" in err, err
  assert not (tmp_path / "run").exists()


def test_tensorboard_purge_hides_the_rows_a_resume_reruns(tmp_path):
  """A resumed writer (`purge_step`) hides what the first one logged at or after that step."""
  logdir = str(tmp_path / "tb")
  first = sinks.TensorBoardSink(logdir)
  for step in range(6):
    first.write({"kind": "train", "step": step, "loss": 10.0 + step})
  first.close()
  assert sinks.event_files(logdir)
  resumed = sinks.TensorBoardSink(logdir, purge_step=4)
  for step in range(4, 8):
    resumed.write({"kind": "train", "step": step, "loss": 20.0 + step})
  resumed.close()
  assert read_scalars(logdir) == {
    "train/loss": [
      (0, 10.0),
      (1, 11.0),
      (2, 12.0),
      (3, 13.0),
      (4, 24.0),
      (5, 25.0),
      (6, 26.0),
      (7, 27.0),
    ]
  }


def test_metrics_log_keeps_rows_up_to_the_checkpoint_and_leaves_out_speed(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  log = sinks.MetricsLog(path)
  for step in range(1, 5):
    log.write({"kind": "train", "step": step, "loss": float(step)})
    log.write({"kind": "speed", "step": step, "tokens_per_s": 1e3})
    if step % 2 == 0:
      log.write({"kind": "eval", "step": step, "loss": step / 2})
  with open(path, "a") as f:
    f.write('{"kind": "train", "step": 5, "lo')  # torn by a kill mid-write
  resumed = sinks.MetricsLog(path, resume_step=2)
  assert (
    resumed.rows
    == read_jsonl(path)
    == [
      {"kind": "train", "step": 1, "loss": 1.0},
      {"kind": "train", "step": 2, "loss": 2.0},
      {"kind": "eval", "step": 2, "loss": 1.0},
    ]
  )


class _FakeRun:
  def __init__(self, calls, **kwargs):
    self.calls = calls
    calls.append(("init", kwargs))

  def log(self, values, step):
    self.calls.append(("log", step, values))

  def finish(self):
    self.calls.append(("finish",))


def test_wandb_sink_logs_each_row_at_its_step_and_resumes_its_run(tmp_path, monkeypatch):
  """With a stand-in `wandb` module (the package is optional): what the sink asks of W&B."""
  calls = []
  fake = types.SimpleNamespace(init=lambda **kw: _FakeRun(calls, **kw))
  monkeypatch.setitem(sys.modules, "wandb", fake)
  first = sinks.WandbSink(str(tmp_path), {"lr": 0.1}, resume=False)
  first.write({"kind": "train", "step": 3, "loss": 1.5, "skipped": 0})
  first.write({"kind": "eval", "step": 3, "loss": 2.0, "accuracy": 0.25})
  first.close()
  again = sinks.WandbSink(str(tmp_path), {"lr": 0.1}, resume=True)
  init_a, init_b = calls[0][1], calls[4][1]
  assert init_a["id"] == init_b["id"] and init_a["resume"] == "allow"
  assert init_a["config"] == {"lr": 0.1} and init_a["dir"] == str(tmp_path)
  assert calls[1:4] == [
    ("log", 3, {"train/loss": 1.5, "train/skipped": 0.0}),
    ("log", 3, {"eval/loss": 2.0, "eval/accuracy": 0.25}),
    ("finish",),
  ]
  again.close()


def _expected_scalars(rows):
  """`{tag: [(step, float32 value)]}` of metrics.jsonl rows, tagged `<kind>/<name>`."""
  found = {}
  for row in rows:
    for name, value in row.items():
      if name not in ("kind", "step"):
        found.setdefault(f"{row['kind']}/{name}", []).append((row["step"], np.float32(value)))
  return found


def _run(capsys, argv) -> str:
  capsys.readouterr()
  code = finetune.main(argv)
  out, err = capsys.readouterr()
  assert code == 0, err[-2000:]
  return out + err


@pytest.mark.slow  # three tiny end-to-end runs
def test_eval_rows_tensorboard_and_remat_across_a_resume(tiny_model_dir, tmp_path, capsys):
  """Two runs, plain (layers unrolled, the CPU default) and `--remat full --unroll-layers
  off` (a rematerialised scan); the second loses its last checkpoint (a crash while
  saving step 6, after rows up to step 6 were logged) and resumes from step 3. Both end
  with the same rows: one eval row at 0, 2, 4, 6, one train row per step, the same
  numbers (fp32), and TensorBoard holds exactly metrics.jsonl's values (plus tokens/s)."""
  plain, remat = tmp_path / "plain", tmp_path / "remat"

  def args(out, *extra):
    return job_args(
      tiny_model_dir, out, "--eval-every", "2", "--tensorboard", str(out / "tb"), *extra
    )

  log = _run(capsys, args(plain, "--remat", "none"))
  assert "tok_s=" in log and re.search(r"\[\d\d:\d\d<\d\d:\d\d", log), log[
    -1500:
  ]  # tokens/s and ETA
  assert "step 2: eval loss" in log
  _run(capsys, args(remat, "--remat", "full", "--unroll-layers", "off"))
  shutil.rmtree(remat / "checkpoints" / "6")
  os.remove(remat / "summary.json")
  assert read_jsonl(remat / "metrics.jsonl")[-1]["step"] == 6  # rows past checkpoint 3 stay
  assert "resumed from step 3" in _run(
    capsys, args(remat, "--remat", "full", "--unroll-layers", "off", "--resume")
  )

  expected = [("eval", 0)]
  for step in range(1, 7):
    expected += [("train", step)] + ([("eval", step)] if step % 2 == 0 else [])
  rows = {out: read_jsonl(out / "metrics.jsonl") for out in (plain, remat)}
  for out in (plain, remat):
    assert [(r["kind"], r["step"]) for r in rows[out]] == expected, out
  for a, b in zip(rows[plain], rows[remat]):
    assert a.keys() == b.keys()
    assert a["kind"] == b["kind"] and a["step"] == b["step"]
    for key in a.keys() - {"kind", "step"}:
      np.testing.assert_allclose(
        b[key], a[key], rtol=2e-5, atol=1e-6, err_msg=str((a["step"], key))
      )

  summary = {out: json.loads((out / "summary.json").read_text()) for out in (plain, remat)}
  assert summary[plain]["remat"] == "none" and summary[remat]["remat"] == "full"
  assert summary[plain]["unroll_layers"] is True and summary[remat]["unroll_layers"] is False
  temp = {out: summary[out]["train_step_temp_bytes"] for out in (plain, remat)}
  print("train step temp bytes (tiny model):", temp)
  assert 0 < temp[remat] < temp[plain], temp
  evals = [
    {k: v for k, v in r.items() if k not in ("kind", "step")}
    for r in rows[plain]
    if r["kind"] == "eval"
  ]
  assert summary[plain]["eval_before"] == evals[0] and summary[plain]["eval_after"] == evals[-1]
  schedule = lr_schedule(0.05, 6, 1)  # job_args: --lr 0.05 --steps 6 --warmup-steps 1
  lrs = [r["lr"] for r in rows[plain] if r["kind"] == "train"]
  assert lrs == [float(schedule(k)) for k in range(6)]

  for out in (plain, remat):
    found = read_scalars(str(out / "tb"))
    speed = found.pop("speed/tokens_per_s")
    assert [s for s, _ in speed] == list(range(1, 7)) and all(v > 0 for _, v in speed), speed
    want = _expected_scalars(rows[out])
    assert found.keys() == want.keys(), out
    for tag, values in want.items():
      assert [(s, np.float32(v)) for s, v in found[tag]] == values, (out, tag)

  err = _refused(capsys, args(plain, "--output-dir", str(tmp_path / "other")))
  assert "--tensorboard" in err and "already holds event files" in err, err
  assert not (tmp_path / "other").exists()
