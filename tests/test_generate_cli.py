"""experiments/generate.py: an adapter equals its merged folder and transformers' greedy `generate`;
streaming; chat prompts as the tokenizer's chat template renders them; one-line errors."""

import io
import json
import os
import subprocess
import sys

from finetune_helpers import ROOT, shipped_tokenizer
import numpy as np
import pytest

from oftjax import data
from oftjax.train import generate_cli

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
import peft_helpers as PH  # noqa: E402  (needs torch and peft)

SCRIPT = os.path.join(ROOT, "experiments", "generate.py")
NEW = 12
PROMPTS = ["shout fqcp:", "reverse abc de:", "x"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def folders(tiny_model_dir, tmp_path_factory):
  """A nonzero random PEFT OFT adapter on the tiny model, and PEFT's own merge of it."""
  root = tmp_path_factory.mktemp("generate")
  hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
  config = peft.OFTConfig(
    r=0, oft_block_size=16, num_cayley_neumann_terms=6, target_modules=TARGETS
  )
  model = peft.get_peft_model(hf, config)
  PH.randomize_adapter_(model, seed=3, std=0.05)
  model.save_pretrained(str(root / "adapter"))
  merged = model.merge_and_unload()
  merged.save_pretrained(str(root / "merged"))
  shipped_tokenizer().save_pretrained(str(root / "merged"))
  return {"base": tiny_model_dir, "adapter": str(root / "adapter"), "merged": str(root / "merged")}


def _cli(*argv):
  """Runs the command in this process; returns (exit code, stdout text)."""
  out = io.StringIO()
  code = generate_cli.main([str(a) for a in argv], out=out)
  return code, out.getvalue()


def _records(*argv):
  code, text = _cli(*argv, "--output", "-")
  assert code == 0
  return [json.loads(line) for line in text.splitlines()]


def _hf_greedy(folder, prompt_ids, stop, pad):
  """transformers' greedy `generate` on left-padded prompts; each row cut after its stop."""
  tokens, mask = data.pad_prompts(prompt_ids, pad, "left")
  hf = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
  with torch.no_grad():
    out = hf.generate(
      torch.as_tensor(tokens, dtype=torch.long),
      attention_mask=torch.as_tensor(mask),
      max_new_tokens=NEW,
      do_sample=False,
      eos_token_id=stop,
      pad_token_id=pad,
    )
  rows = []
  for row in out[:, tokens.shape[1] :].tolist():
    ends = [i for i, t in enumerate(row) if t in stop]
    rows.append(row[: ends[0] + 1] if ends else row)
  return rows


@pytest.mark.slow
def test_adapter_equals_merged_and_transformers(folders, tmp_path):
  """Ours (import + fold, or unmerged) == PEFT's merge run by us == transformers on it."""
  common = ["--prompts", tmp_path / "p.jsonl", "--max-new-tokens", NEW, "--batch-size", 2]
  (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
  adapter = _records("--model", folders["base"], "--adapter", folders["adapter"], *common)
  merged = _records("--merged", folders["merged"], *common)
  assert [r["prompt"] for r in adapter] == PROMPTS
  assert [r["tokens"] for r in adapter] == [r["tokens"] for r in merged]
  assert [r["completion"] for r in adapter] == [r["completion"] for r in merged]
  unmerged = _records(
    "--model", folders["base"], "--adapter", folders["adapter"], "--unmerged", *common
  )
  assert unmerged == adapter

  tok = shipped_tokenizer()
  stop, ids = data.default_stop_ids(tok), [data.text_prompt(tok, p).tokens for p in PROMPTS]
  theirs = _hf_greedy(folders["merged"], ids, stop, tok.pad_token_id)
  assert [r["tokens"] for r in merged] == theirs
  assert sum(len(r) for r in theirs) >= 2 * len(PROMPTS)  # not a string of instant stops
  assert _hf_greedy(folders["base"], ids, stop, tok.pad_token_id) != theirs  # adapter acts
  for r in merged:
    assert r["finish_reason"] == ("stop" if r["tokens"][-1] in stop else "length")
    assert r["completion"] == data.decode_completion(tok, r["tokens"])


class _Writes(io.StringIO):
  """Counts the writes (a streamed completion arrives in several)."""

  def __init__(self):
    super().__init__()
    self.writes = []

  def write(self, text):
    self.writes.append(text)
    return super().write(text)


def test_streams_batch_of_one_and_writes_jsonl(folders, tmp_path):
  out, path = _Writes(), tmp_path / "out.jsonl"
  argv = ["--merged", folders["merged"], "--prompt", PROMPTS[0], "--prompt", PROMPTS[1]]
  argv += ["--max-new-tokens", NEW, "--output", path, "--temperature", "0"]
  assert generate_cli.main([str(a) for a in argv], out=out) == 0
  records = [json.loads(line) for line in path.read_text().splitlines()]
  assert out.getvalue() == "".join(r["completion"] + "\n" for r in records)
  longest = max(records, key=lambda r: len(r["completion"]))
  assert len(longest["completion"]) >= 3
  assert len(out.writes) >= len(longest["completion"]) // 2 + 2  # token by token, not at once


def test_sampling_is_seeded_and_cold_sampling_is_greedy(folders):
  common = ["--merged", folders["merged"], "--prompt", PROMPTS[0], "--max-new-tokens", NEW]
  greedy = _records(*common)
  cold = _records(*common, "--temperature", "1e-5", "--seed", "4")
  hot = [_records(*common, "--temperature", "3", "--top-p", "0.95", "--seed", s) for s in "556"]
  assert cold == greedy
  assert hot[0] == hot[1] and hot[0] != hot[2]


def test_chat_prompts_render_as_the_chat_template():
  tok = shipped_tokenizer()
  messages = [{"role": "user", "content": "What is 2+3?"}]
  ours = data.text_prompt(tok, "What is 2+3?", use_chat=True).tokens.tolist()
  theirs = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
  theirs = theirs["input_ids"] if isinstance(theirs, dict) or hasattr(theirs, "keys") else theirs
  assert ours == list(theirs)
  chat = messages + [{"role": "assistant", "content": "5"}, {"role": "user", "content": "And 1+1?"}]
  ours = data.chat_prompt_ids(tok, chat).tolist()
  theirs = tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)
  theirs = theirs["input_ids"] if hasattr(theirs, "keys") else theirs
  assert ours == list(theirs)


def test_prompts_file_reads_eval_records(tmp_path):
  """The job's eval files are prompts files: prompt/completion and a closing assistant turn."""
  tok = shipped_tokenizer()
  path = tmp_path / "mixed.jsonl"
  turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
  lines = [{"prompt": "shout ab:", "completion": "BA"}, {"messages": turn}, {"messages": turn[:1]}]
  path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
  prompts = data.read_prompts(path, tok)
  assert [p.expected for p in prompts] == ["BA", "yo", None]
  assert [p.line for p in prompts] == [1, 2, 3]
  assert prompts[0].tokens.tolist() == data.text_prompt(tok, "shout ab:").tokens.tolist()
  np.testing.assert_array_equal(prompts[1].tokens, prompts[2].tokens)  # both open the reply
  for i, line in enumerate(lines[:2]):  # the evaluator's prompts of the same records
    (tmp_path / "one.jsonl").write_text(json.dumps(line) + "\n")
    record = data.read_jsonl(tmp_path / "one.jsonl")[0]
    item = data.make_eval_example(record, tok)
    np.testing.assert_array_equal(item.prompt_tokens, prompts[i].tokens)


def test_adapter_accepts_a_run_folder(folders, tmp_path):
  run = tmp_path / "run"
  run.mkdir()
  os.symlink(folders["adapter"], run / "peft_adapter")
  assert generate_cli.adapter_folder(str(run)) == str(run / "peft_adapter")
  assert generate_cli.adapter_folder(folders["adapter"]) == folders["adapter"]


@pytest.mark.parametrize(
  "argv, words",
  [
    (["--adapter", "A", "--merged", "M", "--prompt", "x"], "not allowed with argument"),
    ([], "no prompt: pass --prompt TEXT or --prompts FILE.jsonl"),
    (["--prompt", "x", "--prompts", "F"], "--prompt and --prompts contradict"),
    (["--model", "/no/such/folder", "--prompt", "x"], "--model /no/such/folder: no such folder"),
    (["--merged", "/no/such/folder", "--prompt", "x"], "--merged /no/such/folder: no such"),
    (["--adapter", "/no/such/folder", "--prompt", "x"], "--adapter /no/such/folder: no such"),
    (["--prompts", "/no/such/file.jsonl"], "--prompts /no/such/file.jsonl: no such file"),
    (["--prompt", "x", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--prompt", "x", "--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["--prompt", "x", "--top-k", "0"], "--top-k must be >= 1"),
    (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens must be a positive"),
    (["--prompt", "x", "--unmerged"], "--unmerged needs --adapter"),
  ],
)
def test_bad_flags_are_one_line(capsys, argv, words):
  code, text = _cli(*argv)
  err = capsys.readouterr().err
  assert code == 2 and text == ""
  assert err.count("\n") == 1 and err.startswith("error: ") and words in err, err


def test_bad_files_are_one_line(capsys, tiny_model_dir, tmp_path):
  empty, bad, plain = tmp_path / "empty.jsonl", tmp_path / "bad.jsonl", tmp_path / "plain"
  empty.write_text("\n\n")
  bad.write_text('{"prompt": "a"}\n{"text": "b"}\n')
  plain.mkdir()
  cases = [
    (["--prompts", empty], f"--prompts: {empty}: file is empty"),
    (["--prompts", bad], f"--prompts: {bad} line 2: expected an object with a 'prompt'"),
    (["--adapter", plain, "--prompt", "x"], "holds neither adapter_config.json"),
    (["--prompt", "x", "--temperature", "inf"], "--temperature must be a finite number"),
  ]
  for argv, words in cases:
    code, _ = _cli("--model", tiny_model_dir, *argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and words in err, err


def test_script_exits_non_zero_with_one_line():
  proc = subprocess.run(
    [sys.executable, SCRIPT, "--adapter", "a", "--merged", "m", "--prompt", "x"],
    capture_output=True,
    text=True,
    timeout=120,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert proc.returncode == 2 and proc.stdout == ""
  assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: argument --merged")
