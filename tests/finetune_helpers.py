"""Helpers for tests of the finetuning job: tiny random Gemma 3 folders, flags and runners.

The session fixtures built from them (`tiny_model_dir`, `tiny_multimodal_dir`) are in
`conftest.py`.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "experiments", "assets")
SCRIPT = os.path.join(ROOT, "experiments", "finetune_gemma.py")


def tiny_text_config(tok):
  """The tiny Gemma 3 text config of the job tests (2 layers, width 64) for tokenizer `tok`."""
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
  """Saves a random tiny Gemma 3 text model (seed 0) and the shipped tokenizer into `folder`."""
  import torch
  import transformers

  tok = shipped_tokenizer()
  torch.manual_seed(0)
  transformers.AutoModelForCausalLM.from_config(tiny_text_config(tok)).save_pretrained(folder)
  tok.save_pretrained(folder)


def save_tiny_multimodal_model(folder):
  """Saves a random tiny multimodal Gemma 3 (`Gemma3ForConditionalGeneration`, SigLIP
  tower, tied embeddings as gemma-3-4b ships) and the shipped tokenizer into `folder`."""
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
  """Runs the job in a subprocess (extra `env` variables allowed); returns CompletedProcess."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
  return subprocess.run(
    [sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout, env=env
  )


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def gemma4_from_tiny_gemma3(multimodal=False, shared_kv_layers=1, seed=0):
  """A transformers Gemma 4 carrying the shipped pretrained tiny Gemma 3's weights.

  A random tiny model cannot learn the shipped task in a test's few steps; this one starts
  from the pretraining skills. Each Gemma 3 weight goes where Gemma 4 has it: norms become
  `1 + w` (Gemma 4 multiplies by `w`), the attention scale `query_pre_attn_scalar**-0.5`
  is folded into `q_norm`, a double-wide MLP is zero-padded (the extra units output
  zero). Gemma 4's additions are kept small or neutral: per-layer embeddings (PLE) are
  random but their block's output norm has weight 0.02, `layer_scalar` is one. What changes the function: Gemma 4 normalises values (`v_norm`) and the last
  `shared_kv_layers` layers reuse an earlier layer's keys and values; the skills survive
  (greedy retention accuracy ~0.6, measured with transformers).

  Args:
    multimodal: a `Gemma4ForConditionalGeneration` (tiny random vision and audio towers)
      instead of a `Gemma4ForCausalLM`.
    shared_kv_layers: Gemma 4's `num_kv_shared_layers`.
    seed: seed of the PLE weights and the towers.

  Returns:
    The fp32 eager torch model (embeddings tied, as in the Gemma 3 checkpoint).
  """
  import gemma4_helpers
  import torch
  import transformers

  g3 = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(ASSETS, "tiny-gemma3"))
  c3, sd3 = g3.config, g3.state_dict()
  text = dict(
    vocab_size=c3.vocab_size,
    hidden_size=c3.hidden_size,
    intermediate_size=c3.intermediate_size,
    num_hidden_layers=c3.num_hidden_layers,
    num_attention_heads=c3.num_attention_heads,
    num_key_value_heads=c3.num_key_value_heads,
    head_dim=c3.head_dim,
    global_head_dim=c3.head_dim,
    sliding_window=c3.sliding_window,
    layer_types=list(c3.layer_types),
    hidden_size_per_layer_input=16,
    vocab_size_per_layer_input=c3.vocab_size,
    num_kv_shared_layers=shared_kv_layers,
    use_double_wide_mlp=True,
    final_logit_softcapping=None,
    max_position_embeddings=c3.max_position_embeddings,
    pad_token_id=c3.pad_token_id,
    bos_token_id=c3.bos_token_id,
    eos_token_id=c3.eos_token_id,
    rope_parameters={k: dict(v) for k, v in c3.rope_parameters.items()},
  )
  torch.manual_seed(seed)
  if multimodal:
    model = transformers.Gemma4ForConditionalGeneration(
      transformers.Gemma4Config(
        text_config=text,
        vision_config=gemma4_helpers.VISION,
        audio_config=gemma4_helpers.AUDIO,
        attn_implementation="eager",
      )
    )
    prefix = "model.language_model."
  else:
    model = transformers.Gemma4ForCausalLM(
      transformers.Gemma4TextConfig(**text, attn_implementation="eager")
    )
    prefix = "model."
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if not name.startswith(prefix) and name != "lm_head.weight":
        continue  # a tower: random as built
      key = "model." + name[len(prefix) :] if name.startswith(prefix) else name
      if key in sd3:
        src = sd3[key]
        if key.endswith("norm.weight"):
          src = (1.0 + src) * (c3.query_pre_attn_scalar**-0.5 if "q_norm" in key else 1.0)
        p.zero_()
        p[tuple(slice(0, n) for n in src.shape)] = src  # zero-padded when double-wide
      elif p.ndim <= 1:  # PLE norms: the block's output (after its norm) is small
        p.fill_(0.02 if "post_per_layer_input_norm" in key else 1.0)
      else:  # PLE table, gate and projections
        p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
  return model.eval()


def save_tiny_gemma4_model(folder, multimodal=False):
  """Saves `gemma4_from_tiny_gemma3` and the shipped tokenizer into `folder`."""
  gemma4_from_tiny_gemma3(multimodal).save_pretrained(folder)
  shipped_tokenizer().save_pretrained(folder)
