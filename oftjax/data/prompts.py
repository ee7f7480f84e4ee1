"""Prompts to generate from: plain texts, conversations, and JSONL files of them.

A prompt is tokenized exactly as the finetuning job and its evaluator tokenize one: a plain
text as `[BOS] + its tokens` (`oftjax.data.evaluation.text_prompt_ids`), or, with
`chat`, as a one-message user conversation; a conversation with the tokenizer's chat template
up to the opening of the assistant turn to generate (`oftjax.data.evaluation.chat_prompt_ids`).

A prompts file holds one JSON object per line, each either

- `{"prompt": str}` (a `"completion"`, as in the job's evaluation files, is kept as the
  expected answer), or
- `{"messages": [{"role", "content"}, ...]}`: ending with a user (or system) turn, the next
  assistant turn is generated; ending with an assistant turn, that turn is generated again (its
  content is the expected answer), exactly as the evaluator does.

Extra keys are ignored; blank lines are skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import os
from typing import Any

import numpy as np

from oftjax.data import chat, evaluation, jsonl


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One prompt, tokenized.

  Attributes:
    tokens: int32 ids `[n]`, BOS first.
    source: what was given: the text, or the conversation (a list of messages).
    expected: the answer the prompt's record holds (completion or last assistant turn), or None.
    line: the 1-based line of its prompts file, or None.
  """

  tokens: np.ndarray
  source: Any
  expected: str | None = None
  line: int | None = None


def text_prompt(
  tokenizer: Any, text: str, use_chat: bool = False, control: dict[str, int] | None = None
) -> Prompt:
  """A plain text's prompt: as is, or (`use_chat`) as one user message in the chat template."""
  if use_chat:
    messages = [{"role": "user", "content": text}]
    return Prompt(evaluation.chat_prompt_ids(tokenizer, messages, "", control), text)
  return Prompt(evaluation.text_prompt_ids(tokenizer, text), text)


def read_prompts(path: str | os.PathLike, tokenizer: Any, use_chat: bool = False) -> list[Prompt]:
  """Reads a prompts file (see the module docstring) into tokenized prompts.

  Args:
    path: the JSONL file.
    tokenizer: the tokenizer.
    use_chat: put `{"prompt"}` texts in the chat template as one user message.

  Returns:
    The prompts, in file order.

  Raises:
    ValueError: missing or empty file, malformed JSON, a record with neither a string
      `prompt` nor a valid `messages` list, or a chat template that cannot render it;
      one line naming the file and line.
  """
  name = os.fspath(path)
  control = chat.control_tokens(tokenizer)
  prompts = []
  for number, obj in jsonl.read_objects(name):
    where = f"{name} line {number}"
    if not isinstance(obj, dict) or not ("prompt" in obj or "messages" in obj):
      raise ValueError(f"{where}: expected an object with a 'prompt' or a 'messages' field")
    if "messages" in obj:
      messages = obj["messages"]
      jsonl.check_messages(messages, where)
      ids = evaluation.chat_prompt_ids(tokenizer, messages, where, control)
      expected = messages[-1]["content"] if messages[-1]["role"] == "assistant" else None
      prompts.append(Prompt(ids, messages, expected, number))
      continue
    if not isinstance(obj["prompt"], str):
      raise ValueError(f"{where}: field 'prompt' must be a string")
    expected = obj.get("completion")
    prompt = text_prompt(tokenizer, obj["prompt"], use_chat, control)
    prompts.append(
      dataclasses.replace(
        prompt, expected=expected if isinstance(expected, str) else None, line=number
      )
    )
  return prompts


def prompt_batches(
  prompts: Sequence[Prompt], batch_size: int, pad_id: int = 0
) -> list[tuple[np.ndarray, np.ndarray, int]]:
  """Left-padded `(tokens, mask, real rows)` batches of one shape, in order.

  All batches are `[batch_size, longest prompt]` (one compilation); the last is topped up
  with copies of its first prompt (see `oftjax.data.eval_batches`).
  """
  items = [evaluation.EvalExample(p.tokens, "", 0) for p in prompts]
  return [
    (tokens, mask, len(expected))
    for tokens, mask, expected in evaluation.eval_batches(items, batch_size, pad_id, "left")
  ]
