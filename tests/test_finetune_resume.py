"""Determinism and crash safety of the job: SIGKILL mid-run, then --resume, is bit-identical."""

import os
import signal
import subprocess
import sys
import time

from finetune_helpers import SCRIPT, job_args, read_jsonl, run_job
import pytest
import safetensors.numpy


def _adapter(out):
  return safetensors.numpy.load_file(os.path.join(out, "peft_adapter", "adapter_model.safetensors"))


@pytest.mark.slow  # a heavy end-to-end run: CI's second stage
def test_kill_and_resume_equals_uninterrupted_run(tiny_model_dir, tmp_path):
  args = ["--steps", "12", "--save-every", "4"]
  first, second, killed = tmp_path / "a", tmp_path / "b", tmp_path / "k"
  for out in (first, second):
    proc = run_job(job_args(tiny_model_dir, out) + args)
    assert proc.returncode == 0, proc.stderr[-2000:]
  assert read_jsonl(first / "metrics.jsonl") == read_jsonl(second / "metrics.jsonl")
  assert len(read_jsonl(first / "metrics.jsonl")) == 12

  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  victim = subprocess.Popen(
    [sys.executable, SCRIPT, *job_args(tiny_model_dir, killed), *args],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
    env=env,
  )
  deadline = time.time() + 240
  while not (killed / "checkpoints" / "4").exists() and time.time() < deadline:
    assert victim.poll() is None, "run ended before it could be killed"
    time.sleep(0.05)
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  assert not (killed / "summary.json").exists()
  proc = run_job(job_args(tiny_model_dir, killed, "--resume") + args)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "resumed from step" in proc.stdout
  a, k = _adapter(first), _adapter(killed)
  assert a.keys() == k.keys()
  for key in a:
    assert a[key].tobytes() == k[key].tobytes(), key
  assert read_jsonl(killed / "metrics.jsonl") == read_jsonl(first / "metrics.jsonl")


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tiny_model_dir, tmp_path):
  out = tmp_path / "t"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen(
    [
      sys.executable,
      SCRIPT,
      *job_args(tiny_model_dir, out),
      "--steps",
      "400",
      "--save-every",
      "1000",
    ],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    env=env,
  )
  deadline = time.time() + 240
  while not (out / "metrics.jsonl").exists() and time.time() < deadline:
    time.sleep(0.05)
  time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  stdout, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0
  assert "rerun with --resume" in stdout
  assert os.listdir(out / "checkpoints")
  assert not (out / "summary.json").exists()
