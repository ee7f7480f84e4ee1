"""Safetensors files read and written in pieces, so no whole checkpoint is ever in memory.

The format is an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and `[begin, end)` byte range in the data that follows, and the raw
little-endian tensor bytes, contiguous and in offset order. Writing the header first (the
shapes are known) lets each tensor be produced, written and freed in turn, in row blocks
if it is large, where `safetensors.numpy.save_file` needs every tensor of a file at once.

References:
  The safetensors format: https://github.com/huggingface/safetensors (README, "Format").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
import json
import os

import ml_dtypes
import numpy as np

DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U8": np.uint8,
  "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
_ITEMSIZES = {k: np.dtype(v).itemsize for k, v in DTYPES.items()} | {
  "F8_E4M3": 1,
  "F8_E5M2": 1,
  "U16": 2,
  "U32": 4,
  "U64": 8,
}

# A tensor to write: `(name, shape, dtype, blocks)`. `dtype` is a NumPy dtype or a safetensors
# dtype name (e.g. "BF16", for bytes copied unchanged); `blocks()` yields arrays (or `bytes`)
# whose C-order bytes, concatenated, are the tensor's (the whole tensor, or blocks of rows).
Entry = tuple[str, tuple, "np.dtype | str", Callable[[], Iterable["np.ndarray | bytes"]]]


def read_header(path: str, fh) -> tuple[dict, int]:
  """`(header without __metadata__, offset of the data)` of an open safetensors file.

  Raises:
    ValueError: a truncated or unparsable header.
  """
  head = fh.read(8)
  if len(head) != 8:
    raise ValueError(f"{os.path.basename(path)}: not a safetensors file (truncated header)")
  size = int.from_bytes(head, "little")
  try:
    header = json.loads(fh.read(size))
  except (json.JSONDecodeError, UnicodeDecodeError):
    raise ValueError(f"{os.path.basename(path)}: not a safetensors file (bad header)") from None
  header.pop("__metadata__", None)
  return header, 8 + size


def write(path: str, entries: list[Entry], metadata: dict[str, str] | None = None) -> int:
  """Writes `entries` to a safetensors file at `path`, one block in memory at a time.

  Args:
    path: the file to create (overwritten).
    entries: `(name, shape, dtype, blocks)` per tensor, in file order.
    metadata: the header's `__metadata__` (string values), e.g. `{"format": "pt"}`.

  Returns:
    The number of tensor data bytes written.

  Raises:
    ValueError: a dtype the format has no name for, or blocks whose bytes do not add up to
      the tensor's shape.
  """
  header: dict = {"__metadata__": dict(metadata)} if metadata else {}
  offset = 0
  for name, shape, dtype, _ in entries:
    if isinstance(dtype, str):
      dtype_name, itemsize = dtype, _ITEMSIZES.get(dtype)
    else:
      dtype_name, itemsize = _NAMES.get(np.dtype(dtype)), np.dtype(dtype).itemsize
    if dtype_name is None or itemsize is None:
      shown = dtype if isinstance(dtype, str) else np.dtype(dtype)
      raise ValueError(f"tensor {name!r}: dtype {shown} has no safetensors name")
    nbytes = int(np.prod(shape, dtype=np.int64)) * itemsize
    header[name] = {
      "dtype": dtype_name,
      "shape": list(shape),
      "data_offsets": [offset, offset + nbytes],
    }
    offset += nbytes
  text = json.dumps(header, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
  with open(path, "wb") as fh:
    fh.write(len(text).to_bytes(8, "little"))
    fh.write(text)
    for name, _, dtype, blocks in entries:
      begin, end = header[name]["data_offsets"]
      written = 0
      for block in blocks():
        if not isinstance(block, bytes):
          block = np.ascontiguousarray(block, dtype=dtype).reshape(-1).view(np.uint8)
        fh.write(memoryview(block))
        written += len(block)
        del block
      if written != end - begin:
        raise ValueError(f"tensor {name!r}: {written} bytes written, its shape needs {end - begin}")
  return offset
