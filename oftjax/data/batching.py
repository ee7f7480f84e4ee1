"""Packing tokenized examples into fixed-shape batches, in a seeded, resumable order.

A batch is a dict of numpy arrays, all `[batch_size, seq_len]`:

- `inputs` (int32): token ids fed to the model; `pad_id` on padding.
- `targets` (int32): the next token of the same example, aligned to `inputs`:
  `targets[b, t]` is what position `t` must predict. Each example of `n` tokens occupies
  `n - 1` positions holding `inputs = tokens[:-1]` and `targets = tokens[1:]`, so no target
  ever crosses into another example. `pad_id` on padding.
- `loss_mask` (float32): 1 where `targets` is a training target (the example's loss mask
  shifted with the targets), 0 elsewhere and on padding.
- `segment_ids` (int32): 1, 2, ... for the examples of a row in order, 0 on padding. Attention
  must stay within a segment (pass them to the model).
- `positions` (int32): restart at 0 at the start of each segment; 0 on padding.

The loss is `sum(loss_mask * xent(logits(inputs), targets)) / sum(loss_mask)`.

Order: epoch `e` shuffles the examples with `numpy.random.default_rng([seed, e])` and packs
them first-fit into rows; batches take consecutive rows and run on into the next epoch, so no
row is dropped. The position of the next batch is `{"epoch": e, "row": r}`; a stream created
with that state yields exactly the batches an uninterrupted stream would have.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from oftjax.data.tokenize import Example

BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def pack_rows(lengths: Sequence[int], seq_len: int, max_open_rows: int = 64) -> list[list[int]]:
  """Packs items into rows of `seq_len` slots, first-fit in the given order.

  At most `max_open_rows` rows accept items at once (the oldest is closed when a new one
  would exceed that), which keeps the cost linear and the order close to the input order.

  Args:
    lengths: slots each item needs (`Example.num_positions`), each `<= seq_len`.
    seq_len: slots per row.
    max_open_rows: rows still accepting items.

  Returns:
    Rows as lists of item indices, in the order the rows were closed.
  """
  finished: list[list[int]] = []
  open_rows: list[list[int]] = []
  room: list[int] = []
  for index, length in enumerate(lengths):
    if length > seq_len:
      raise ValueError(f"item {index} needs {length} positions, more than seq_len={seq_len}")
    for slot, free in enumerate(room):
      if free >= length:
        open_rows[slot].append(index)
        room[slot] -= length
        break
    else:
      open_rows.append([index])
      room.append(seq_len - length)
      if len(open_rows) > max_open_rows:
        finished.append(open_rows.pop(0))
        room.pop(0)
  return finished + open_rows


def make_batch(
  examples: Sequence[Example],
  rows: Sequence[Sequence[int]],
  seq_len: int,
  batch_size: int | None = None,
  pad_id: int = 0,
) -> dict[str, np.ndarray]:
  """Lays packed rows out as a batch dict (see the module docstring).

  Args:
    examples: the examples the rows index into.
    rows: lists of example indices; each row's positions must fit `seq_len`.
    seq_len: positions per row.
    batch_size: number of rows in the batch; missing rows are all padding. Defaults to `len(rows)`.
    pad_id: token id written on padding.

  Returns:
    The batch dict.
  """
  batch_size = len(rows) if batch_size is None else batch_size
  if len(rows) > batch_size:
    raise ValueError(f"{len(rows)} rows do not fit batch_size={batch_size}")
  shape = (batch_size, seq_len)
  batch = {
    "inputs": np.full(shape, pad_id, np.int32),
    "targets": np.full(shape, pad_id, np.int32),
    "loss_mask": np.zeros(shape, np.float32),
    "segment_ids": np.zeros(shape, np.int32),
    "positions": np.zeros(shape, np.int32),
  }
  for b, row in enumerate(rows):
    start = 0
    for segment, index in enumerate(row, start=1):
      example = examples[index]
      n = example.num_positions
      if start + n > seq_len:
        raise ValueError(f"row {b} needs more than seq_len={seq_len} positions")
      span = slice(start, start + n)
      batch["inputs"][b, span] = example.tokens[:-1]
      batch["targets"][b, span] = example.tokens[1:]
      batch["loss_mask"][b, span] = example.loss_mask[1:]
      batch["segment_ids"][b, span] = segment
      batch["positions"][b, span] = np.arange(n)
      start += n
  return batch


def padding_fraction(batch: dict[str, np.ndarray]) -> float:
  """Fraction of positions in `batch` that hold no token (`segment_ids == 0`)."""
  return float(np.mean(batch["segment_ids"] == 0))


class PackedBatches:
  """An endless, seeded, resumable stream of packed training batches.

  Example:
    >>> stream = PackedBatches(dataset.examples, batch_size=16, seq_len=64, seed=0)
    >>> batch = next(stream)
    >>> saved = stream.state          # {"epoch": 0, "row": 16}, JSON-serialisable
    >>> again = PackedBatches(dataset.examples, batch_size=16, seq_len=64, seed=0, state=saved)
    >>> # next(again) equals next(stream).

  Args:
    examples: tokenized examples, each fitting `seq_len` positions.
    batch_size: rows per batch.
    seq_len: positions per row.
    seed: seed of the per-epoch shuffles.
    state: where to resume, a `state` from an earlier stream with the same arguments.
    shuffle: shuffle each epoch (else file order every epoch).
    pad_id: token id written on padding.
    max_open_rows: see `pack_rows`.
  """

  def __init__(
    self,
    examples: Sequence[Example],
    *,
    batch_size: int,
    seq_len: int,
    seed: int = 0,
    state: dict[str, int] | None = None,
    shuffle: bool = True,
    pad_id: int = 0,
    max_open_rows: int = 64,
  ):
    if not examples:
      raise ValueError("no examples to batch")
    if batch_size < 1:
      raise ValueError(f"batch_size must be positive, got {batch_size}")
    self.examples = list(examples)
    self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
    self.shuffle, self.pad_id, self.max_open_rows = shuffle, pad_id, max_open_rows
    self._lengths = np.array([e.num_positions for e in self.examples])
    self._epoch, self._row = 0, 0
    self._rows_cache: tuple[int, list[list[int]]] | None = None
    if state is not None:
      epoch, row = int(state["epoch"]), int(state["row"])
      if epoch < 0 or not 0 <= row < len(self.epoch_rows(epoch)):
        raise ValueError(f"resume state {state} is outside the data stream")
      self._epoch, self._row = epoch, row

  def epoch_rows(self, epoch: int) -> list[list[int]]:
    """The packed rows (lists of example indices) of `epoch`, in stream order."""
    if self._rows_cache is None or self._rows_cache[0] != epoch:
      order = np.arange(len(self.examples))
      if self.shuffle:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
      rows = pack_rows(self._lengths[order].tolist(), self.seq_len, self.max_open_rows)
      self._rows_cache = (epoch, [[int(order[i]) for i in row] for row in rows])
    return self._rows_cache[1]

  @property
  def state(self) -> dict[str, int]:
    """Position of the next batch, `{"epoch": e, "row": r}` (JSON-serialisable)."""
    return {"epoch": self._epoch, "row": self._row}

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rows: list[list[int]] = []
    while len(rows) < self.batch_size:
      epoch_rows = self.epoch_rows(self._epoch)
      take = epoch_rows[self._row : self._row + self.batch_size - len(rows)]
      rows += take
      self._row += len(take)
      if self._row >= len(epoch_rows):
        self._epoch, self._row = self._epoch + 1, 0
    return make_batch(self.examples, rows, self.seq_len, self.batch_size, self.pad_id)


def sequential_batches(
  examples: Sequence[Example], *, batch_size: int, seq_len: int, pad_id: int = 0
) -> Iterator[dict[str, np.ndarray]]:
  """One pass over `examples` in order, packed, for evaluation (e.g. held-out loss).

  Every batch has the full `[batch_size, seq_len]` shape (the last one is topped up with
  all-padding rows), so one compiled step serves them all.
  """
  rows = pack_rows([e.num_positions for e in examples], seq_len)
  for start in range(0, len(rows), batch_size):
    yield make_batch(examples, rows[start : start + batch_size], seq_len, batch_size, pad_id)
