"""Where records come from: JSONL, Parquet, `datasets` folders and hub datasets.

`read_records(source, split)` looks at `source` and returns validated records
(`oftjax.data.jsonl.Record`), whatever the container:

- a file starting with Parquet's magic bytes `PAR1` (or named `*.parquet`): a Parquet table;
- any other file: JSONL (`oftjax.data.jsonl.read_jsonl`);
- a folder written by `datasets.Dataset.save_to_disk` (it holds `state.json`) or by
  `datasets.DatasetDict.save_to_disk` (it holds `dataset_dict.json`; `split` picks one);
- a string that is no local path and reads as a hub id (`name` or `owner/name`): loaded with
  `datasets.load_dataset(source, split=split)` (cached copies work offline).

A table's record format follows from its columns, as a JSONL record's from its keys: `messages`,
else `prompt` and `completion`, else `text` (other columns are ignored). Rows are named by their
0-based index (`row 0`), as `dataset[0]` names them; JSONL records by their 1-based line.

`pyarrow` and `datasets` are imported only when a source needs them. Every problem raises a
one-line `ValueError` that names the source, the problem and the fix.

References:
  Hugging Face `datasets` (`load_dataset`, `load_from_disk`); Apache Parquet via `pyarrow`.
"""

from __future__ import annotations

import os
import re
from typing import Any

from oftjax.data import jsonl

PARQUET_MAGIC = b"PAR1"
# A bare name or owner/name, as the hub spells ids; a path with a file suffix is never one.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_UNKNOWN_SPLIT = re.compile(r"Unknown split .*Should be one of (\[.*\])")
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow", ".csv", ".txt")
# The columns that make each format, in the order formats are recognised (as `jsonl` does).
_FORMAT_COLUMNS = (
  (jsonl.MESSAGES, ("messages",)),
  (jsonl.PROMPT_COMPLETION, ("prompt", "completion")),
  (jsonl.TEXT, ("text",)),
)


def read_records(source: str | os.PathLike, split: str | None = None) -> list[jsonl.Record]:
  """Reads and validates the records of a JSONL/Parquet file, `datasets` folder or hub id.

  Args:
    source: a file, a `save_to_disk` folder or a hub dataset id (see the module docstring).
    split: which split of a source that holds several (a `DatasetDict` folder, a hub
      dataset); ignored by a source of one table. `None` takes the only split, if there is one.

  Returns:
    The records in source order.

  Raises:
    ValueError: the source is missing or unreadable, has no record column, holds a bad
      record, lacks `split`, or is a hub id that cannot be fetched (e.g. offline).
  """
  name = os.fspath(source)
  if os.path.isdir(name):
    return _table_records(_table_of(_load_from_disk(name, split)), name)
  if os.path.isfile(name):
    if _is_parquet(name):
      return _table_records(_read_parquet(name), name)
    return jsonl.read_jsonl(name)
  if looks_like_hub_id(name):
    return _table_records(_table_of(_load_from_hub(name, split)), name)
  raise ValueError(f"{name}: no such file")


def looks_like_hub_id(name: str) -> bool:
  """Whether `name` reads as a hub dataset id (`name`, `owner/name`) rather than a file path."""
  return bool(_HUB_ID.fullmatch(name)) and not name.lower().endswith(_FILE_SUFFIXES)


def _is_parquet(path: str) -> bool:
  if path.lower().endswith(".parquet"):
    return True
  with open(path, "rb") as f:
    return f.read(len(PARQUET_MAGIC)) == PARQUET_MAGIC


def _first_line(error: Exception) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


def _read_parquet(path: str) -> Any:
  import pyarrow.parquet as pq

  try:
    return pq.read_table(path)
  except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...; the user needs one line
    reason = re.sub(r"^Could not open Parquet input source '[^']*': ", "", _first_line(e))
    raise ValueError(
      f"{path}: not a readable Parquet file ({reason}); write it again (e.g. "
      "pandas.DataFrame.to_parquet) or pass a JSONL file"
    ) from None


def _pick_split(splits: Any, split: str | None, name: str) -> Any:
  """One split of a `DatasetDict`-like mapping, or a one-line error listing the splits."""
  have = sorted(splits)
  if split is None and len(have) == 1:
    return splits[have[0]]
  if split not in splits:
    wanted = "no split chosen" if split is None else f"split={split!r} not found"
    raise ValueError(f"{name}: {wanted}; set split to one of: {', '.join(have)}")
  return splits[split]


def _load_from_disk(folder: str, split: str | None) -> Any:
  """The dataset (one split) of a `save_to_disk` folder."""
  is_dict = os.path.exists(os.path.join(folder, "dataset_dict.json"))
  if not is_dict and not os.path.exists(os.path.join(folder, "state.json")):
    raise ValueError(
      f"{folder}: is a directory, but not one written by datasets.Dataset.save_to_disk (no "
      "state.json or dataset_dict.json); pass a JSONL or Parquet file or such a folder"
    )
  import datasets

  try:
    loaded = datasets.load_from_disk(folder)
  except Exception as e:  # a damaged folder: datasets raises many kinds
    raise ValueError(
      f"{folder}: not a readable save_to_disk folder ({type(e).__name__}: {_first_line(e)}); "
      "save the dataset again"
    ) from None
  return _pick_split(loaded, split, folder) if is_dict else loaded


def _load_from_hub(dataset_id: str, split: str | None) -> Any:
  """`datasets.load_dataset(dataset_id, split=split)`, its failures as one line."""
  import datasets

  offline = bool(getattr(datasets.config, "HF_HUB_OFFLINE", False))
  try:
    loaded = datasets.load_dataset(dataset_id, split=split)
  except Exception as e:  # connection, not found, gated, bad config: all one line
    reason = _first_line(e)
    unknown = _UNKNOWN_SPLIT.search(reason)
    if unknown:  # datasets: 'Unknown split "x". Should be one of ['train', 'test'].'
      have = ", ".join(re.findall(r"'([^']*)'", unknown.group(1)))
      raise ValueError(
        f"{dataset_id}: split={split!r} not found; set split to one of: {have}"
      ) from None
    if offline or "OfflineModeIsEnabled" in reason:
      raise ValueError(
        f"{dataset_id}: no such local file or folder, and a hub dataset cannot be fetched "
        "offline (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set) unless it is cached; load it "
        "once with network access or pass a local JSONL/Parquet file or save_to_disk folder"
      ) from None
    raise ValueError(
      f"{dataset_id}: no such local file or folder, and loading it as a hub dataset failed "
      f"({type(e).__name__}: {reason}); check the id and your network or pass a local file"
    ) from None
  return loaded if split is not None else _pick_split(loaded, split, dataset_id)


def _table_of(dataset: Any) -> Any:
  """A `datasets.Dataset` as one `pyarrow.Table`, in its row order."""
  return dataset.with_format("arrow")[:]


def _record_format(columns: list[str], name: str) -> tuple[str, tuple[str, ...]]:
  """The record format a table's columns make, and those columns."""
  for fmt, needed in _FORMAT_COLUMNS:
    present = [c for c in needed if c in columns]
    if len(present) == len(needed):
      return fmt, needed
    if present:
      missing = next(c for c in needed if c not in columns)
      raise ValueError(
        f"{name}: has a {present[0]!r} column but no {missing!r} column; add it or rename "
        "the column that holds it"
      )
  raise ValueError(
    f"{name}: no 'text', 'prompt'/'completion' or 'messages' column (columns: "
    f"{', '.join(columns) or 'none'}); rename the column that holds the data"
  )


def _table_records(table: Any, name: str) -> list[jsonl.Record]:
  """Validated records of a `pyarrow.Table`'s rows (see the module docstring)."""
  fmt, columns = _record_format(list(table.column_names), name)
  if table.num_rows == 0:
    raise ValueError(f"{name}: has no rows")
  rows = table.select(list(columns)).to_pylist()
  records = []
  for index, row in enumerate(rows):
    jsonl.validate_record(row, f"{name} row {index}")  # the columns fix its format
    records.append(jsonl.Record(fmt, row, index, unit="row"))
  return records
