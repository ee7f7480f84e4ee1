"""Shared set-up of the reliability tests (faults, numerics, inputs; RELIABILITY.md).

The shared pieces (a tiny random Gemma 3, a small task, one finished reference run and a
JAX compilation cache for the subprocesses) live in one session folder, built once (the
`rel` fixture in `conftest.py`) and reused by `test_reliability_faults.py`,
`test_reliability_numerics.py` and `test_reliability_inputs.py`.
"""

import os
import shutil
import subprocess
import sys

from finetune_helpers import ASSETS, SCRIPT, save_tiny_model

from oftjax import atomic

STEPS = 24
SAVE_EVERY = 3


def shared_dir(tmp_path_factory):
  """One folder per pytest session: tiny model, small task, compile cache, reference run."""
  base = tmp_path_factory.getbasetemp() / "reliability"
  model = base / "tiny-gemma3"
  if not (model / "model.safetensors").exists():
    with atomic.replace_folder(model) as staging:
      save_tiny_model(staging)
    for name, count in (("train.jsonl", 200), ("eval.jsonl", 4)):  # 200: crosses an epoch
      with open(os.path.join(ASSETS, "task", name)) as f:
        (base / name).write_text("".join(f.readlines()[:count]))
  return base


def env_for(base):
  """Subprocess environment: CPU JAX with a persistent compile cache shared by all runs."""
  return {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "HF_HUB_OFFLINE": "1",
    "JAX_COMPILATION_CACHE_DIR": str(base / "jax-cache"),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
  }


def job(base, out, *extra, steps=STEPS):
  """Flags of the reliability runs (tiny model, small task, every step logged)."""
  return [
    "--model",
    str(base / "tiny-gemma3"),
    "--data",
    str(base / "train.jsonl"),
    "--eval-data",
    str(base / "eval.jsonl"),
    "--retention-data",
    "",
    "--output-dir",
    str(out),
    "--steps",
    str(steps),
    "--batch-size",
    "4",
    "--log-every",
    "1",
    "--save-every",
    str(SAVE_EVERY),
    "--keep-checkpoints",
    "2",
    "--eval-limit",
    "2",
    "--warmup-steps",
    "1",
    "--lr",
    "0.05",
    *extra,
  ]


def run(base, args, timeout=300):
  return subprocess.run(
    [sys.executable, SCRIPT, *args],
    capture_output=True,
    text=True,
    timeout=timeout,
    env=env_for(base),
  )


def reference_run(base):
  """The uninterrupted run every fault is compared with (run once per session)."""
  out = base / "reference"
  if not (out / "summary.json").exists():
    shutil.rmtree(out, ignore_errors=True)
    proc = run(base, job(base, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (base / "reference.stdout").write_text(proc.stdout)
  return out
