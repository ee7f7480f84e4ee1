"""Shared fixtures for tests of the finetuning job: a tiny random Gemma 3 folder and runners."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "experiments", "assets")
SCRIPT = os.path.join(ROOT, "experiments", "finetune_gemma.py")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
  """A random tiny Gemma 3 text model saved by transformers, with the shipped tokenizer."""
  import torch
  import transformers

  folder = str(tmp_path_factory.mktemp("tiny-gemma3"))
  tok = transformers.AutoTokenizer.from_pretrained(os.path.join(ASSETS, "tokenizer"))
  config = transformers.Gemma3TextConfig(
      vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=16,
      max_position_embeddings=256, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
      eos_token_id=tok.eos_token_id)
  torch.manual_seed(0)
  transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
  tok.save_pretrained(folder)
  return folder


@pytest.fixture(scope="session")
def tiny_multimodal_dir(tmp_path_factory):
  """A random tiny multimodal Gemma 3 (``Gemma3ForConditionalGeneration``, SigLIP tower,
  tied embeddings as gemma-3-4b ships), with the shipped tokenizer."""
  import transformers

  import multimodal_helpers

  folder = str(tmp_path_factory.mktemp("tiny-gemma3-multimodal"))
  tok = transformers.AutoTokenizer.from_pretrained(os.path.join(ASSETS, "tokenizer"))
  text = transformers.Gemma3TextConfig(
      vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=16,
      max_position_embeddings=256, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
      eos_token_id=tok.eos_token_id)
  multimodal_helpers.save_multimodal_model(text, folder)
  tok.save_pretrained(folder)
  return folder


def job_args(model_dir, out, *extra):
  """Fast flags for the job on the tiny model."""
  return ["--model", model_dir, "--output-dir", str(out), "--steps", "6", "--batch-size", "4",
          "--log-every", "1", "--save-every", "3", "--eval-limit", "4", "--warmup-steps", "1",
          "--lr", "0.05", *extra]


def run_job(args, timeout=300, env=None):
  """Runs the job in a subprocess (extra ``env`` variables allowed); returns CompletedProcess."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
  return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                        timeout=timeout, env=env)


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
