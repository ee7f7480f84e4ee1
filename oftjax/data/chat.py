"""Conversations: rendering with the tokenizer's chat template, turn masks and safe tokenization.

A conversation is rendered with the tokenizer's chat template and cut into spans of two kinds:

- message content, which is always tokenized as plain text: a user who writes the characters
  `<end_of_turn>` gets those characters, never Gemma's end-of-turn control token;
- template text, in which the tokenizer's control tokens (its special added tokens, such as
  `<bos>`, `<start_of_turn>`, `<end_of_turn>`) are control tokens.

To tell the two apart the template is rendered once with every message's content replaced by a
unique marker; that gives the template text around each content, and the real rendering must
read as exactly that template text with each content (as the template writes it, e.g. trimmed)
in the marked places. A template whose layout depends on the content itself is refused.

Loss targets (`ChatSpan.target_of`) are each assistant turn's content and the end-of-turn
marker that closes it: the turn's closing template text up to and including its last control
token (for Gemma `<end_of_turn>`; the newline written after it is never generated, so it is
not a target), or all of the closing text if it holds no control token. Template text that a
template writes between the generation prompt and the content is a target too, since the model
generates it. For each assistant turn after the first, the history rendered with the generation
prompt must be a prefix of the conversation ending where that turn's targets begin, as greedy
decoding will see it; a leading assistant turn (a conversation the assistant opens) has no
history, and its targets start at its content.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import functools
import re
from typing import Any


@dataclasses.dataclass(frozen=True)
class ChatSpan:
  """A piece of a rendered conversation.

  Attributes:
    text: its characters.
    is_content: True for message content (tokenized as plain text), False for template text.
    target_of: index of the assistant message whose turn this span trains, None for context.
  """

  text: str
  is_content: bool
  target_of: int | None = None


def control_tokens(tokenizer: Any) -> dict[str, int]:
  """The tokenizer's control tokens, text to id: its special tokens and special added tokens."""
  found = {
    tok.content: int(i)
    for i, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()
    if getattr(tok, "special", False)
  }
  unk = getattr(tokenizer, "unk_token_id", None)
  for text in getattr(tokenizer, "all_special_tokens", []):
    token_id = tokenizer.convert_tokens_to_ids(text)
    if isinstance(token_id, int) and (
      token_id != unk or text == getattr(tokenizer, "unk_token", None)
    ):
      found.setdefault(text, token_id)
  return found


@functools.lru_cache(maxsize=8)
def _compile(tokens: tuple[str, ...]) -> re.Pattern | None:
  if not tokens:
    return None
  return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))


def _pattern(control: dict[str, int]) -> re.Pattern | None:
  """Matches any control token, longest first (so a token wins over the tokens it contains)."""
  return _compile(tuple(control))


def encode_texts(tokenizer: Any, texts: Sequence[str], *, as_text: bool = False) -> list[list[int]]:
  """Batch-encodes texts without BOS/EOS (much faster than one call per text).

  Args:
    tokenizer: a Hugging Face tokenizer.
    texts: the strings.
    as_text: encode control-token strings as the plain characters they are (Hugging Face's
      `split_special_tokens`), so the ids never hold a control token.

  Returns:
    One id list per text.
  """
  if not texts:
    return []
  backend = getattr(tokenizer, "backend_tokenizer", None)  # the Rust tokenizer of a fast tokenizer
  if backend is not None:
    previous = backend.encode_special_tokens
    backend.encode_special_tokens = as_text
    try:
      ids = [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]
    finally:
      backend.encode_special_tokens = previous
  else:
    ids = tokenizer(list(texts), add_special_tokens=False, split_special_tokens=as_text)[
      "input_ids"
    ]
  return [list(x) if t else [] for x, t in zip(ids, texts)]


def _markers(messages: list[dict[str, str]]) -> tuple[str, str]:
  """Two private-use characters that no message content holds."""
  used = set("".join(m["content"] for m in messages))
  free = (chr(c) for c in range(0xE000, 0xF900) if chr(c) not in used)
  return next(free), next(free)


def _fit_layout(
  full: str, template: list[str], contents: list[str]
) -> list[tuple[int, int]] | None:
  """Places contents (verbatim or stripped) between template pieces so they spell `full`."""
  if not full.startswith(template[0]):
    return None
  at, places = len(template[0]), []
  for content, after in zip(contents, template[1:]):
    for written in dict.fromkeys((content, content.strip())):
      if full.startswith(written + after, at):
        break
    else:
      return None
    places.append((at, at + len(written)))
    at += len(written) + len(after)
  return places if at == len(full) else None


def _locate_contents(
  render: Callable,
  messages: list[dict[str, str]],
  full: str,
  pattern: re.Pattern | None,
  where: str,
) -> list[tuple[int, int, int]]:
  """Where each message's content lies in `full`: sorted `(start, end, message index)`.

  Raises:
    ValueError: the template writes a content not exactly once (an assistant's), changes its
      layout with the content, or writes control tokens in a content's place.
  """
  opening, closing = _markers(messages)
  marks = [f"{opening}{i}{closing}" for i in range(len(messages))]
  layout = render([{**m, "content": mark} for m, mark in zip(messages, marks)])
  placed = []
  for i, mark in enumerate(marks):
    count = layout.count(mark)
    if count > 1:
      raise ValueError(
        f"{where}: chat template writes messages[{i}] content more than once; cannot mask its turn"
      )
    if count == 1:
      placed.append((layout.index(mark), i))
    elif messages[i]["role"] == "assistant":
      raise ValueError(
        f"{where}: chat template does not write the content of messages[{i}] "
        "(assistant); cannot learn from it"
      )
  placed.sort()
  order = [i for _, i in placed]
  template, at = [], 0
  for pos, i in placed:
    template.append(layout[at:pos])
    at = pos + len(marks[i])
  template.append(layout[at:])
  spots = _fit_layout(full, template, [messages[i]["content"] for i in order])
  if spots is None:  # content written other than verbatim or stripped: render each one alone
    written = []
    for pos, i in placed:
      alone = render([m if j == i else {**m, "content": marks[j]} for j, m in enumerate(messages)])
      before, after = layout[:pos], layout[pos + len(marks[i]) :]
      if not (
        alone.startswith(before)
        and alone.endswith(after)
        and len(alone) >= len(before) + len(after)
      ):
        raise ValueError(
          f"{where}: chat template lays out messages[{i}] differently depending "
          "on its content; cannot tell content from template text"
        )
      written.append(alone[len(before) : len(alone) - len(after)])
      if pattern and len(pattern.findall(written[-1])) > len(
        pattern.findall(messages[i]["content"])
      ):
        raise ValueError(
          f"{where}: chat template writes control tokens in the place of messages[{i}] "
          "content; cannot tell content from template text"
        )
    spots = _fit_layout(full, template, written)
    if spots is None or any(full[a:b] != w for (a, b), w in zip(spots, written)):
      raise ValueError(
        f"{where}: chat template output depends on message content beyond "
        "writing it; cannot tell content from template text"
      )
  return [(a, b, i) for (a, b), i in zip(spots, order)]


def render_chat(
  tokenizer: Any,
  messages: list[dict[str, str]],
  where: str = "",
  control: dict[str, int] | None = None,
) -> list[ChatSpan]:
  """Renders a conversation into spans of content and template text, marking the targets.

  Args:
    tokenizer: a tokenizer with a chat template.
    messages: `[{"role", "content"}, ...]`.
    where: file and line, for error messages.
    control: the tokenizer's control tokens (see `control_tokens`), if already computed.

  Returns:
    Spans whose texts concatenate to the full rendered conversation (see the module docstring).

  Raises:
    ValueError: no chat template, or a template that fails (e.g. roles out of its order), that
      does not write an assistant's content exactly once, whose layout depends on the content,
      or whose renderings are not prefix-stable.
  """
  if not getattr(tokenizer, "chat_template", None):
    raise ValueError(f"{where}: 'messages' records need a tokenizer with a chat template")
  pattern = _pattern(control_tokens(tokenizer) if control is None else control)

  def render(msgs: list[dict[str, str]], gen: bool = False) -> str:
    try:
      return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    except Exception as e:  # jinja errors raised by the template itself
      reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
      raise ValueError(f"{where}: chat template failed ({reason})") from None

  def unstable() -> ValueError:
    return ValueError(f"{where}: chat template renders are not prefix-stable; cannot mask turns")

  full = render(messages)
  contents = _locate_contents(render, messages, full, pattern, where)
  targets, done = [], 0
  for start, end, i in contents:
    if messages[i]["role"] != "assistant":
      continue
    begin = start
    if i:
      prompt = render(messages[:i], True)
      if not full.startswith(prompt) or len(prompt) > start:
        raise unstable()
      begin = len(prompt)
    turn = full if i == len(messages) - 1 else render(messages[: i + 1])
    if not full.startswith(turn) or len(turn) < end or begin < done:
      raise unstable()
    closing = [m for m in pattern.finditer(turn, end)] if pattern else []
    done = closing[-1].end() if closing else len(turn)
    targets.append((begin, done, i))
  cuts = sorted({0, len(full)} | {x for a, b, _ in contents + targets for x in (a, b)})
  spans = []
  for a, b in zip(cuts[:-1], cuts[1:]):
    spans.append(
      ChatSpan(
        full[a:b],
        any(s <= a and b <= e for s, e, _ in contents),
        next((i for s, e, i in targets if s <= a and b <= e), None),
      )
    )
  return spans


def encode_chat(
  tokenizer: Any, spans: Sequence[ChatSpan], control: dict[str, int] | None = None, where: str = ""
) -> tuple[list[int], list[int]]:
  """Token ids and loss mask of rendered spans; only template text yields control tokens.

  Plain text is encoded in runs that break at control tokens (as the tokenizer itself does) and
  where the mask changes (a turn's targets are encoded as the model will generate them).

  Args:
    tokenizer: the tokenizer that rendered the spans.
    spans: from `render_chat`.
    control: the tokenizer's control tokens, if already computed.
    where: file and line, for error messages.

  Returns:
    `(ids, mask)`: equal-length lists; mask 1 on targets.

  Raises:
    ValueError: the tokenizer turns plain characters into a control token.
  """
  control = control_tokens(tokenizer) if control is None else control
  pattern = _pattern(control)
  items: list[list] = []  # [text or None, control id or None, flag]

  def add_text(text: str, flag: int) -> None:
    if not text:
      return
    if items and items[-1][0] is not None and items[-1][2] == flag:
      items[-1][0] += text
    else:
      items.append([text, None, flag])

  for span in spans:
    flag = int(span.target_of is not None)
    if span.is_content or pattern is None:
      add_text(span.text, flag)
      continue
    at = 0
    for match in pattern.finditer(span.text):
      add_text(span.text[at : match.start()], flag)
      items.append([None, control[match.group()], flag])
      at = match.end()
    add_text(span.text[at:], flag)
  encoded = iter(encode_texts(tokenizer, [t for t, _, _ in items if t is not None], as_text=True))
  ids, mask, control_ids = [], [], set(control.values())
  for text, token_id, flag in items:
    piece = [token_id] if text is None else next(encoded)
    if text is not None and control_ids.intersection(piece):
      raise ValueError(
        f"{where}: the tokenizer encodes the plain text {text!r} with a control token; "
        "cannot keep message content apart from control tokens"
      )
    ids += piece
    mask += [flag] * len(piece)
  return ids, mask
