"""The job on Gemma 4 folders, text-only and multimodal, and its outputs in the PyTorch world.

The folders carry the shipped pretrained tiny Gemma 3's weights in Gemma 4's form
(`finetune_helpers.gemma4_from_tiny_gemma3`: KV sharing in the last layer, a double-wide
MLP, per-layer embeddings), so the job can learn the shipped task in a test's few dozen
steps: a random tiny model cannot (its accuracy stays 0, only its loss falls).
"""

import importlib.util
import json
import os

from finetune_helpers import SCRIPT, read_jsonl, run_job, save_tiny_gemma4_model, shipped_tokenizer
import gemma4_helpers as G
import numpy as np
import pytest

import oftjax
from oftjax import peft_io
from oftjax.models import gemma

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
import peft_helpers as PH  # noqa: E402  (needs torch and peft)

TOWERS = ("vision_tower", "audio_tower", "embed_vision", "embed_audio")
TWO_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  out = {}
  for kind in ("text", "multimodal"):
    folder = str(tmp_path_factory.mktemp(f"tiny-gemma4-{kind}"))
    save_tiny_gemma4_model(folder, multimodal=kind == "multimodal")
    out[kind] = folder
  return out


def _args(model_dir, out, *extra):
  return [
    "--model",
    model_dir,
    "--output-dir",
    str(out),
    "--eval-limit",
    "16",
    "--log-every",
    "5",
    "--save-every",
    "100",
    *extra,
  ]


def _tokens(text="shout fqcp: PCQF copy ab:"):
  return np.asarray([shipped_tokenizer().encode(text)], np.int64)


def _hf(folder):
  """A folder as users load it, asserting transformers reports no missing/unexpected keys."""
  with PH.captured_messages() as messages:
    model = transformers.AutoModelForCausalLM.from_pretrained(
      folder, attn_implementation="eager"
    ).eval()
  needles = ("key", "missing", "unexpected", "not initialized", "not used")
  assert not [m for m in messages if any(n in m.lower() for n in needles)], messages
  return model


def _naming(folder):
  return peft_io.ModuleNaming.from_layout(gemma.module_layout(gemma.read_hf_config(folder)))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["text", "multimodal"])
def test_job_learns_the_task_and_its_exports_agree_in_transformers(folders, kind, tmp_path):
  """OFT on attention and dense MLP; the adapter in PEFT equals the merged folder (1e-4)."""
  folder, out, merged_dir = folders[kind], tmp_path / "run", tmp_path / "merged"
  proc = run_job(_args(folder, out, "--steps", "40", "--export-merged", str(merged_dir)))
  assert proc.returncode == 0, proc.stderr[-2000:]
  summary = json.loads((out / "summary.json").read_text())
  before, after = summary["eval_before"], summary["eval_after"]
  assert before["accuracy"] == 0.0 and after["accuracy"] >= 0.25, (before, after)
  assert after["loss"] < before["loss"] / 4
  rows = read_jsonl(out / "metrics.jsonl")
  assert rows[-1]["step"] == 40 and rows[-1]["loss"] < rows[0]["loss"] / 2
  print(f"{kind}: train_tokens_per_s {summary['train_tokens_per_s']:.0f}")

  base = _hf(folder)
  assert type(base) is (
    transformers.Gemma4ForConditionalGeneration
    if kind == "multimodal"
    else transformers.Gemma4ForCausalLM
  )
  tokens = _tokens()
  base_logits = PH.logits(base, tokens)
  peft_model = PH.load_peft(base, str(out / "peft_adapter"))  # no key warnings, every tensor
  wrapped = PH.tuner_modules(peft_model)
  prefix = "model.language_model.layers." if kind == "multimodal" else "model.model.layers."
  assert wrapped and all(prefix in m for m in wrapped), wrapped
  assert not [m for m in wrapped if any(t in m for t in TOWERS)]
  assert len(wrapped) == 4 * 5 + 3 * 2  # q/o/gate/up/down everywhere, k/v where they exist
  theirs = PH.logits(peft_model, tokens)
  merged = _hf(str(merged_dir))
  merged_logits = PH.logits(merged, tokens)
  assert np.abs(merged_logits - base_logits).max() > 1.0  # training moved the model
  np.testing.assert_allclose(theirs, merged_logits, atol=1e-4)
  if kind == "multimodal":  # the towers travel unchanged
    for name, value in base.model.vision_tower.state_dict().items():
      assert torch.equal(value, merged.model.vision_tower.state_dict()[name]), name

  # Greedy generation with the trained adapter (unmerged, in oftjax) = transformers on the
  # merged folder.
  model, params = gemma.load(folder)
  adapter, config = peft_io.import_peft(str(out / "peft_adapter"), naming=_naming(folder))
  tok = shipped_tokenizer()
  prompt = _tokens("shout fqcp:")
  ours = np.asarray(
    gemma.generate(
      oftjax.Adapted(model, config),
      oftjax.merge_params(params, adapter),
      prompt,
      max_new_tokens=6,
      eos_token_id=tok.eos_token_id,
    )
  )
  with torch.no_grad():
    ref = merged.generate(
      torch.as_tensor(prompt),
      max_new_tokens=6,
      do_sample=False,
      eos_token_id=tok.eos_token_id,
      pad_token_id=tok.pad_token_id,
    )
  ref = ref[:, prompt.shape[1] :].numpy()  # shorter when it stopped at EOS
  assert ref.shape[1] >= 3
  np.testing.assert_array_equal(ours[:, : ref.shape[1]], ref)
  assert (ours[:, ref.shape[1] :] == tok.pad_token_id).all()

  # --init-adapter from the exported adapter continues where the run ended (sharded over 2
  # devices for the text folder: the per-layer-embedding table is split too).
  again = tmp_path / "again"
  mesh = ["--mesh", "fsdp=2"] if kind == "text" else []
  proc = run_job(
    _args(
      folder,
      again,
      "--steps",
      "2",
      "--warmup-steps",
      "0",
      "--init-adapter",
      str(out / "peft_adapter"),
      *mesh,
    ),
    env=TWO_DEVICES if mesh else None,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  restarted = json.loads((again / "summary.json").read_text())
  assert abs(restarted["eval_before"]["loss"] - after["loss"]) < 1e-4
  assert restarted["eval_before"]["accuracy"] == after["accuracy"]


@pytest.mark.slow
def test_qoft_nf4_runs_on_gemma4(folders, tmp_path):
  out = tmp_path / "nf4"
  proc = run_job(
    _args(folders["text"], out, "--steps", "4", "--quantize", "nf4", "--warmup-steps", "0")
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  summary = json.loads((out / "summary.json").read_text())
  plain = 4 * summary["total_params"]  # fp32 bytes of the same parameters, unquantized
  assert summary["frozen_weight_bytes"] < 0.7 * plain, summary["frozen_weight_bytes"]
  assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"]
  assert (out / "peft_adapter" / "adapter_model.safetensors").exists()


_spec = importlib.util.spec_from_file_location("finetune_gemma", SCRIPT)
finetune = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(finetune)


def _refusal(capsys, argv):
  capsys.readouterr()  # what building the folder printed
  code = finetune.main(argv)
  err = capsys.readouterr().err.strip()
  assert code == 2, err
  assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
  return err


@pytest.mark.parametrize("targets", [r".*experts", r".*experts/gate_up_proj"])
def test_expert_targets_are_refused_in_one_line(tmp_path, capsys, targets):
  """The MoE experts are packed 3-D parameters, which neither OFT nor PEFT's OFT adapts."""
  pytest.importorskip("oftjax.models.gemma.gemma4_moe")
  folder = tmp_path / "moe"
  G.save_hf_model("moe", folder)
  shipped_tokenizer().save_pretrained(folder)
  out = tmp_path / "out"
  err = _refusal(
    capsys, _args(str(folder), out, "--steps", "2", "--block-size", "8", "--targets", targets)
  )
  assert "--targets" in err and "experts" in err and "packed" in err, err
  assert not out.exists()


def test_gemma3n_is_refused_in_one_line(tmp_path, capsys):
  folder = tmp_path / "g3n"
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps({"model_type": "gemma3n"}))
  shipped_tokenizer().save_pretrained(folder)
  out = tmp_path / "out"
  err = _refusal(capsys, _args(str(folder), out))
  assert "Gemma 3n" in err and "not supported" in err, err
  assert not out.exists() and os.path.isdir(folder)
