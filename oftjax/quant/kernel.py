"""One layer's kernel stored quantized: the `kernel_q` leaves, to and from a float kernel.

`kernel_q` holds the kernel as a matrix `[*lead, d_in, d_out]`
(`oftjax.geometry.kernel_to_matrix`: rows in the input's flattening order,
docs/DESIGN.md §1) in NF4 or int8 (`oftjax.quant.codes`)::

    {'q_proj': {'kernel_q': {'nf4': uint8[L, 32, 64], 'absmax_q': ..., ...},
                'oft': {'weight': ...}}}

`kernel_q` is not an adapter key, so `oftjax.split_params` keeps it in the
frozen tree and `oftjax.tree_bytes` counts the quantized storage. Importing this
module registers `kernel_q` as a kernel storage (`oftjax.layer`), so code that
needs a layer's float kernel (the original OFT path) reads it without knowing about
quantization.

References:
  Dettmers et al. "QLoRA", arXiv:2305.14314; Qiu et al. OFTv2 (QOFT), arXiv:2506.19847.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from oftjax import geometry as geo
from oftjax import layer
from oftjax.quant import codes

QUANT_KEY = "kernel_q"


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def quantize_kernel(
  kernel: jax.Array, geom: geo.LayerGeometry, mode: str, block_size: int, double_quant: bool
) -> dict:
  """`kernel_q` leaves of a (possibly stacked) kernel (one compilation per shape)."""
  return codes.quantize_matrix(geo.kernel_to_matrix(kernel, geom), mode, block_size, double_quant)


def dequantize_kernel(leaves: dict, geom: geo.LayerGeometry, dtype=jnp.float32) -> jax.Array:
  """The kernel `[*lead, *kernel_shape]` in `dtype` back from its `kernel_q` leaves."""
  return geo.matrix_to_kernel(codes.dequantize_matrix(leaves, dtype), geom)


def is_quantized(module: nn.Module) -> bool:
  """Whether a bound linear layer stores its kernel as `kernel_q`."""
  return layer.kernel_storage(module) == QUANT_KEY


def _read_kernel(module: nn.Module, leaves: dict, geom: geo.LayerGeometry) -> jax.Array:
  """The layer's kernel in its `param_dtype`, dequantized inside the trace."""
  return dequantize_kernel(leaves, geom, getattr(module, "param_dtype", jnp.float32))


layer.register_kernel_storage(QUANT_KEY, _read_kernel)
