"""What a quantized tree stores and represents: bytes as stored, logical parameter count."""

from __future__ import annotations

from collections.abc import Mapping
import math

import jax
import jax.numpy as jnp

from oftjax import params as P
from oftjax.quant import codes
from oftjax.quant.kernel import QUANT_KEY


def logical_count(tree) -> int:
  """Number of parameters the tree represents (a `kernel_q` counts as its full kernel)."""
  total = 0
  for key, value in tree.items():
    if key == QUANT_KEY:
      total += math.prod(jax.eval_shape(codes.dequantize_matrix, value).shape)
    elif isinstance(value, Mapping):
      total += logical_count(value)
    else:
      total += math.prod(value.shape)
  return total


def storage_report(frozen, reference_dtype=jnp.bfloat16) -> dict:
  """Bytes of the quantized layers as stored vs the same kernels in `reference_dtype`."""
  stored = reference = 0

  def visit(tree):
    nonlocal stored, reference
    for key, value in tree.items():
      if key == QUANT_KEY:
        stored += P.tree_bytes(value)
        shape = jax.eval_shape(codes.dequantize_matrix, value).shape  # no compute
        reference += jnp.dtype(reference_dtype).itemsize * math.prod(shape)
      elif isinstance(value, Mapping):
        visit(value)

  visit(frozen)
  return {
    "stored_bytes": stored,
    "reference_bytes": reference,
    "ratio": stored / reference if reference else None,
  }
