"""The shipped default run on an NF4-quantized base (QOFT), in quick form, and --quantize errors."""

import json

from finetune_helpers import read_jsonl, run_job
import pytest

FP32_FROZEN_BYTES = 1014016  # the shipped tiny Gemma 3's frozen tree in float32 (unquantized run)


@pytest.mark.slow
def test_qoft_nf4_learns_the_shipped_task_quickly(tmp_path):
  out = tmp_path / "qoft"
  proc = run_job(
    ["--quantize", "nf4", "--steps", "80", "--eval-limit", "32", "--output-dir", str(out)]
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  summary = json.loads((out / "summary.json").read_text())
  gain = summary["eval_after"]["accuracy"] - summary["eval_before"]["accuracy"]
  print(
    f"QOFT nf4: accuracy {summary['eval_before']['accuracy']:.3f} -> "
    f"{summary['eval_after']['accuracy']:.3f}, retention {summary['retention_before']:.3f} -> "
    f"{summary['retention_after']:.3f}, frozen {summary['frozen_weight_bytes']} B"
  )
  assert gain >= 0.4, summary["eval_after"]
  assert summary["retention_before"] >= 0.9 and summary["retention_after"] >= 0.6
  assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"] / 5
  assert summary["config"]["quantize"] == "nf4"
  # Kernels are ~97% of the fp32 tree; NF4 stores them in ~1/15 of that.
  assert summary["frozen_weight_bytes"] < 0.2 * FP32_FROZEN_BYTES
  rows = read_jsonl(out / "metrics.jsonl")
  assert rows[-1]["step"] == 80 and rows[-1]["loss"] < rows[0]["loss"]
  assert (out / "peft_adapter" / "adapter_model.safetensors").exists()


def test_quantize_flag_errors_are_one_line(tmp_path):
  proc = run_job(["--quantize", "nf4", "--method", "full", "--output-dir", str(tmp_path / "a")])
  assert proc.returncode == 2 and "--quantize needs --method" in proc.stderr
  assert "Traceback" not in proc.stderr and not (tmp_path / "a").exists()
  proc = run_job(["--quantize", "int4", "--output-dir", str(tmp_path / "b")])
  assert proc.returncode == 2 and "--quantize" in proc.stderr and "Traceback" not in proc.stderr
