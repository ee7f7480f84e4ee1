"""Reading and validating JSONL training files.

Three record formats are accepted, one per file (never mixed):

- `{"prompt": str, "completion": str}`: loss on the completion (and the EOS that ends it).
- `{"messages": [{"role": str, "content": str}, ...]}`: rendered with the tokenizer's chat
  template; loss on the assistant turns.
- `{"text": str}`: loss on every token.

Extra keys are ignored; blank lines are skipped; a UTF-8 byte-order mark is allowed. Every problem raises a one-line `ValueError` that names the file and,
where there is one, the line number (1-based), e.g. `data.jsonl line 3: malformed JSON (...)`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

PROMPT_COMPLETION = "prompt_completion"
MESSAGES = "messages"
TEXT = "text"
FORMATS = (PROMPT_COMPLETION, MESSAGES, TEXT)

ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class Record:
  """One validated JSONL record.

  Attributes:
    format: one of `FORMATS`.
    data: the parsed JSON object.
    line: its 1-based line number in the file (for a table row, the 0-based row index).
    unit: what `line` counts: `"line"` (JSONL) or `"row"` (a table, `oftjax.data.sources`).
  """

  format: str
  data: dict[str, Any]
  line: int
  unit: str = "line"

  @property
  def place(self) -> str:
    """Where the record is in its source, for messages: `line 3` or `row 2`."""
    return f"{self.unit} {self.line}"


def _detect_format(obj: dict[str, Any]) -> str | None:
  if "messages" in obj:
    return MESSAGES
  if "prompt" in obj or "completion" in obj:
    return PROMPT_COMPLETION
  if "text" in obj:
    return TEXT
  return None


def _check_string(obj: dict[str, Any], key: str, where: str) -> None:
  if key not in obj:
    raise ValueError(f"{where}: missing field {key!r}")
  if not isinstance(obj[key], str):
    raise ValueError(f"{where}: field {key!r} must be a string, got {type(obj[key]).__name__}")


def validate_record(obj: Any, where: str) -> str:
  """Checks one parsed record and returns its format.

  Args:
    obj: the parsed record (a JSON object, or a table row as a dict).
    where: source and place, for messages.

  Returns:
    Its format, one of `FORMATS`.

  Raises:
    ValueError: not an object, no known fields, a missing, empty or wrongly typed field.
  """
  if not isinstance(obj, dict):
    raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
  fmt = _detect_format(obj)
  if fmt is None:
    raise ValueError(
      f"{where}: record has none of the fields 'prompt'/'completion', 'messages' or 'text'"
    )
  if fmt == PROMPT_COMPLETION:
    _check_string(obj, "prompt", where)
    _check_string(obj, "completion", where)
    if not obj["completion"]:
      raise ValueError(f"{where}: field 'completion' is empty")
  elif fmt == TEXT:
    _check_string(obj, "text", where)
    if not obj["text"]:
      raise ValueError(f"{where}: field 'text' is empty")
  else:
    check_messages(obj["messages"], where)
    if not any(m["role"] == "assistant" for m in obj["messages"]):
      raise ValueError(f"{where}: 'messages' has no assistant turn, so nothing to learn")
  return fmt


def check_messages(messages: Any, where: str) -> None:
  """Checks a conversation: a non-empty list of `{"role", "content"}` strings, known roles.

  Raises:
    ValueError: one line naming `where` and the message at fault.
  """
  if not isinstance(messages, list) or not messages:
    raise ValueError(f"{where}: field 'messages' must be a non-empty list")
  for i, message in enumerate(messages):
    at = f"{where}: messages[{i}]"
    if not isinstance(message, dict):
      raise ValueError(f"{at} must be an object, got {type(message).__name__}")
    _check_string(message, "role", at)
    _check_string(message, "content", at)
    if message["role"] not in ROLES:
      raise ValueError(
        f"{at}: unknown role {message['role']!r} (expected one of {', '.join(ROLES)})"
      )


def read_jsonl(path: str | os.PathLike) -> list[Record]:
  """Reads and validates a JSONL file of one record format.

  Blank lines are skipped (but counted, so line numbers match an editor's).

  Args:
    path: the file.

  Returns:
    The records in file order.

  Raises:
    ValueError: missing or empty file, non-UTF-8 bytes, malformed JSON, missing or wrongly
      typed fields, or mixed formats; the message names the file and the line.
  """
  name = os.fspath(path)
  records: list[Record] = []
  first_format: tuple[str, int] | None = None
  for number, obj in read_objects(name):
    where = f"{name} line {number}"
    fmt = validate_record(obj, where)
    if first_format is None:
      first_format = (fmt, number)
    elif fmt != first_format[0]:
      raise ValueError(
        f"{where}: {fmt!r} record in a file of {first_format[0]!r} records "
        f"(line {first_format[1]}); use one format per file"
      )
    records.append(Record(fmt, obj, number))
  return records


def read_objects(path: str | os.PathLike) -> list[tuple[int, Any]]:
  """Parses a JSONL file into `(1-based line number, JSON value)` pairs, unvalidated.

  Blank lines are skipped (but counted); a UTF-8 byte-order mark is allowed.

  Raises:
    ValueError: missing or empty file, a directory, non-UTF-8 bytes or malformed JSON; the
      message names the file and the line.
  """
  name = os.fspath(path)
  if not os.path.exists(name):
    raise ValueError(f"{name}: no such file")
  if os.path.isdir(name):
    raise ValueError(f"{name}: is a directory, expected a JSONL file")
  with open(name, "rb") as f:
    raw_lines = f.read().split(b"\n")
  objects = []
  for number, raw in enumerate(raw_lines, start=1):
    where = f"{name} line {number}"
    try:
      line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise ValueError(f"{where}: not valid UTF-8 (byte {e.start + 1} of the line)") from None
    if number == 1:
      line = line.removeprefix("\ufeff")  # a UTF-8 byte-order mark
    if not line.strip():
      continue
    try:
      objects.append((number, json.loads(line)))
    except json.JSONDecodeError as e:
      raise ValueError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
  if not objects:
    raise ValueError(f"{name}: file is empty (no JSONL records)")
  return objects
