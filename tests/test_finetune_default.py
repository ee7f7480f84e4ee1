"""The shipped default run, in quick form: OFT teaches the tiny pretrained Gemma 3 a new task."""

import json

from finetune_helpers import read_jsonl, run_job


def test_default_job_learns_the_shipped_task_quickly(tmp_path):
  out = tmp_path / "default"
  proc = run_job(["--steps", "80", "--eval-limit", "32", "--output-dir", str(out)])
  assert proc.returncode == 0, proc.stderr[-2000:]
  summary = json.loads((out / "summary.json").read_text())
  gain = summary["eval_after"]["accuracy"] - summary["eval_before"]["accuracy"]
  assert gain >= 0.4, summary["eval_after"]
  assert summary["retention_before"] >= 0.9 and summary["retention_after"] >= 0.6
  assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"] / 5
  for key in (
    "model",
    "method",
    "steps",
    "trainable_params",
    "total_params",
    "train_tokens_per_s",
    "compile_s",
    "wall_s",
    "final_loss",
    "frozen_weight_bytes",
    "adapter_bytes",
  ):
    assert key in summary, key
  assert summary["trainable_params"] < 0.1 * summary["total_params"]
  phases = summary["phases"]  # each phase starts where the one before it ended
  order = sorted(phases, key=lambda p: phases[p]["start"])
  assert order[:6] == ["setup", "adapters", "load", "place", "eval_before", "train"]
  assert 0 < sum(p["s"] for p in phases.values()) <= summary["wall_s"]
  assert summary["train_steps_s"] < phases["train"]["s"]
  peaks = [phases[p]["peak_rss_bytes"] for p in order]
  assert peaks == sorted(peaks) and 0 < peaks[-1] <= summary["peak_rss_bytes"]
  rows = read_jsonl(out / "metrics.jsonl")
  assert rows[-1]["step"] == 80 and rows[-1]["loss"] < rows[0]["loss"]
  assert (out / "loss.png").stat().st_size > 1000
  assert (out / "peft_adapter" / "adapter_model.safetensors").exists()
  assert "accuracy 0.000 ->" in proc.stdout
