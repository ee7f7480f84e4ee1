"""The job on pretraining-style data: long `{"text"}` documents from Parquet, a loss-only eval set
from a `save_to_disk` folder (loss and perplexity in summary.json, no accuracy)."""

import importlib.util
import json
import math

import datasets
from finetune_helpers import SCRIPT, job_args, shipped_tokenizer
import pandas as pd
import pytest

_spec = importlib.util.spec_from_file_location("finetune_gemma_text", SCRIPT)
finetune = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(finetune)

SEQ_LEN = 32


def documents(count, words):
  return [" ".join(f"d{d}w{i}" for i in range(words + 7 * d)) for d in range(count)]


@pytest.mark.slow  # a heavy end-to-end run (~60 s on 2 busy cores): CI's second stage
def test_long_text_documents_train_every_token_and_eval_is_loss_only(
  tiny_model_dir, tmp_path, capsys
):
  train_docs = documents(3, 30) + ["a short one"]
  eval_docs = documents(2, 12)
  train = str(tmp_path / "train.parquet")
  pd.DataFrame({"text": train_docs, "source": "web"}).to_parquet(train)
  held_out = str(tmp_path / "eval")
  datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": eval_docs})}).save_to_disk(
    held_out
  )
  out = tmp_path / "out"
  argv = job_args(tiny_model_dir, out, "--data", train, "--eval-data", held_out)
  argv += ["--retention-data", "", "--seq-len", str(SEQ_LEN)]
  code = finetune.main(argv)
  captured = capsys.readouterr()
  assert code == 0, captured.err

  # Counted: per document of n tokens (BOS, text, EOS) its n - 1 targets; the shift excludes
  # only BOS. Split documents must train all of them (the library test checks the batches).
  tok = shipped_tokenizer()
  lengths = [len(tok.encode(t, add_special_tokens=False)) + 2 for t in train_docs]
  long = [n for n in lengths if n - 1 > SEQ_LEN]
  assert len(long) == 3
  summary = json.loads((out / "summary.json").read_text())
  assert summary["train_records"] == len(train_docs)
  assert summary["split_documents"] == len(long)
  assert summary["split_chunks"] == sum(-(-(n - 1) // SEQ_LEN) for n in long)
  assert summary["train_examples"] == summary["split_chunks"] + 1
  assert summary["train_target_tokens"] == sum(n - 1 for n in lengths)
  assert summary["truncated_examples"] == 0
  assert f"3 of 4 documents are longer than --seq-len {SEQ_LEN}" in captured.out

  for name in ("eval_before", "eval_after"):
    result = summary[name]
    assert set(result) == {"loss", "perplexity"}, result  # no made-up accuracy
    assert math.isfinite(result["loss"]) and result["loss"] > 0
    assert math.isclose(result["perplexity"], math.exp(result["loss"]), rel_tol=1e-12)
  assert summary["samples_after"] == []
  assert "perplexity" in captured.out and "accuracy" not in captured.out
