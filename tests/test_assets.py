"""Tests of the shipped assets: tokenizer, corpus and task files, and the tiny Gemma 3 base."""

import importlib.util
import json
import os

import numpy as np
import pytest

from oftjax import data

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
ASSETS = os.path.join(ROOT, "experiments", "assets")
MODEL_DIR = os.path.join(ASSETS, "tiny-gemma3")
FILES = [
  "tokenizer/tokenizer.json",
  "tokenizer/tokenizer_config.json",
  "tokenizer/special_tokens_map.json",
  "pretrain/train.jsonl",
  "task/train.jsonl",
  "task/eval.jsonl",
  "task/retention.jsonl",
  "tiny-gemma3/config.json",
  "tiny-gemma3/model.safetensors",
  "tiny-gemma3/tokenizer.json",
  "tiny-gemma3/tokenizer_config.json",
]


def load_make_assets():
  spec = importlib.util.spec_from_file_location(
    "make_assets", os.path.join(ROOT, "experiments", "make_assets.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def tok():
  from transformers import AutoTokenizer

  return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def base():
  from oftjax.models import gemma

  return gemma.load(MODEL_DIR)


def read_jsonl(rel):
  with open(os.path.join(ASSETS, rel), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_assets_exist_and_are_small():
  for rel in FILES:
    assert os.path.isfile(os.path.join(ASSETS, rel)), rel
  total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ASSETS) for f in fs)
  assert total < 8 * 1024**2


def test_assets_are_reproducible(tmp_path):
  make_assets = load_make_assets()
  for rel, records in make_assets.build_datasets(0).items():
    assert read_jsonl(rel) == records, rel
  make_assets.build_tokenizer(tmp_path)
  for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    with open(tmp_path / name) as new, open(os.path.join(ASSETS, "tokenizer", name)) as shipped:
      assert json.load(new) == json.load(shipped), name


def test_held_out_sets_are_disjoint_from_training():
  def words(rel):
    return {r["prompt"].split(" ")[1] for r in read_jsonl(rel)}

  seen = words("pretrain/train.jsonl") | words("task/train.jsonl")
  assert not words("task/eval.jsonl") & seen
  assert not words("task/retention.jsonl") & seen
  assert {r["prompt"].split(" ")[0] for r in read_jsonl("task/eval.jsonl")} == {"shout"}


def test_tokenizer_loads_and_round_trips(tok):
  text = "shout abc:CBA\n" + "".join(chr(i) for i in range(32, 127))
  encoded = tok(text).input_ids
  assert encoded[0] == tok.bos_token_id and len(encoded) == len(text) + 1
  assert tok.decode(encoded, skip_special_tokens=True) == text
  assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
  with open(os.path.join(MODEL_DIR, "config.json")) as f:
    assert json.load(f)["vocab_size"] == len(tok)
  chat = tok.apply_chat_template(
    [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
  )
  assert chat == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"


def test_model_loads_in_oftjax_and_transformers_with_equal_logits(tok, base):
  import torch
  from transformers import AutoModelForCausalLM

  model, params = base
  assert model.config.generation == 3 and model.config.sliding_window is not None
  assert any(model.config.layer_is_sliding) and not all(model.config.layer_is_sliding)
  prompts = ["reverse abcdefgh:hgfedcba", "shout qwertyui:IUYTREWQ", "copy zz:zz"]
  tokens, mask = data.pad_prompts([np.asarray(tok(p).input_ids) for p in prompts], side="right")
  ours = np.asarray(model.apply({"params": params}, tokens, attention_mask=mask))
  hf = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
  with torch.no_grad():
    theirs = hf(
      input_ids=torch.tensor(tokens, dtype=torch.long),
      attention_mask=torch.tensor(mask, dtype=torch.long),
    ).logits.numpy()
  real = mask.astype(bool)
  np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4, rtol=0)


def test_base_does_pretraining_skills_but_not_the_new_task(tok, base):
  from oftjax.models import gemma

  model, params = base
  retention = data.load_eval_set(os.path.join(ASSETS, "task", "retention.jsonl"), tok, 40)
  task = data.load_eval_set(os.path.join(ASSETS, "task", "eval.jsonl"), tok, 40)
  tokens, mask, _ = next(data.eval_batches(retention + task, len(retention + task)))  # one compile
  new = np.asarray(
    gemma.generate(model, params, tokens, mask, max_new_tokens=10, eos_token_id=tok.eos_token_id)
  )
  assert data.exact_match_accuracy(tok, new[:40], [x.expected for x in retention]) >= 0.9
  assert data.exact_match_accuracy(tok, new[40:], [x.expected for x in task]) <= 0.1
