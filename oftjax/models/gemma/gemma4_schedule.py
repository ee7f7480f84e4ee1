"""Which Gemma 4 layers share a parameter shape, and how the stack is scanned.

A Gemma 4 layer's parameters depend on two things: its attention type (sliding or full:
own head width, key/value heads, maybe no `v_proj`) and whether it reuses an earlier
layer's keys and values (no `k_proj`/`v_proj`/`k_norm`, maybe a double-wide MLP). The
stack is cut into *segments*, each a group of consecutive layer kinds repeated some
number of times (e.g. `[sliding x4, full]` x 3 unshared, then the same group x 4 shared).
Each segment is one `nn.scan` over its repeats whose body runs the group's layers in
order, so compile time grows with the group length and the number of segments, not with
depth. The cut minimises the layers traced plus the segments (a scan costs about as much to
compile as a layer), then the layers traced.
"""

from __future__ import annotations

import dataclasses
import functools

from oftjax.models.gemma.gemma4_config import Gemma4Config


@dataclasses.dataclass(frozen=True)
class LayerKind:
  """What fixes a Gemma 4 layer's parameter shapes.

  Attributes:
    sliding: a sliding-window layer (else full attention).
    kv_shared: reuses the keys/values of the last earlier layer of its type.
  """

  sliding: bool
  kv_shared: bool


@dataclasses.dataclass(frozen=True)
class Segment:
  """`repeats` consecutive copies of a group of layer kinds, scanned as one.

  Attributes:
    start: index of the segment's first layer.
    kinds: the repeating group, one kind per slot.
    repeats: how many times the group repeats (the scan length).
  """

  start: int
  kinds: tuple[LayerKind, ...]
  repeats: int

  @property
  def stop(self) -> int:
    """One past the segment's last layer."""
    return self.start + len(self.kinds) * self.repeats

  def layer(self, repeat: int, slot: int) -> int:
    """The decoder-layer index of `slot` in the `repeat`-th copy of the group."""
    return self.start + repeat * len(self.kinds) + slot


def layer_kinds(config: Gemma4Config) -> tuple[LayerKind, ...]:
  """The kind of every layer, in order."""
  first_shared = config.first_kv_shared_layer
  return tuple(
    LayerKind(sliding=s, kv_shared=i >= first_shared) for i, s in enumerate(config.layer_is_sliding)
  )


@functools.lru_cache(maxsize=64)
def _cut(kinds: tuple[LayerKind, ...]) -> tuple[Segment, ...]:
  """Segments covering `kinds` with the fewest traced layers + segments, then traced layers."""
  n = len(kinds)
  best: list = [None] * (n + 1)  # best[i]: ((traced + segments, traced), (group, repeats))
  best[n] = ((0, 0), None)
  for i in range(n - 1, -1, -1):
    for size in range(1, n - i + 1):
      group = kinds[i : i + size]
      repeats = 1
      while kinds[i + repeats * size : i + (repeats + 1) * size] == group:
        repeats += 1
      for r in range(1, repeats + 1):
        rest = best[i + r * size][0]
        cost = (size + 1 + rest[0], size + rest[1])
        if best[i] is None or cost < best[i][0]:
          best[i] = (cost, (size, r))
  segments, i = [], 0
  while i < n:
    size, repeats = best[i][1]
    segments.append(Segment(start=i, kinds=kinds[i : i + size], repeats=repeats))
    i += size * repeats
  return tuple(segments)


def layer_schedule(config: Gemma4Config) -> tuple[Segment, ...]:
  """The segments the decoder stack is scanned in (see the module docstring)."""
  return _cut(layer_kinds(config))
