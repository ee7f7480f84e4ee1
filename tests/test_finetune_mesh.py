"""The job on a device mesh: a checkpoint saved under one mesh resumes under another."""

import os
import shutil

from finetune_helpers import job_args, read_jsonl, run_job
import numpy as np
import pytest
import safetensors.numpy

FOUR_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}


@pytest.mark.slow  # a heavy end-to-end run: CI's second stage
def test_checkpoint_from_one_mesh_resumes_on_another(tiny_model_dir, tmp_path):
  out = tmp_path / "run"
  args = ["--steps", "6", "--save-every", "3", "--batch-size", "8", "--keep-checkpoints", "3"]
  proc = run_job(job_args(tiny_model_dir, out) + args + ["--mesh", "fsdp=4"], env=FOUR_DEVICES)
  assert proc.returncode == 0, proc.stderr[-2000:]
  reference = safetensors.numpy.load_file(out / "peft_adapter" / "adapter_model.safetensors")
  ref_rows = read_jsonl(out / "metrics.jsonl")
  shutil.rmtree(out / "checkpoints" / "6")
  os.remove(out / "summary.json")
  proc = run_job(
    job_args(tiny_model_dir, out, "--resume") + args + ["--mesh", "data=2,fsdp=2"], env=FOUR_DEVICES
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "resumed from step 3" in proc.stdout
  resumed = safetensors.numpy.load_file(out / "peft_adapter" / "adapter_model.safetensors")
  for key, value in reference.items():
    np.testing.assert_allclose(resumed[key], value, atol=1e-5)
  rows = read_jsonl(out / "metrics.jsonl")
  np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in ref_rows], atol=1e-5)
  assert (out / "summary.json").exists()
