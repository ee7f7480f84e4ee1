"""Tokenizing validated records into token ids and loss masks.

Conventions (Gemma's): every example starts with the tokenizer's BOS token; a prompt/completion
or text example ends with EOS. `loss_mask[i] == 1` means token `i` is a training target: the
completion tokens and their EOS, the assistant turns of a conversation (content and the
end-of-turn token that closes it; see `oftjax.data.chat`), or every token but BOS of a text
record. BOS is never a target.

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

from oftjax.data import chat, jsonl


@dataclasses.dataclass(frozen=True)
class Example:
  """One tokenized example.

  Attributes:
    tokens: int32 ids `[n]`, BOS first.
    loss_mask: int32 `[n]`, 1 where the token is a training target.
    line: the 1-based JSONL line it came from (0 if it did not come from a file).
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
  """A tokenized JSONL file.

  Attributes:
    path: the file it was read from.
    format: its record format (one of `jsonl.FORMATS`).
    examples: the examples, in file order.
    num_truncated: how many examples were cut to fit `seq_len` (only with `truncate=True`).
  """

  path: str
  format: str
  examples: list[Example]
  num_truncated: int = 0

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


def tokenize_records(
  records: Sequence[jsonl.Record],
  tokenizer: Any,
  seq_len: int,
  *,
  truncate: bool = False,
  path: str = "<records>",
) -> Dataset:
  """Tokenizes records and checks that each fits `seq_len` model positions.

  An example of `n` tokens needs `n - 1` positions (inputs `tokens[:-1]`, targets
  `tokens[1:]`).

  Args:
    records: validated records of one format.
    tokenizer: a Hugging Face tokenizer.
    seq_len: positions per packed row.
    truncate: cut over-long examples to `seq_len + 1` tokens (counted in `num_truncated`)
      instead of raising.
    path: the file name used in messages.

  Returns:
    The tokenized dataset.

  Raises:
    ValueError: an example is longer than `seq_len` (and `truncate` is False).
  """
  if seq_len < 2:
    raise ValueError(f"seq_len must be at least 2, got {seq_len}")
  examples, num_truncated = [], 0
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
    where = f"{path} line {record.line}"
    example = tokenize_record(record, tokenizer, where, enc, control)
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
  return Dataset(path, fmt, examples, num_truncated)


def load_dataset(
  path: str | os.PathLike, tokenizer: Any, seq_len: int, *, truncate: bool = False
) -> Dataset:
  """Reads, validates and tokenizes a JSONL file (see `read_jsonl` and `tokenize_records`)."""
  records = jsonl.read_jsonl(path)
  return tokenize_records(records, tokenizer, seq_len, truncate=truncate, path=os.fspath(path))
