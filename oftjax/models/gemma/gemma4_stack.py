"""The Gemma 4 decoder stack: one `nn.scan` per segment of repeating layer groups.

Parameters live under `layers/segment_{s}/slot_{j}/...`, stacked on a leading axis of
length `repeats` (the scan): slot `j` of copy `r` of segment `s` is decoder layer
`segment.layer(r, j)` (see `gemma4_schedule`). E.g. a 35-layer model whose last 20 layers
share keys/values, with four sliding layers then one full layer repeating, has
`segment_0` (5 slots x 3) and `segment_1` (5 KV-shared slots x 4).

KV sharing flows through the scan carry: each non-shared layer leaves its keys and values
(its whole updated cache when decoding) in the carry under its type, so a shared layer
finds those of the last earlier layer of its type, as transformers' `shared_kv_states`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from oftjax.models import remat
from oftjax.models.gemma.gemma4_config import Gemma4Config
from oftjax.models.gemma.gemma4_layers import Gemma4DecoderLayer
from oftjax.models.gemma.gemma4_schedule import LayerKind, Segment, layer_kinds, layer_schedule

Array = Any


def type_key(kind: LayerKind) -> str:
  """'sliding' or 'full': the key of a layer type in contexts and shared-KV carries."""
  return "sliding" if kind.sliding else "full"


def shared_types(config: Gemma4Config) -> tuple[str, ...]:
  """Types ('sliding', 'full') some KV-shared layer reads from the carry, sorted."""
  return tuple(sorted({type_key(k) for k in layer_kinds(config) if k.kv_shared}))


class LayerGroup(nn.Module):
  """One copy of a segment's layer group: the body of that segment's scan.

  Attributes:
    config: the model config.
    kinds: the group's layer kinds, one per slot.
  """

  config: Gemma4Config
  kinds: tuple[LayerKind, ...]

  @nn.compact
  def __call__(self, carry, xs, context):
    """Runs the group's layers in order.

    Args:
      carry: `(x, shared)`: the residual stream and `{type: (k, v)}` for shared layers.
      xs: `(per_layer_inputs, caches)`: `[batch, time, slots, ple]` or None, and one cache
        (or None) per slot.
      context: rope tables and masks per type, and the cache index (broadcast).

    Returns:
      `((x, shared), new_caches)`.
    """
    cfg = self.config
    x, shared = carry
    per_layer_inputs, caches = xs
    layer_cls = remat.checkpointed(Gemma4DecoderLayer, cfg.remat)
    new_caches = []
    for slot, kind in enumerate(self.kinds):
      key = type_key(kind)
      ple = None if per_layer_inputs is None else per_layer_inputs[:, :, slot]
      x, kv, cache = layer_cls(cfg, kind, name=f"slot_{slot}")(
        x, ple, context, shared[key] if kind.kv_shared else None, caches[slot]
      )
      if not kind.kv_shared and key in shared:
        shared = {**shared, key: tuple(a.astype(s.dtype) for a, s in zip(kv, shared[key]))}
      new_caches.append(cache)
    return (x, shared), tuple(new_caches)


def _segment_inputs(per_layer_inputs, segment: Segment):
  """A segment's PLE inputs `[repeats, batch, time, slots, ple]`, or None."""
  if per_layer_inputs is None:
    return None
  batch, time = per_layer_inputs.shape[:2]
  part = per_layer_inputs[:, :, segment.start : segment.stop]
  part = part.reshape(batch, time, segment.repeats, len(segment.kinds), -1)
  return jnp.moveaxis(part, 2, 0)


class Gemma4Layers(nn.Module):
  """All decoder layers, as one scan per segment.

  Attributes:
    config: the model config.
  """

  config: Gemma4Config

  @nn.compact
  def __call__(self, x, per_layer_inputs, context, shared, caches=None):
    """Applies every layer.

    Args:
      x: `[batch, time, hidden]` embedded tokens.
      per_layer_inputs: `[batch, time, num_layers, ple]` PLE inputs, or None.
      context: see `Gemma4DecoderLayer`.
      shared: `{type: (k, v)}` zeros of the keys/values KV-shared layers read (their
        shapes and dtypes fix the carry's).
      caches: None, or one tuple per segment of per-slot caches (see `init_cache`).

    Returns:
      `(x, new_caches)` (`new_caches` mirrors `caches`; all None without caches).
    """
    cfg = self.config
    new_caches = []
    for index, segment in enumerate(layer_schedule(cfg)):
      scan = nn.scan(
        LayerGroup,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(0, nn.broadcast),
        length=segment.repeats,
        unroll=segment.repeats if cfg.unroll_layers else 1,
      )
      seg_caches = caches[index] if caches is not None else (None,) * len(segment.kinds)
      (x, shared), seg_caches = scan(cfg, segment.kinds, name=f"segment_{index}")(
        (x, shared), (_segment_inputs(per_layer_inputs, segment), seg_caches), context
      )
      new_caches.append(seg_caches)
    return x, tuple(new_caches)
