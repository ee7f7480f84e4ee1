"""A reader of TensorBoard event files for tests (TensorBoard itself is not installed).

An event file is a sequence of TFRecords (little-endian `uint64` length, masked CRC32C of
the length, the `Event` protobuf, masked CRC32C of it); the protobuf classes are the ones
tensorboardX ships. Like TensorBoard's event accumulator, a `SessionLog.START` event at
step `s` (tensorboardX's `purge_step`) hides what earlier events recorded at steps `>= s`.
"""

import os
import struct

from tensorboardX.crc32c import crc32c
from tensorboardX.proto import event_pb2


def _masked(data: bytes) -> int:
  """TFRecord's masked CRC32C (rotate right by 15, add a constant)."""
  crc = crc32c(data) & 0xFFFFFFFF
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def events(path: str):
  """The `Event` protobufs of one event file, checking every record's framing and CRCs."""
  with open(path, "rb") as f:
    blob = f.read()
  at = 0
  while at < len(blob):
    header = blob[at : at + 8]
    (length,) = struct.unpack("<Q", header)
    (header_crc,) = struct.unpack("<I", blob[at + 8 : at + 12])
    assert header_crc == _masked(header), f"{path}: bad length CRC at byte {at}"
    data = blob[at + 12 : at + 12 + length]
    (data_crc,) = struct.unpack("<I", blob[at + 12 + length : at + 16 + length])
    assert len(data) == length and data_crc == _masked(data), f"{path}: bad record at {at}"
    event = event_pb2.Event()
    event.ParseFromString(data)
    yield event
    at += 16 + length


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """`{tag: [(step, value), ...]}` of every scalar in `logdir`'s event files, in order.

  Files are read in name order (their names start with the creation time); a purge event
  drops the values recorded before it at its step or later, as TensorBoard shows them.
  """
  found: dict[str, list[tuple[int, float]]] = {}
  names = sorted(n for n in os.listdir(logdir) if n.startswith("events.out.tfevents."))
  for name in names:
    for event in events(os.path.join(logdir, name)):
      if event.HasField("session_log") and event.session_log.status == event.session_log.START:
        found = {tag: [(s, v) for s, v in rows if s < event.step] for tag, rows in found.items()}
      if event.HasField("summary"):
        for value in event.summary.value:
          found.setdefault(value.tag, []).append((event.step, value.simple_value))
  return found
