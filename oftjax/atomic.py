"""Atomic writes: a file or folder is written beside its destination, then renamed onto it.

A reader (or a run killed mid-write) sees the old content or the new, never half of it.
Temporary siblings are named `.tmp-…` so that folder scans can skip them, and are
removed when the write fails.
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import json
import os
import secrets
import shutil
from typing import Any

TMP_PREFIX = ".tmp-"


def _sibling(path: str) -> str:
  """A fresh temporary name in `path`'s folder (random, so concurrent writers never meet)."""
  folder, name = os.path.split(os.path.abspath(path))
  return os.path.join(folder, f"{TMP_PREFIX}{name}-{os.getpid()}-{secrets.token_hex(4)}")


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path, ignore_errors=True)
  elif os.path.lexists(path):
    os.remove(path)


@contextlib.contextmanager
def replace_file(path: str | os.PathLike, mode: str = "w") -> Iterator[Any]:
  """Opens a temporary sibling of `path`; on success fsyncs it and renames it over `path`.

  Args:
    path: the destination file (its folder must exist).
    mode: `"w"` (text) or `"wb"` (bytes).

  Yields:
    The open file object.
  """
  path = os.fspath(path)
  tmp = _sibling(path)
  try:
    with open(tmp, mode.replace("w", "x")) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    _remove(tmp)
    raise


def write_json(
  path: str | os.PathLike, obj, *, trailing_newline: bool = False, **dump_kwargs
) -> None:
  """Writes `json.dump(obj, **dump_kwargs)` to `path` atomically (see `replace_file`)."""
  with replace_file(path) as f:
    json.dump(obj, f, **dump_kwargs)
    if trailing_newline:
      f.write("\n")


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes `text` to `path` atomically (see `replace_file`)."""
  with replace_file(path) as f:
    f.write(text)


@contextlib.contextmanager
def replace_folder(path: str | os.PathLike) -> Iterator[str]:
  """Yields a new empty sibling folder of `path`; on success it replaces `path`.

  An existing `path` is renamed aside, the new folder renamed into place, and the old one
  deleted, so `path` holds the old or the new content at every moment. On failure the
  sibling is deleted and `path` is left as it was.

  Args:
    path: the destination folder (its parent is created if missing).

  Yields:
    The staging folder to fill.
  """
  path = os.path.abspath(os.fspath(path))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  staging = _sibling(path)
  os.makedirs(staging)
  try:
    yield staging
    if os.path.lexists(path):
      old = staging + ".old"
      os.rename(path, old)
      os.rename(staging, path)
      _remove(old)
    else:
      os.rename(staging, path)
  except BaseException:
    _remove(staging)
    raise
