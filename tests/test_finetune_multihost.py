"""The job across 2 processes (jax.distributed on loopback, gloo): same losses as 1 process."""

import os
import sys

from finetune_helpers import SCRIPT, job_args, read_jsonl, run_job
import numpy as np
from process_group import free_port, run_group
import pytest


@pytest.mark.slow  # a heavy end-to-end run: CI's second stage
def test_two_process_job_matches_single_process(tiny_model_dir, tmp_path):
  args = ["--steps", "4", "--batch-size", "8", "--mesh", "data=2,fsdp=2"]
  single = tmp_path / "single"
  proc = run_job(
    job_args(tiny_model_dir, single) + args,
    env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
  )
  assert proc.returncode == 0, proc.stderr[-2000:]

  multi, port = tmp_path / "multi", free_port()
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
  }
  commands = [
    [
      sys.executable,
      SCRIPT,
      *job_args(tiny_model_dir, multi),
      *args,
      "--coordinator-address",
      f"127.0.0.1:{port}",
      "--num-processes",
      "2",
      "--process-id",
      str(i),
    ]
    for i in range(2)
  ]
  codes, output, _ = run_group(commands, env, bound=400)
  assert codes == [0, 0], output[-3000:]
  losses = [r["loss"] for r in read_jsonl(multi / "metrics.jsonl")]
  np.testing.assert_allclose(
    losses, [r["loss"] for r in read_jsonl(single / "metrics.jsonl")], atol=1e-5
  )
  assert (multi / "summary.json").exists() and (multi / "peft_adapter").is_dir()
