"""Tests of oftjax.data: formats, masks, packing invariants, resumable order, input errors."""

import json
import os
import re

from hypothesis import given, settings
from hypothesis import strategies as st
import numpy as np
import pytest

from oftjax import data
from oftjax.train.config import reword

TOKENIZER_DIR = os.path.join(os.path.dirname(__file__), "..", "experiments", "assets", "tokenizer")


@pytest.fixture(scope="module")
def tok():
  return data.load_tokenizer(TOKENIZER_DIR)


def write(tmp_path, lines, name="data.jsonl"):
  path = tmp_path / name
  if isinstance(lines, bytes):
    path.write_bytes(lines)
  else:
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))
  return str(path)


def ids(tok, text):
  return list(tok.encode(text, add_special_tokens=False))


# ----------------------------------------------------------------------------- formats and masks


def test_prompt_completion_tokens_and_mask(tmp_path, tok):
  path = write(tmp_path, [{"prompt": "copy ab:", "completion": "ab"}])
  (ex,) = data.load_dataset(path, tok, 64).examples
  assert ex.tokens.tolist() == [tok.bos_token_id] + ids(tok, "copy ab:") + ids(tok, "ab") + [
    tok.eos_token_id
  ]
  assert ex.loss_mask.tolist() == [0] * 9 + [1, 1, 1]
  assert ex.line == 1 and ex.num_positions == len(ex.tokens) - 1


def test_text_record_has_loss_on_all_but_bos(tmp_path, tok):
  path = write(tmp_path, [{"text": "hello"}])
  ds = data.load_dataset(path, tok, 64)
  (ex,) = ds.examples
  assert ds.format == data.TEXT
  assert ex.tokens.tolist() == [tok.bos_token_id] + ids(tok, "hello") + [tok.eos_token_id]
  assert ex.loss_mask.tolist() == [0] + [1] * 6


def test_messages_mask_only_assistant_turns(tmp_path, tok):
  messages = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "yo"},
    {"role": "user", "content": "again"},
    {"role": "assistant", "content": "ok"},
  ]
  path = write(tmp_path, [{"messages": messages}])
  (ex,) = data.load_dataset(path, tok, 128).examples
  text = tok.decode(ex.tokens)
  assert text == tok.apply_chat_template(messages, tokenize=False)
  assert ex.tokens[0] == tok.bos_token_id and (ex.tokens == tok.bos_token_id).sum() == 1
  learned = tok.decode(ex.tokens[ex.loss_mask == 1])
  assert (
    learned == "yo<end_of_turn>ok<end_of_turn>"
  )  # the newline after the marker is never generated
  assert "hi" not in learned and "again" not in learned


def test_eval_set_prompt_completion_and_messages(tmp_path, tok):
  pc = write(tmp_path, [{"prompt": "copy ab:", "completion": "ab"}], "pc.jsonl")
  (item,) = data.load_eval_set(pc, tok)
  assert (
    item.prompt_tokens.tolist() == [tok.bos_token_id] + ids(tok, "copy ab:")
    and item.expected == "ab"
  )
  messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
  (item,) = data.load_eval_set(write(tmp_path, [{"messages": messages}], "m.jsonl"), tok)
  assert tok.decode(item.prompt_tokens) == tok.apply_chat_template(
    messages[:1], tokenize=False, add_generation_prompt=True
  )
  assert item.expected == "yo"
  with pytest.raises(ValueError, match="'text' records have no prompt"):
    data.load_eval_set(write(tmp_path, [{"text": "x"}], "t.jsonl"), tok)


def test_eval_batches_pad_left_and_exact_match(tok):
  items = [
    data.EvalExample(np.array([2, 10, 11], np.int32), "ab", 1),
    data.EvalExample(np.array([2, 12], np.int32), "c", 2),
    data.EvalExample(np.array([2], np.int32), "d", 3),
  ]
  batches = list(data.eval_batches(items, 2))
  assert [b[0].shape for b in batches] == [(2, 3), (2, 3)]
  tokens, mask, expected = batches[0]
  assert tokens.tolist() == [[2, 10, 11], [0, 2, 12]] and mask.tolist() == [[1, 1, 1], [0, 1, 1]]
  assert batches[1][2] == ["d"]  # the top-up row is not counted
  eos = tok.eos_token_id
  generated = [ids(tok, "ab") + [eos, 5], ids(tok, "cc") + [eos]]
  assert data.exact_match_accuracy(tok, generated, ["ab", "c"]) == 0.5
  assert data.decode_completion(tok, ids(tok, "x") + [eos] + ids(tok, "y")) == "x"


# ----------------------------------------------------------------------------- packing


def make_examples(lengths, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for i, n in enumerate(lengths):
    tokens = rng.integers(6, 100, n + 1).astype(np.int32)
    tokens[0] = 2
    mask = np.zeros(n + 1, np.int32)
    mask[rng.integers(1, n + 1) :] = 1
    out.append(data.Example(tokens, mask, i + 1))
  return out


def check_batch(batch, examples, seq_len):
  assert set(batch) == set(data.BATCH_KEYS)
  for row in range(batch["inputs"].shape[0]):
    seg, pos = batch["segment_ids"][row], batch["positions"][row]
    real = seg > 0
    n_real = int(real.sum())
    assert real[:n_real].all() and not real[n_real:].any(), "padding only at the end of a row"
    assert (np.diff(seg[:n_real]) >= 0).all() and (np.diff(seg[:n_real]) <= 1).all()
    if n_real:
      assert seg[0] == 1
    starts = np.flatnonzero(np.diff(np.concatenate([[0], seg])) != 0)
    for s in starts:
      if not real[s]:
        continue
      k = seg[s]
      span = np.flatnonzero(seg == k)
      assert (pos[span] == np.arange(len(span))).all(), "positions restart per segment"
      # inputs/targets of one segment are one example's tokens[:-1] / tokens[1:]
      full = np.concatenate([batch["inputs"][row, span], batch["targets"][row, span][-1:]])
      assert (batch["targets"][row, span][:-1] == batch["inputs"][row, span][1:]).all()
      assert any(len(e.tokens) == len(full) and (e.tokens == full).all() for e in examples)
    assert not batch["loss_mask"][row][~real].any() and not batch["inputs"][row][~real].any()
    assert not batch["positions"][row][~real].any()


def test_pack_batch_invariants():
  examples = make_examples([5, 12, 30, 63, 1, 7, 20, 40, 9, 33])
  stream = data.PackedBatches(examples, batch_size=3, seq_len=64, seed=1)
  for _ in range(6):
    check_batch(next(stream), examples, 64)


def test_every_example_once_per_epoch_and_loss_mask_shifted():
  examples = make_examples(list(range(1, 40)))
  stream = data.PackedBatches(examples, batch_size=4, seq_len=48, seed=3)
  rows = stream.epoch_rows(0)
  assert sorted(i for row in rows for i in row) == list(range(len(examples)))
  batch = data.make_batch(examples, rows[:1], 48)
  start = 0
  for i in rows[0]:
    n = examples[i].num_positions
    assert (batch["loss_mask"][0, start : start + n] == examples[i].loss_mask[1:]).all()
    start += n


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 32), min_size=1, max_size=60), st.integers(1, 8))
def test_pack_rows_property(lengths, max_open):
  rows = data.pack_rows(lengths, 32, max_open)
  assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
  assert all(sum(lengths[i] for i in row) <= 32 for row in rows)


def test_padding_fraction_is_low_on_shipped_task(tok):
  path = os.path.join(TOKENIZER_DIR, "..", "task", "train.jsonl")
  ds = data.load_dataset(path, tok, 64)
  stream = data.PackedBatches(ds.examples, batch_size=16, seq_len=64, seed=0)
  batch = next(stream)
  frac = data.padding_fraction(batch)
  assert frac == pytest.approx(float(np.mean(batch["segment_ids"] == 0)))
  assert frac < 0.15


def test_sequential_batches_cover_everything_once():
  examples = make_examples([10, 50, 3, 3, 60, 20, 7])
  batches = list(data.sequential_batches(examples, batch_size=2, seq_len=64))
  assert all(b["inputs"].shape == (2, 64) for b in batches)
  total = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
  assert total == sum(e.num_positions for e in examples)
  for b in batches:
    check_batch(b, examples, 64)


# ----------------------------------------------------------------------------- order and resume


def take(stream, n):
  return [next(stream) for _ in range(n)]


def same(a, b):
  return all((x[k] == y[k]).all() for x, y in zip(a, b) for k in data.BATCH_KEYS)


def test_order_is_deterministic_and_seeded():
  examples = make_examples(list(np.random.default_rng(0).integers(3, 30, 50)))
  a = take(data.PackedBatches(examples, batch_size=4, seq_len=32, seed=7), 8)
  b = take(data.PackedBatches(examples, batch_size=4, seq_len=32, seed=7), 8)
  c = take(data.PackedBatches(examples, batch_size=4, seq_len=32, seed=8), 8)
  assert same(a, b) and not same(a, c)


@pytest.mark.parametrize("stop", [1, 5, 13, 29])
def test_resume_mid_epoch_equals_uninterrupted(stop):
  examples = make_examples(list(np.random.default_rng(1).integers(3, 30, 50)))
  kwargs = dict(batch_size=4, seq_len=32, seed=5)
  reference = take(data.PackedBatches(examples, **kwargs), 40)  # several epochs
  first = data.PackedBatches(examples, **kwargs)
  take(first, stop)
  state = json.loads(json.dumps(first.state))
  assert set(state) == {"epoch", "row"}
  resumed = data.PackedBatches(examples, state=state, **kwargs)
  assert same(take(resumed, 40 - stop), reference[stop:])
  assert take(data.PackedBatches(examples, **kwargs), 40)[-1]["inputs"].shape == (4, 32)


def test_resume_state_out_of_range_is_rejected():
  examples = make_examples([5, 5, 5])
  with pytest.raises(ValueError, match="outside the data stream"):
    data.PackedBatches(examples, batch_size=1, seq_len=16, state={"epoch": 0, "row": 99})


# ----------------------------------------------------------------------------- bad input


BAD_CASES = [
  ([{"prompt": "a", "completion": "b"}, "{not json"], r"line 2: malformed JSON"),
  ([{"prompt": "a"}], r"line 1: missing field 'completion'"),
  ([{"prompt": "a", "completion": 3}], r"line 1: field 'completion' must be a string, got int"),
  ([{"prompt": "a", "completion": ""}], r"line 1: field 'completion' is empty"),
  (
    [{"text": "a"}, {"prompt": "a", "completion": "b"}],
    r"line 2: 'prompt_completion' record in a file of 'text'",
  ),
  ([{"foo": 1}], r"line 1: record has none of the fields"),
  (["[1, 2]"], r"line 1: expected a JSON object, got list"),
  ([{"messages": []}], r"line 1: field 'messages' must be a non-empty list"),
  ([{"messages": [{"role": "user"}]}], r"line 1: messages\[0\]: missing field 'content'"),
  ([{"messages": [{"role": "user", "content": "x"}]}], r"line 1: 'messages' has no assistant turn"),
  ([{"text": 5}], r"line 1: field 'text' must be a string, got int"),
]


@pytest.mark.parametrize("lines, message", BAD_CASES)
def test_bad_records_name_file_and_line(tmp_path, tok, lines, message):
  path = write(tmp_path, lines)
  with pytest.raises(ValueError, match=re.escape(path) + " " + message) as info:
    data.load_dataset(path, tok, 64)
  assert "\n" not in str(info.value)


def test_missing_and_empty_files(tmp_path, tok):
  with pytest.raises(ValueError, match="no such file"):
    data.load_dataset(str(tmp_path / "nope.jsonl"), tok, 64)
  with pytest.raises(ValueError, match="file is empty"):
    data.load_dataset(write(tmp_path, b"\n  \n"), tok, 64)


def test_non_utf8_names_the_line(tmp_path, tok):
  path = write(tmp_path, b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
  with pytest.raises(ValueError, match=r"line 2: not valid UTF-8"):
    data.load_dataset(path, tok, 64)


def test_blank_lines_keep_line_numbers(tmp_path, tok):
  path = write(tmp_path, b'{"text": "ok"}\n\n{"text": 1}\n')
  with pytest.raises(ValueError, match=r"line 3: field 'text'"):
    data.load_dataset(path, tok, 64)


def test_too_long_example_says_by_how_much_and_which_flag(tmp_path, tok):
  path = write(
    tmp_path, [{"prompt": "a", "completion": "b"}, {"prompt": "x" * 20, "completion": "yy"}]
  )
  # 1 BOS + 20 + 2 + 1 EOS = 24 tokens -> 23 positions, 7 more than 16
  with pytest.raises(
    ValueError,
    match=r"line 2: example is 24 tokens \(23 positions\), 7 more than "
    r"seq_len=16; raise seq_len to at least 23",
  ) as err:
    data.load_dataset(path, tok, 16)
  # the library names its parameter; the job rewords it as the flag
  assert "seq_len=16; raise --seq-len to at least 23" in reword(
    str(err.value), {"seq_len": "seq_len"}
  )


def test_truncation_is_counted(tmp_path, tok):
  records = [{"prompt": "a", "completion": "b"}]
  records += [{"prompt": "x" * 30, "completion": "y"}, {"prompt": "y" * 40, "completion": "z"}]
  ds = data.load_dataset(write(tmp_path, records), tok, 16, truncate=True)
  assert ds.num_truncated == 2 and ds.num_split == 0
  assert [e.num_positions for e in ds.examples] == [3, 16, 16]


# ----------------------------------------------------------------------------- long documents


def long_text(n_words=120):
  """A document of a few hundred tokens whose words are all different (order is checkable)."""
  return " ".join(f"w{i}" for i in range(n_words))


def test_long_text_document_is_split_and_every_target_trained_once(tmp_path, tok):
  """What is counted: per document of `n` tokens (BOS, its text, EOS) the `n - 1` targets
  `tokens[1:]`; only BOS, which no position predicts, is excluded by the shift. Summed
  `loss_mask` over one epoch of packed batches must be exactly that, and the masked targets,
  read in order, must spell `tokens[1:]` (no token lost, none trained twice)."""
  docs = [long_text(), "short one", long_text(57)]
  seq_len = 16
  # truncate does not apply to {"text"}: a document is never cut
  ds = data.load_dataset(write(tmp_path, [{"text": t} for t in docs]), tok, seq_len, truncate=True)
  whole = [[tok.bos_token_id] + ids(tok, t) + [tok.eos_token_id] for t in docs]
  assert len(whole[0]) > 3 * seq_len and len(whole[2]) > 2 * seq_len  # they really are long
  chunks = [-(-(len(w) - 1) // seq_len) for w in whole]
  assert ds.num_truncated == 0 and ds.num_split == 2 and ds.num_records == 3
  assert ds.num_split_chunks == chunks[0] + chunks[2] and len(ds.examples) == sum(chunks)
  assert ds.num_target_tokens == sum(len(w) - 1 for w in whole)
  assert all(e.num_positions <= seq_len for e in ds.examples)
  assert [e.line for e in ds.examples] == [1] * chunks[0] + [2] + [3] * chunks[2]

  # in order, one row per chunk: the masked targets are each document's tokens[1:], in order
  targets = []
  for batch in data.sequential_batches(ds.examples, batch_size=1, seq_len=seq_len):
    targets += batch["targets"][batch["loss_mask"] > 0].tolist()
  assert targets == [t for w in whole for t in w[1:]]

  # shuffled and packed: one epoch trains each target exactly once
  stream = data.PackedBatches(ds.examples, batch_size=1, seq_len=seq_len, seed=3)
  weighted, seen = 0.0, []
  for _ in stream.epoch_rows(0):
    batch = next(stream)
    weighted += float(batch["loss_mask"].sum())
    seen += batch["targets"][batch["loss_mask"] > 0].tolist()
  assert stream.state == {"epoch": 1, "row": 0}
  assert weighted == sum(len(w) - 1 for w in whole)
  assert sorted(seen) == sorted(t for w in whole for t in w[1:])


def test_split_example_chunks_overlap_by_one_token():
  tokens = np.arange(10, 30, dtype=np.int32)  # 20 tokens, 19 positions
  mask = np.array([0] + [1] * 19, np.int32)
  chunks = data.split_example(data.Example(tokens, mask, 7), 8)
  assert [c.tokens.tolist() for c in chunks] == [
    list(range(10, 19)),
    list(range(18, 27)),
    list(range(26, 30)),
  ]
  assert [c.loss_mask.tolist() for c in chunks] == [[0] + [1] * 8, [0] + [1] * 8, [0, 1, 1, 1]]
  assert [c.num_positions for c in chunks] == [8, 8, 3] and {c.line for c in chunks} == {7}
  (same,) = data.split_example(data.Example(tokens, mask), 19)
  assert same.tokens.tolist() == tokens.tolist()


def test_prompt_completion_and_messages_are_never_split(tmp_path, tok):
  long = {"prompt": long_text(30), "completion": "ab"}
  with pytest.raises(ValueError, match="raise seq_len"):
    data.load_dataset(write(tmp_path, [long]), tok, 16)
  chat = {"messages": [{"role": "user", "content": long_text(30)}]}
  chat["messages"].append({"role": "assistant", "content": "ok"})
  with pytest.raises(ValueError, match="raise seq_len"):
    data.load_dataset(write(tmp_path, [chat], "c.jsonl"), tok, 16)


def test_byte_order_mark_and_crlf_are_accepted(tmp_path, tok):
  path = write(tmp_path, b'\xef\xbb\xbf{"text": "ok"}\r\n{"text": "no"}\r\n')
  assert [e.line for e in data.load_dataset(path, tok, 64).examples] == [1, 2]
