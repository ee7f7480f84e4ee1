"""Exact-match evaluation sets: prompts to complete greedily and the completions expected.

A `{"prompt","completion"}` record gives `[BOS] + prompt tokens` and its completion; a
`{"messages"}` record gives the rendered conversation up to its last assistant turn followed by
the generation prompt, and that turn's content. `{"text"}` records have no prompt and are refused.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import dataclasses
import os
from typing import Any

import numpy as np

from oftjax.data import chat, jsonl


@dataclasses.dataclass(frozen=True)
class EvalExample:
  """One exact-match item.

  Attributes:
    prompt_tokens: int32 ids `[n]`, BOS first.
    expected: the completion text the model must produce.
    line: the 1-based JSONL line.
  """

  prompt_tokens: np.ndarray
  expected: str
  line: int


def make_eval_example(
  record: jsonl.Record, tokenizer: Any, where: str = "", control: dict[str, int] | None = None
) -> EvalExample:
  """Builds the prompt and expected completion of one record.

  Args:
    record: a validated prompt/completion or messages record.
    tokenizer: the tokenizer.
    where: file and line, for error messages.
    control: the tokenizer's control tokens (`chat.control_tokens`), if already computed.

  Returns:
    The item; a conversation's prompt is its tokens up to where the last assistant turn's
    targets begin, exactly as in training.
  """
  bos = tokenizer.bos_token_id
  if record.format == jsonl.PROMPT_COMPLETION:
    ids = [bos] + list(tokenizer.encode(record.data["prompt"], add_special_tokens=False))
    return EvalExample(np.asarray(ids, np.int32), record.data["completion"], record.line)
  if record.format == jsonl.MESSAGES:
    control = chat.control_tokens(tokenizer) if control is None else control
    messages = record.data["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    spans = chat.render_chat(tokenizer, messages[: last + 1], where, control)
    first = next(k for k, span in enumerate(spans) if span.target_of == last)
    ids, _ = chat.encode_chat(tokenizer, spans[:first], control, where)
    if not ids or ids[0] != bos:
      ids.insert(0, bos)
    return EvalExample(np.asarray(ids, np.int32), messages[last]["content"], record.line)
  raise ValueError(f"{where}: 'text' records have no prompt/completion to evaluate exact match on")


def load_eval_set(
  path: str | os.PathLike, tokenizer: Any, limit: int | None = None
) -> list[EvalExample]:
  """Reads a JSONL file into exact-match items (the first `limit` records if given)."""
  name = os.fspath(path)
  records = jsonl.read_jsonl(name)[:limit]
  control = chat.control_tokens(tokenizer)
  return [make_eval_example(r, tokenizer, f"{name} line {r.line}", control) for r in records]


def pad_prompts(
  prompts: Sequence[np.ndarray], pad_id: int = 0, side: str = "left", length: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Pads prompts into one `[batch, length]` array.

  Args:
    prompts: int token arrays.
    pad_id: id written on padding.
    side: `"left"` (prompts end at the last column, ready for generation) or `"right"`.
    length: columns; defaults to the longest prompt.

  Returns:
    `(tokens, mask)`: int32 ids and int32 mask (1 on real tokens).
  """
  if side not in ("left", "right"):
    raise ValueError(f"side must be 'left' or 'right', got {side!r}")
  length = max(len(p) for p in prompts) if length is None else length
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  mask = np.zeros((len(prompts), length), np.int32)
  for i, p in enumerate(prompts):
    if len(p) > length:
      raise ValueError(f"prompt {i} has {len(p)} tokens, more than length={length}")
    cols = slice(length - len(p), length) if side == "left" else slice(0, len(p))
    tokens[i, cols] = p
    mask[i, cols] = 1
  return tokens, mask


def eval_batches(
  items: Sequence[EvalExample],
  batch_size: int,
  pad_id: int = 0,
  side: str = "left",
  length: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, list[str]]]:
  """Yields `(prompt_tokens, prompt_mask, expected_texts)` batches for greedy generation.

  All batches share one shape, `[batch_size, length]` (`length` defaults to the longest
  prompt of `items`); the last batch is topped up with copies of its first prompt, whose
  expected texts are not returned (`len(expected_texts)` is the number of real rows).
  """
  length = max(len(x.prompt_tokens) for x in items) if length is None else length
  for start in range(0, len(items), batch_size):
    chunk = list(items[start : start + batch_size])
    prompts = [x.prompt_tokens for x in chunk]
    prompts += [prompts[0]] * (batch_size - len(prompts))
    tokens, mask = pad_prompts(prompts, pad_id, side, length)
    yield tokens, mask, [x.expected for x in chunk]


def decode_completion(
  tokenizer: Any, generated: Sequence[int], stop_ids: Sequence[int] | None = None
) -> str:
  """Decodes generated ids up to (excluding) the first stop id (default: EOS and `<end_of_turn>`)."""
  if stop_ids is None:
    stop_ids = [tokenizer.eos_token_id]
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
      stop_ids.append(end_of_turn)
  ids = []
  for t in np.asarray(generated).tolist():
    if t in stop_ids:
      break
    ids.append(t)
  return tokenizer.decode(ids, skip_special_tokens=True)


def exact_match_accuracy(
  tokenizer: Any, generated: Sequence[Sequence[int]], expected: Sequence[str]
) -> float:
  """Fraction of rows whose decoded completion equals the expected text (both `strip()`-ed).

  Args:
    tokenizer: the tokenizer.
    generated: per row, the generated ids after the prompt (rows beyond `len(expected)` ignored).
    expected: expected completion texts.

  Returns:
    Accuracy in [0, 1].
  """
  if not expected:
    raise ValueError("no expected completions")
  hits = sum(
    decode_completion(tokenizer, g).strip() == e.strip() for g, e in zip(generated, expected)
  )
  return hits / len(expected)
