"""Data sources (oftjax.data.sources): Parquet and datasets folders equal JSONL; one-line errors."""

import json
import os
import subprocess
import sys

import datasets
import numpy as np
import pandas as pd
import pytest

from oftjax import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_DIR = os.path.join(ROOT, "experiments", "assets", "tokenizer")
SEQ_LEN = 32

TEXT = [{"text": " ".join(f"w{i}" for i in range(40))}, {"text": "short"}, {"text": "a b c d"}]
PROMPTS = [{"prompt": f"copy {w}:", "completion": w} for w in ("ab", "xyz", "q", "hello")]
CHATS = [
  {"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]}
  for u, a in (("hi", "yo"), ("copy ab", "ab"), ("2+2?", "4"))
]


@pytest.fixture(scope="module")
def tok():
  return data.load_tokenizer(TOKENIZER_DIR)


def as_jsonl(folder, records, name="data.jsonl"):
  path = folder / name
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


def as_parquet(folder, records, name="data.parquet"):
  path = str(folder / name)
  pd.DataFrame(records).to_parquet(path)
  return path


def as_dataset_folder(folder, records, name="saved"):
  path = str(folder / name)
  datasets.Dataset.from_list(records).save_to_disk(path)
  return path


def as_dataset_dict_folder(folder, records, name="saved_dict"):
  path = str(folder / name)
  table = datasets.Dataset.from_list(records)
  datasets.DatasetDict({"train": table, "test": table.select([0])}).save_to_disk(path)
  return path


def batches(dataset, count=4):
  stream = data.PackedBatches(dataset.examples, batch_size=2, seq_len=SEQ_LEN, seed=1)
  return [next(stream) for _ in range(count)]


@pytest.mark.parametrize("records", [TEXT, PROMPTS, CHATS], ids=["text", "prompt", "messages"])
def test_parquet_and_save_to_disk_give_the_batches_of_jsonl(records, tmp_path, tok):
  jsonl_set = data.load_dataset(as_jsonl(tmp_path, records), tok, SEQ_LEN)
  want = batches(jsonl_set)
  sources = {
    "parquet": (as_parquet(tmp_path, records), None),
    "parquet without suffix": (as_parquet(tmp_path, records, "table.bin"), None),
    "save_to_disk": (as_dataset_folder(tmp_path, records), None),
    "DatasetDict": (as_dataset_dict_folder(tmp_path, records), "train"),
  }
  for kind, (source, split) in sources.items():
    other = data.load_dataset(source, tok, SEQ_LEN, split=split)
    assert other.format == jsonl_set.format and other.num_split == jsonl_set.num_split, kind
    assert [e.line for e in other.examples] == [e.line - 1 for e in jsonl_set.examples], kind
    for got, expected in zip(batches(other), want):
      for key in data.BATCH_KEYS:
        assert got[key].dtype == expected[key].dtype, (kind, key)
        np.testing.assert_array_equal(got[key], expected[key], err_msg=f"{kind} {key}")
  if records is TEXT:
    assert jsonl_set.num_split == 1  # the long document is split the same way from every source


def test_eval_sets_from_parquet_equal_jsonl(tmp_path, tok):
  for records in (PROMPTS, CHATS):
    want = data.load_eval_set(as_jsonl(tmp_path, records), tok)
    got = data.load_eval_set(as_parquet(tmp_path, records), tok)
    assert [x.expected for x in got] == [x.expected for x in want]
    assert [x.prompt_tokens.tolist() for x in got] == [x.prompt_tokens.tolist() for x in want]


def test_extra_columns_are_ignored_and_rows_are_named(tmp_path):
  records = [{**r, "id": i, "score": 0.5} for i, r in enumerate(PROMPTS)]
  got = data.read_records(as_parquet(tmp_path, records))
  assert [r.data for r in got] == PROMPTS and [r.place for r in got] == [
    f"row {i}" for i in range(4)
  ]


def _one_line_error(source, split=None):
  with pytest.raises(ValueError) as info:
    data.read_records(source, split)
  message = str(info.value)
  assert "\n" not in message and message.startswith(str(source)), message
  return message


def test_bad_sources_are_one_line_errors(tmp_path):
  garbage = tmp_path / "broken.parquet"
  garbage.write_bytes(b"PAR1 not really a parquet file")
  assert "not a readable Parquet file" in _one_line_error(str(garbage))
  assert "pandas.DataFrame.to_parquet" in _one_line_error(str(garbage))
  assert "no 'text', 'prompt'/'completion' or 'messages' column (columns: body, id)" in (
    _one_line_error(as_parquet(tmp_path, [{"body": "x", "id": 1}], "cols.parquet"))
  )
  assert "has a 'prompt' column but no 'completion' column" in _one_line_error(
    as_parquet(tmp_path, [{"prompt": "x"}], "half.parquet")
  )
  nulls = as_parquet(tmp_path, [{"text": "ok"}, {"text": None}], "nulls.parquet")
  assert _one_line_error(nulls).endswith("row 1: field 'text' must be a string, got NoneType")
  empty = as_parquet(tmp_path, pd.DataFrame({"text": pd.Series([], dtype=str)}), "empty.parquet")
  assert "has no rows" in _one_line_error(empty)
  folder = as_dataset_dict_folder(tmp_path, PROMPTS)
  assert _one_line_error(folder, "validation").endswith(
    "split='validation' not found; set split to one of: test, train"
  )
  assert "no split chosen; set split to one of: test, train" in _one_line_error(folder)
  assert "not one written by datasets.Dataset.save_to_disk" in _one_line_error(tmp_path)
  assert _one_line_error(tmp_path / "nope.jsonl").endswith("nope.jsonl: no such file")


def test_hub_id_offline_is_one_line_error():
  assert datasets.config.HF_HUB_OFFLINE  # conftest sets HF_HUB_OFFLINE=1: no network here
  message = _one_line_error("someone/no-such-dataset", "train")
  assert "cannot be fetched offline (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set)" in message
  assert "pass a local JSONL/Parquet file or save_to_disk folder" in message


def test_hub_ids_and_paths_are_told_apart():
  assert data.looks_like_hub_id("google/boolq") and data.looks_like_hub_id("imdb")
  for path in ("train.jsonl", "data/train.parquet", "/abs/x", "./x", "a/b/c", "../x"):
    assert not data.looks_like_hub_id(path), path


def test_datasets_offline_variable_alone_is_enough():
  """`HF_DATASETS_OFFLINE=1` without `HF_HUB_OFFLINE` (a fresh interpreter: datasets reads both
  when imported) gives the same one-line error, and no network is tried."""
  code = (
    "from oftjax import data\n"
    "try:\n  data.read_records('someone/no-such-dataset', 'train')\n"
    "except ValueError as e:\n  print(e)\n"
  )
  env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
  env.update(HF_DATASETS_OFFLINE="1", PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.count("\n") == 1 and "cannot be fetched offline" in proc.stdout, proc.stdout
