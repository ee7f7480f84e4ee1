"""The job's outputs in the PyTorch world: the PEFT adapter and the merged export."""

import json
import os

from finetune_helpers import job_args, run_job
import jax.numpy as jnp
import numpy as np
import pytest

import oftjax
from oftjax import peft_io
from oftjax.models import gemma
from oftjax.models.gemma import hf_names

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
import gemma_helpers as H  # noqa: E402  (needs torch)
import peft_helpers as PH  # noqa: E402  (needs torch and peft)

TOKENS = np.array([[2, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]], np.int64)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["oft", "lora"])
def test_peft_adapter_and_merged_export_match_oftjax(tiny_model_dir, tmp_path, method):
  out, merged_dir = tmp_path / "run", tmp_path / "merged"
  proc = run_job(
    job_args(tiny_model_dir, out, "--method", method, "--export-merged", str(merged_dir))
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  summary = json.loads((out / "summary.json").read_text())
  assert summary["method"] == method and summary["steps"] == 6

  model, base = gemma.load(tiny_model_dir)
  adapter, config = peft_io.import_peft(str(out / "peft_adapter"))
  wrapped = oftjax.Adapted(model, config)
  ours = np.asarray(
    wrapped.apply({"params": oftjax.merge_params(base, adapter)}, jnp.asarray(TOKENS, jnp.int32))
  )
  base_logits = np.asarray(model.apply({"params": base}, jnp.asarray(TOKENS, jnp.int32)))
  assert np.abs(ours - base_logits).max() > 1e-3  # training moved the model

  hf = transformers.AutoModelForCausalLM.from_pretrained(
    tiny_model_dir, attn_implementation="eager"
  )
  peft_model = PH.load_peft(hf, str(out / "peft_adapter"))
  with torch.no_grad():
    theirs = peft_model(torch.from_numpy(TOKENS)).logits.numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-4)

  merged = transformers.AutoModelForCausalLM.from_pretrained(
    str(merged_dir), attn_implementation="eager"
  )
  with torch.no_grad():
    merged_logits = merged(torch.from_numpy(TOKENS)).logits.numpy()
  np.testing.assert_allclose(merged_logits, ours, atol=1e-4)
  assert json.loads((out / "peft_adapter" / "adapter_config.json").read_text())["peft_type"] == (
    "OFT" if method == "oft" else "LORA"
  )
  assert os.path.exists(out / "loss.png")

  again = tmp_path / "again"
  proc = run_job(
    job_args(
      tiny_model_dir,
      again,
      "--method",
      method,
      "--steps",
      "2",
      "--init-adapter",
      str(out / "peft_adapter"),
    )
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  restarted = json.loads((again / "summary.json").read_text())
  assert abs(restarted["eval_before"]["loss"] - summary["eval_after"]["loss"]) < 1e-4


@pytest.mark.slow
def test_adapter_peft_cannot_hold_finishes_without_peft_export(tiny_model_dir, tmp_path):
  out = tmp_path / "n2"
  proc = run_job(
    job_args(tiny_model_dir, out, "--neumann-terms", "2", "--steps", "2", "--warmup-steps", "0")
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "no peft_adapter/ will be written: num_terms=2 has no PEFT equivalent" in proc.stdout
  summary = json.loads((out / "summary.json").read_text())
  assert summary["peft_adapter"] is None and "num_terms=2" in summary["peft_export_skipped"]
  assert not (out / "peft_adapter").exists() and (out / "checkpoints").is_dir()


def _naming(folder):
  return peft_io.ModuleNaming.from_layout(gemma.module_layout(gemma.read_hf_config(folder)))


@pytest.mark.slow
def test_job_on_a_multimodal_folder_exports_an_adapter_for_it(tiny_multimodal_dir, tmp_path):
  """gemma-3-4b+ layout: the adapter loads on Gemma3ForConditionalGeneration, tower untouched.

  OFT only (the job's default); LoRA on this layout is covered in tests/test_peft_interop.py.
  """
  out, merged_dir = tmp_path / "run", tmp_path / "merged"
  proc = run_job(job_args(tiny_multimodal_dir, out, "--export-merged", str(merged_dir)))
  assert proc.returncode == 0, proc.stderr[-2000:]
  adapter_dir = str(out / "peft_adapter")
  meta = json.loads((out / "peft_adapter" / "adapter_config.json").read_text())
  assert meta["peft_version"] == peft_io.PEFT_VERSION

  base = transformers.AutoModelForCausalLM.from_pretrained(
    tiny_multimodal_dir, attn_implementation="eager"
  ).eval()
  assert type(base) is transformers.Gemma3ForConditionalGeneration  # what users get
  base_logits = PH.logits(base, TOKENS)
  peft_model = PH.load_peft(base, adapter_dir)
  adapted = PH.tuner_modules(peft_model)
  assert adapted and all(".model.language_model.layers." in m for m in adapted), adapted
  assert not [m for m in adapted if "vision_tower" in m or "multi_modal_projector" in m]
  theirs = PH.logits(peft_model, TOKENS)

  merged, info = transformers.AutoModelForCausalLM.from_pretrained(
    str(merged_dir), attn_implementation="eager", output_loading_info=True
  )
  assert type(merged) is transformers.Gemma3ForConditionalGeneration  # the base's kind
  assert not any(info.values()), info  # no missing, unexpected or mismatched keys
  merged_logits = PH.logits(merged.eval(), TOKENS)
  scale = np.abs(merged_logits).max()
  assert np.abs(merged_logits - base_logits).max() > 1e-3 * scale  # training moved the model
  np.testing.assert_allclose(theirs, merged_logits, atol=1e-4 * max(scale, 1.0))

  model, params = gemma.load(tiny_multimodal_dir)
  source, exported = H.raw_tensors(tiny_multimodal_dir), H.raw_tensors(str(merged_dir))
  towers = [n for n in source if hf_names.is_tower_tensor(n, model.config)]
  assert towers and all(exported[n] == source[n] for n in towers)  # the tower, byte for byte
  adapter, config = peft_io.import_peft(adapter_dir, naming=_naming(tiny_multimodal_dir))
  ours = np.asarray(
    oftjax.Adapted(model, config).apply(
      {"params": oftjax.merge_params(params, adapter)}, jnp.asarray(TOKENS, jnp.int32)
    )
  )
  np.testing.assert_allclose(ours, merged_logits, atol=1e-4 * max(scale, 1.0))
