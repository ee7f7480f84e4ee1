"""The job's `--export-lora RANK` and `--oft-dropout P`: outputs, PEFT loading, flag errors."""

import json
import os

from finetune_helpers import job_args, run_job
import jax.numpy as jnp
import numpy as np
import pytest

import oftjax
from oftjax import params as P
from oftjax import peft_io
from oftjax.models import gemma
from oftjax.train import config as C

TARGETS = C.DEFAULT_TARGETS


@pytest.mark.slow  # one end-to-end run with PEFT loading its two adapters: ~60 s on 2 cores
def test_job_writes_a_lora_adapter_peft_loads(tiny_model_dir, tmp_path):
  pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  import peft_helpers as PH

  out = tmp_path / "run"
  proc = run_job(job_args(tiny_model_dir, out, "--export-lora", "4", "--oft-dropout", "0.25"))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "LoRA export at rank 4" in proc.stdout
  summary = json.loads((out / "summary.json").read_text())
  report = json.loads((out / "lora_export.json").read_text())
  assert summary["lora_export"]["rank"] == 4 and summary["config"]["oft_dropout"] == 0.25
  assert summary["lora_export"]["relative_error"] == report["relative_error"]
  assert 0.0 < report["relative_error"] < 1.0 and report["logits"]["max_abs_logit_error"] > 0
  assert len(report["layers"]) == 7
  lora_cfg = json.loads((out / "lora_adapter" / "adapter_config.json").read_text())
  oft_cfg = json.loads((out / "peft_adapter" / "adapter_config.json").read_text())
  assert lora_cfg["peft_type"] == "LORA" and lora_cfg["r"] == 4 and lora_cfg["lora_alpha"] == 4
  assert lora_cfg["target_modules"] == oft_cfg["target_modules"]
  assert oft_cfg["module_dropout"] == 0.25  # training only; PEFT ignores it at inference

  # the report is what the library measures on the trained adapter (read back from PEFT's file)
  model, base = gemma.load(tiny_model_dir)
  naming = peft_io.ModuleNaming.from_layout(
    gemma.module_layout(gemma.read_hf_config(tiny_model_dir))
  )
  adapter, config = peft_io.import_peft(str(out / "peft_adapter"), targets=TARGETS, naming=naming)
  adapted = oftjax.adapt(model, config, jnp.zeros((1, 4), jnp.int32))
  _, _, again = peft_io.lora_from_oft(P.merge_params(base, adapter), adapted.geometries, config, 4)
  np.testing.assert_allclose(again["relative_error"], report["relative_error"], rtol=1e-5)

  # PEFT loads the LoRA folder with no key warnings, and computes what our LoRA model does
  hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
  peft_model = PH.load_peft(hf, str(out / "lora_adapter"))
  tokens = np.random.default_rng(0).integers(3, 60, (2, 12))
  lora_tree, lora_config = peft_io.import_peft(
    str(out / "lora_adapter"), targets=TARGETS, naming=naming
  )
  assert lora_config.lora_alpha / lora_config.lora_rank == 1.0
  logits = oftjax.Adapted(model, lora_config).apply(
    {"params": P.merge_params(base, lora_tree)}, jnp.asarray(tokens, jnp.int32)
  )
  np.testing.assert_allclose(np.asarray(logits), PH.logits(peft_model, tokens), atol=1e-4)


@pytest.mark.parametrize(
  "flags, message",
  [
    (["--export-lora", "4", "--method", "lora"], "--export-lora converts an OFT adapter"),
    (["--export-lora", "-1"], "--export-lora must be a rank >= 1"),
    (["--oft-dropout", "0.1", "--method", "lora"], "--oft-dropout needs --method oft or oftv1"),
    (["--oft-dropout", "1.5"], r"--oft-dropout must be in \[0, 1\)"),
  ],
)
def test_bad_flags_are_one_line(tiny_model_dir, tmp_path, flags, message):
  argv = ["--model", tiny_model_dir, "--output-dir", str(tmp_path / "x"), *flags]
  with pytest.raises(C.UsageError, match=message) as e:
    C.parse_args(argv)
  assert "\n" not in str(e.value)
  assert not os.path.exists(tmp_path / "x")
