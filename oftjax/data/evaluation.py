"""Exact-match evaluation sets: prompts to complete greedily and the completions expected.

A `{"prompt","completion"}` record gives `[BOS] + prompt tokens` and its completion; a
`{"messages"}` record gives the rendered conversation up to its last assistant turn followed by
the generation prompt, and that turn's content. `{"text"}` records have no prompt and are refused:
a set of them is evaluated by its loss (and perplexity) alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import dataclasses
import os
from typing import Any

import numpy as np

from oftjax.data import chat, jsonl, sources


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


def text_prompt_ids(tokenizer: Any, text: str) -> np.ndarray:
  """The prompt of a plain text, as a prompt/completion record's: `[BOS] + its tokens`."""
  ids = [tokenizer.bos_token_id] + list(tokenizer.encode(text, add_special_tokens=False))
  return np.asarray(ids, np.int32)


def chat_prompt_ids(
  tokenizer: Any,
  messages: list[dict[str, str]],
  where: str = "",
  control: dict[str, int] | None = None,
) -> np.ndarray:
  """The prompt of an assistant turn: the conversation's tokens up to where the turn begins.

  Args:
    tokenizer: a tokenizer with a chat template.
    messages: a conversation; when its last message is an assistant turn, the prompt is
      everything before that turn's targets (as in training); otherwise it is the whole
      conversation followed by the generation prompt (the next assistant turn's opening).
    where: file and line, for error messages.
    control: the tokenizer's control tokens (`chat.control_tokens`), if already computed.

  Returns:
    int32 ids `[n]`, BOS first; message content is tokenized as plain text.

  Raises:
    ValueError: as `oftjax.data.render_chat` (no chat template, unusable template).
  """
  control = chat.control_tokens(tokenizer) if control is None else control
  if messages[-1]["role"] != "assistant":  # an empty turn to generate: only its opening is kept
    messages = [*messages, {"role": "assistant", "content": ""}]
  last = len(messages) - 1
  spans = chat.render_chat(tokenizer, messages, where, control)
  first = next((k for k, span in enumerate(spans) if span.target_of == last), len(spans))
  ids, _ = chat.encode_chat(tokenizer, spans[:first], control, where)
  bos = tokenizer.bos_token_id
  if not ids or ids[0] != bos:
    ids.insert(0, bos)
  return np.asarray(ids, np.int32)


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
  if record.format == jsonl.PROMPT_COMPLETION:
    ids = text_prompt_ids(tokenizer, record.data["prompt"])
    return EvalExample(ids, record.data["completion"], record.line)
  if record.format == jsonl.MESSAGES:
    messages = record.data["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    ids = chat_prompt_ids(tokenizer, messages[: last + 1], where, control)
    return EvalExample(ids, messages[last]["content"], record.line)
  raise ValueError(f"{where}: 'text' records have no prompt/completion to evaluate exact match on")


def make_eval_set(
  records: Sequence[jsonl.Record], tokenizer: Any, name: str = "<records>"
) -> list[EvalExample]:
  """Exact-match items of validated records (`make_eval_example` of each).

  Args:
    records: prompt/completion or messages records.
    tokenizer: the tokenizer.
    name: the source, for error messages.

  Returns:
    The items, in record order.

  Raises:
    ValueError: a `{"text"}` record (nothing to match; evaluate its loss instead).
  """
  control = chat.control_tokens(tokenizer)
  return [make_eval_example(r, tokenizer, f"{name} {r.place}", control) for r in records]


def load_eval_set(
  source: str | os.PathLike,
  tokenizer: Any,
  limit: int | None = None,
  *,
  split: str | None = None,
) -> list[EvalExample]:
  """Reads a source into exact-match items (the first `limit` records if given).

  Args:
    source: a JSONL or Parquet file, a `save_to_disk` folder or a hub dataset id
      (`oftjax.data.sources.read_records`).
    tokenizer: the tokenizer.
    limit: at most this many items.
    split: the split of a source that holds several.

  Returns:
    The items, in source order.
  """
  records = sources.read_records(source, split)[:limit]
  return make_eval_set(records, tokenizer, os.fspath(source))


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


def default_stop_ids(tokenizer: Any) -> list[int]:
  """Ids that end a completion: EOS and, where the tokenizer has it, `<end_of_turn>`."""
  stop_ids = [tokenizer.eos_token_id]
  end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
  if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
    stop_ids.append(end_of_turn)
  return stop_ids


def decode_completion(
  tokenizer: Any, generated: Sequence[int], stop_ids: Sequence[int] | None = None
) -> str:
  """Decodes generated ids up to (excluding) the first stop id (default: EOS and `<end_of_turn>`)."""
  stop_ids = default_stop_ids(tokenizer) if stop_ids is None else stop_ids
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
