"""Helpers for tests of the finetuning job: tiny random Gemma 3 folders, flags and runners.

The session fixtures built from them (``tiny_model_dir``, ``tiny_multimodal_dir``) are in
``conftest.py``.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "experiments", "assets")
SCRIPT = os.path.join(ROOT, "experiments", "finetune_gemma.py")


def tiny_text_config(tok):
  """The tiny Gemma 3 text config of the job tests (2 layers, width 64) for tokenizer ``tok``."""
  import transformers

  return transformers.Gemma3TextConfig(
    vocab_size=len(tok),
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=16,
    sliding_window=16,
    max_position_embeddings=256,
    pad_token_id=tok.pad_token_id,
    bos_token_id=tok.bos_token_id,
    eos_token_id=tok.eos_token_id,
  )


def shipped_tokenizer():
  import transformers

  return transformers.AutoTokenizer.from_pretrained(os.path.join(ASSETS, "tokenizer"))


def save_tiny_model(folder):
  """Saves a random tiny Gemma 3 text model (seed 0) and the shipped tokenizer into ``folder``."""
  import torch
  import transformers

  tok = shipped_tokenizer()
  torch.manual_seed(0)
  transformers.AutoModelForCausalLM.from_config(tiny_text_config(tok)).save_pretrained(folder)
  tok.save_pretrained(folder)


def save_tiny_multimodal_model(folder):
  """Saves a random tiny multimodal Gemma 3 (``Gemma3ForConditionalGeneration``, SigLIP
  tower, tied embeddings as gemma-3-4b ships) and the shipped tokenizer into ``folder``."""
  import multimodal_helpers

  tok = shipped_tokenizer()
  multimodal_helpers.save_multimodal_model(tiny_text_config(tok), folder)
  tok.save_pretrained(folder)


def job_args(model_dir, out, *extra):
  """Fast flags for the job on the tiny model."""
  return [
    "--model",
    model_dir,
    "--output-dir",
    str(out),
    "--steps",
    "6",
    "--batch-size",
    "4",
    "--log-every",
    "1",
    "--save-every",
    "3",
    "--eval-limit",
    "4",
    "--warmup-steps",
    "1",
    "--lr",
    "0.05",
    *extra,
  ]


def run_job(args, timeout=300, env=None):
  """Runs the job in a subprocess (extra ``env`` variables allowed); returns CompletedProcess."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
  return subprocess.run(
    [sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout, env=env
  )


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
