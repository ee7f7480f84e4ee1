"""The job continues a PEFT COFT adapter as PEFT would: every update is projected back."""

import json

from finetune_helpers import job_args, read_jsonl, run_job
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors.numpy")

EPS, BLOCK = 0.5, 16


@pytest.mark.slow
def test_job_keeps_a_coft_adapter_in_its_ball(tiny_model_dir, tmp_path):
  hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
  config = peft.OFTConfig(
    r=0,
    oft_block_size=BLOCK,
    coft=True,
    eps=EPS,
    num_cayley_neumann_terms=6,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
  )
  model = peft.get_peft_model(hf, config)
  torch.manual_seed(0)
  with torch.no_grad():  # far outside the ball (‖Q‖_F ≈ 1.5 per block, radius ≤ 0.25)
    for name, p in model.named_parameters():
      if "oft_R" in name:
        p.normal_(0.0, 0.1)
  model.save_pretrained(str(tmp_path / "coft"))

  out = tmp_path / "run"
  proc = run_job(
    job_args(
      tiny_model_dir,
      out,
      "--steps",
      "4",
      "--block-size",
      str(BLOCK),
      "--retention-data",
      "",
      "--init-adapter",
      str(tmp_path / "coft"),
    )
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = read_jsonl(out / "metrics.jsonl")
  assert len(rows) == 4 and all(0.99 < r["max_coft_ratio"] <= 1 + 1e-5 for r in rows), rows
  saved = json.loads((out / "peft_adapter" / "adapter_config.json").read_text())
  assert saved["coft"] is True and saved["eps"] == EPS
  weights = safetensors.load_file(str(out / "peft_adapter" / "adapter_model.safetensors"))
  assert weights
  for key, packed in weights.items():
    norms = np.sqrt(2.0) * np.linalg.norm(packed, axis=-1)
    np.testing.assert_array_less(norms, EPS / np.sqrt(packed.shape[0]) * (1 + 1e-5), err_msg=key)
