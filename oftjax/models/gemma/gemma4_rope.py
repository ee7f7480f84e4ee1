"""Gemma 4 rotary embeddings: 'default', 'linear' and 'proportional' inverse frequencies.

'proportional' (Gemma 4's full-attention layers) rotates only the first
`int(partial_rotary_factor * head_dim // 2)` frequency pairs, with exponents over the whole
`head_dim`, and gives the remaining pairs frequency zero (cos 1, sin 0: passed through),
so its tables still span the full head. Rotation is by halves (`rotate_half`), as in the
other Gemma models (`oftjax.models.gemma.layers.apply_rope`).

References:
  transformers `modeling_rope_utils._compute_proportional_rope_parameters` and
  `Gemma4TextRotaryEmbedding.compute_default_rope_parameters` (5.24).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from oftjax.models.gemma.gemma4_config import Gemma4Rope

Array = Any


def inv_freq(rope: Gemma4Rope, head_dim: int) -> np.ndarray:
  """Inverse frequencies `[head_dim // 2]` in fp32, as transformers computes them.

  Args:
    rope: the rope of one layer type.
    head_dim: that layer type's head width.

  Returns:
    The inverse frequencies (zeros for the pairs 'proportional' leaves unrotated).

  Raises:
    ValueError: an unknown rope kind.
  """
  if rope.kind in ("default", "linear"):
    rotated = head_dim // 2
  elif rope.kind == "proportional":
    rotated = int(rope.partial_rotary_factor * head_dim // 2)
  else:
    raise ValueError(f"rope kind {rope.kind!r} is not supported")
  exponents = np.arange(0, 2 * rotated, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
  freqs = np.float32(1.0) / (np.float32(rope.theta) ** exponents)
  freqs = np.concatenate([freqs, np.zeros(head_dim // 2 - rotated, np.float32)])
  return (freqs / np.float32(rope.factor)).astype(np.float32)


def rope_tables(positions: Array, rope: Gemma4Rope, head_dim: int, dtype) -> tuple[Array, Array]:
  """Cos and sin tables `[batch, time, head_dim]` for integer `positions` `[batch, time]`."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq(rope, head_dim))
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)
