"""The job's outputs in the PyTorch world: the PEFT adapter and the merged export."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

import oftjax
from finetune_helpers import job_args, run_job, tiny_model_dir  # noqa: F401
from oftjax import peft_io
from oftjax.models import gemma

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TOKENS = np.array([[2, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]], np.int64)


@pytest.mark.parametrize("method", ["oft", "lora"])
def test_peft_adapter_and_merged_export_match_oftjax(tiny_model_dir, tmp_path, method):  # noqa: F811
  out, merged_dir = tmp_path / "run", tmp_path / "merged"
  proc = run_job(job_args(tiny_model_dir, out, "--method", method, "--export-merged",
                          str(merged_dir)))
  assert proc.returncode == 0, proc.stderr[-2000:]
  summary = json.loads((out / "summary.json").read_text())
  assert summary["method"] == method and summary["steps"] == 6

  model, base = gemma.load(tiny_model_dir)
  adapter, config = peft_io.import_peft(str(out / "peft_adapter"))
  wrapped = oftjax.Adapted(model, config)
  ours = np.asarray(wrapped.apply({"params": oftjax.merge_params(base, adapter)},
                                  jnp.asarray(TOKENS, jnp.int32)))
  base_logits = np.asarray(model.apply({"params": base}, jnp.asarray(TOKENS, jnp.int32)))
  assert np.abs(ours - base_logits).max() > 1e-3  # training moved the model

  hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
  peft_model = peft.PeftModel.from_pretrained(hf, str(out / "peft_adapter")).eval()
  with torch.no_grad():
    theirs = peft_model(torch.from_numpy(TOKENS)).logits.numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-4)

  merged = transformers.AutoModelForCausalLM.from_pretrained(str(merged_dir),
                                                             attn_implementation="eager")
  with torch.no_grad():
    merged_logits = merged(torch.from_numpy(TOKENS)).logits.numpy()
  np.testing.assert_allclose(merged_logits, ours, atol=1e-4)
  assert json.loads((out / "peft_adapter" / "adapter_config.json").read_text())["peft_type"] == \
      ("OFT" if method == "oft" else "LORA")
  assert os.path.exists(out / "loss.png")

  again = tmp_path / "again"
  proc = run_job(job_args(tiny_model_dir, again, "--method", method, "--steps", "2",
                          "--init-adapter", str(out / "peft_adapter")))
  assert proc.returncode == 0, proc.stderr[-2000:]
  restarted = json.loads((again / "summary.json").read_text())
  assert abs(restarted["eval_before"]["loss"] - summary["eval_after"]["loss"]) < 1e-4


def test_adapter_peft_cannot_hold_finishes_without_peft_export(tiny_model_dir, tmp_path):  # noqa: F811
  out = tmp_path / "n2"
  proc = run_job(job_args(tiny_model_dir, out, "--neumann-terms", "2", "--steps", "2",
                          "--warmup-steps", "0"))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "no peft_adapter/ will be written: num_terms=2 has no PEFT equivalent" in proc.stdout
  summary = json.loads((out / "summary.json").read_text())
  assert summary["peft_adapter"] is None and "num_terms=2" in summary["peft_export_skipped"]
  assert not (out / "peft_adapter").exists() and (out / "checkpoints").is_dir()
