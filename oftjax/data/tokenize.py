"""Tokenizing validated records into token ids and loss masks.

Conventions (Gemma's): every example starts with the tokenizer's BOS token; a prompt/completion
or text example ends with EOS. `loss_mask[i] == 1` means token `i` is a training target: the
completion tokens and their EOS, the assistant turns of a conversation (content and the
end-of-turn token that closes it; see `oftjax.data.chat`), or every token but BOS of a text
record. BOS is never a target.

Over-long examples: a `{"text"}` document needs no single row. One of `n` tokens that needs
more than `seq_len` positions is split into consecutive chunks (`split_example`) that overlap by
one token, so each of its `n - 1` targets is trained exactly once (a chunk's first token is its
context, and the previous chunk's last target). A prompt/completion or conversation example
would lose its prompt or its turns that way: it must fit, or be cut with `truncate=True`.

The prompt and the completion are tokenized separately and concatenated, exactly as they will
be at generation time (prompt tokens, then generated ones).

Control tokens: the content of a `{"messages"}` record is always plain text (only the chat
template writes control tokens). `{"prompt", "completion"}` and `{"text"}` fields are
tokenized as written, so a prompt already laid out with `<start_of_turn>` gets those tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import os
from typing import Any

import numpy as np

from oftjax.data import chat, jsonl, sources


@dataclasses.dataclass(frozen=True)
class Example:
  """One tokenized example.

  Attributes:
    tokens: int32 ids `[n]`, BOS first.
    loss_mask: int32 `[n]`, 1 where the token is a training target.
    line: where its record is in its source (`jsonl.Record.line`; 0 if it has none). The
      chunks of a split document share their document's line.
  """

  tokens: np.ndarray
  loss_mask: np.ndarray
  line: int = 0

  @property
  def num_positions(self) -> int:
    """Model positions the example needs after the next-token shift: `len(tokens) - 1`."""
    return len(self.tokens) - 1


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A tokenized data source (JSONL, Parquet, `datasets`; see `oftjax.data.sources`).

  Attributes:
    path: the source it was read from.
    format: its record format (one of `jsonl.FORMATS`).
    examples: the examples, in source order (a split document's chunks in order, in its place).
    num_truncated: how many examples were cut to fit `seq_len` (only with `truncate=True`).
    num_split: how many `{"text"}` documents were longer than `seq_len` and split.
    num_split_chunks: how many chunks those documents were split into.
  """

  path: str
  format: str
  examples: list[Example]
  num_truncated: int = 0
  num_split: int = 0
  num_split_chunks: int = 0

  @property
  def num_records(self) -> int:
    """Records the examples came from (a split document counts once)."""
    return len(self.examples) - self.num_split_chunks + self.num_split

  @property
  def num_target_tokens(self) -> int:
    """Total number of training targets (sum of the loss masks)."""
    return int(sum(e.loss_mask.sum() for e in self.examples))


def load_tokenizer(path: str | os.PathLike) -> Any:
  """Loads a Hugging Face tokenizer, raising a one-line `ValueError` if that fails."""
  from transformers import AutoTokenizer

  try:
    tokenizer = AutoTokenizer.from_pretrained(os.fspath(path))
  except Exception as e:  # transformers raises many kinds; the user needs one line.
    raise ValueError(
      f"{os.fspath(path)}: cannot load a tokenizer ({type(e).__name__}: "
      f"{str(e).splitlines()[0] if str(e) else ''})"
    ) from None
  for name in ("bos_token_id", "eos_token_id"):
    if getattr(tokenizer, name, None) is None:
      raise ValueError(f"{os.fspath(path)}: tokenizer has no {name[:-3]}")
  return tokenizer


def _encode(tokenizer: Any, text: str) -> list[int]:
  return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def _pieces_to_example(pieces: Sequence[tuple[list[int], int]], line: int) -> Example:
  tokens = np.concatenate([np.asarray(ids, np.int32) for ids, _ in pieces])
  mask = np.concatenate([np.full(len(ids), flag, np.int32) for ids, flag in pieces])
  return Example(tokens, mask, line)


def tokenize_record(
  record: jsonl.Record,
  tokenizer: Any,
  where: str = "",
  encoded: tuple[list[int], list[int]] | None = None,
  control: dict[str, int] | None = None,
) -> Example:
  """Tokenizes one record (see the module docstring for the BOS/EOS and mask conventions).

  Args:
    record: a validated record.
    tokenizer: a Hugging Face tokenizer.
    where: file and line, for error messages.
    encoded: optional pre-computed ids of (prompt, completion) or (text, unused).
    control: the tokenizer's control tokens (`chat.control_tokens`), if already computed.

  Returns:
    The example.
  """
  bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
  data = record.data
  if record.format == jsonl.PROMPT_COMPLETION:
    prompt, completion = encoded or (
      _encode(tokenizer, data["prompt"]),
      _encode(tokenizer, data["completion"]),
    )
    example = _pieces_to_example([([bos] + prompt, 0), (completion + [eos], 1)], record.line)
  elif record.format == jsonl.TEXT:
    text = encoded[0] if encoded else _encode(tokenizer, data["text"])
    example = _pieces_to_example([([bos], 0), (text + [eos], 1)], record.line)
  else:
    control = chat.control_tokens(tokenizer) if control is None else control
    spans = chat.render_chat(tokenizer, data["messages"], where, control)
    ids, mask = chat.encode_chat(tokenizer, spans, control, where)
    if not ids or ids[0] != bos:
      ids, mask = [bos] + ids, [0] + mask
    example = Example(np.asarray(ids, np.int32), np.asarray(mask, np.int32), record.line)
  if not example.loss_mask.any():
    raise ValueError(f"{where}: example has no target tokens after tokenization")
  return example


def split_example(example: Example, seq_len: int) -> list[Example]:
  """Consecutive chunks of at most `seq_len` positions that train every target once.

  Chunk `k` holds tokens `[k * seq_len, (k + 1) * seq_len]` (`seq_len + 1` tokens, fewer in
  the last): neighbours share one token, the last input of one and the first of the next, so
  the chunks' targets (`tokens[1:]` of each) are the example's `tokens[1:]`, in order, each
  once. Positions restart in every chunk (it is a segment of its own), and a chunk's first
  token has loss mask 0, as a BOS has: the mask sums of the chunks add up to the example's.

  Args:
    example: the example to split.
    seq_len: positions per chunk, at least 1.

  Returns:
    `ceil((len(tokens) - 1) / seq_len)` chunks (the example itself if it fits).
  """
  if seq_len < 1:
    raise ValueError(f"seq_len must be at least 1, got {seq_len}")
  chunks = []
  for start in range(0, max(example.num_positions, 1), seq_len):
    mask = example.loss_mask[start : start + seq_len + 1].copy()
    mask[0] = 0  # a first token is context, never a target (the last chunk trained it)
    chunks.append(Example(example.tokens[start : start + seq_len + 1], mask, example.line))
  return chunks


def tokenize_records(
  records: Sequence[jsonl.Record],
  tokenizer: Any,
  seq_len: int,
  *,
  truncate: bool = False,
  path: str = "<records>",
) -> Dataset:
  """Tokenizes records and fits each example to `seq_len` model positions.

  An example of `n` tokens needs `n - 1` positions (inputs `tokens[:-1]`, targets
  `tokens[1:]`). A longer `{"text"}` document is split (`split_example`; counted in
  `num_split` and `num_split_chunks`); a longer prompt/completion or conversation example is
  refused, or cut with `truncate`.

  Args:
    records: validated records of one format.
    tokenizer: a Hugging Face tokenizer.
    seq_len: positions per packed row.
    truncate: cut over-long prompt/completion and conversation examples to `seq_len + 1`
      tokens (counted in `num_truncated`) instead of raising; `{"text"}` documents are split
      either way.
    path: the source name used in messages.

  Returns:
    The tokenized dataset.

  Raises:
    ValueError: a prompt/completion or conversation example is longer than `seq_len` (and
      `truncate` is False).
  """
  if seq_len < 2:
    raise ValueError(f"seq_len must be at least 2, got {seq_len}")
  examples, num_truncated, num_split, num_split_chunks = [], 0, 0, 0
  fmt = records[0].format if records else ""
  encoded: list[Any] = [None] * len(records)
  control = chat.control_tokens(tokenizer) if fmt == jsonl.MESSAGES else None
  if fmt == jsonl.PROMPT_COMPLETION:
    encoded = list(
      zip(
        chat.encode_texts(tokenizer, [r.data["prompt"] for r in records]),
        chat.encode_texts(tokenizer, [r.data["completion"] for r in records]),
      )
    )
  elif fmt == jsonl.TEXT:
    encoded = [(ids, []) for ids in chat.encode_texts(tokenizer, [r.data["text"] for r in records])]
  for record, enc in zip(records, encoded):
    where = f"{path} {record.place}"
    example = tokenize_record(record, tokenizer, where, enc, control)
    if example.num_positions > seq_len and fmt == jsonl.TEXT:
      chunks = split_example(example, seq_len)
      examples += chunks
      num_split, num_split_chunks = num_split + 1, num_split_chunks + len(chunks)
      continue
    if example.num_positions > seq_len:
      if not truncate:
        raise ValueError(
          f"{where}: example is {len(example.tokens)} tokens ({example.num_positions} positions), "
          f"{example.num_positions - seq_len} more than seq_len={seq_len}; raise seq_len to at "
          f"least {example.num_positions} or enable truncation"
        )
      example = Example(
        example.tokens[: seq_len + 1], example.loss_mask[: seq_len + 1], example.line
      )
      num_truncated += 1
    examples.append(example)
  return Dataset(path, fmt, examples, num_truncated, num_split, num_split_chunks)


def load_dataset(
  source: str | os.PathLike,
  tokenizer: Any,
  seq_len: int,
  *,
  truncate: bool = False,
  split: str | None = None,
) -> Dataset:
  """Reads, validates and tokenizes a data source.

  Args:
    source: a JSONL or Parquet file, a `save_to_disk` folder or a hub dataset id
      (`oftjax.data.sources.read_records`).
    tokenizer: a Hugging Face tokenizer.
    seq_len: positions per packed row.
    truncate: see `tokenize_records`.
    split: the split of a source that holds several.

  Returns:
    The tokenized dataset.
  """
  records = sources.read_records(source, split)
  return tokenize_records(records, tokenizer, seq_len, truncate=truncate, path=os.fspath(source))
