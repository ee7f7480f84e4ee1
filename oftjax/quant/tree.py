"""Quantizing and dequantizing a tree's targeted kernels (`kernel` <-> `kernel_q`).

Tensor by tensor, so that at most one extra full-precision kernel exists at a time:
`quantize_params` on a loaded tree, `quantize_on_load` as the loader's hook
(the full-precision tree never exists), `dequantize_params` back to float (e.g.
to export). The leaves' layout is `oftjax.quant.kernel`'s.

References:
  Dettmers et al. "QLoRA", arXiv:2305.14314; Qiu et al. OFTv2 (QOFT), arXiv:2506.19847.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from oftjax import geometry as geo
from oftjax import params as P
from oftjax.quant import codes
from oftjax.quant.kernel import QUANT_KEY, dequantize_kernel, quantize_kernel

_dequantize_kernel = jax.jit(dequantize_kernel, static_argnums=(1, 2))  # whole trees, eagerly


def quantize_params(
  params,
  geometries: Mapping[str, geo.LayerGeometry],
  mode: str,
  block_size: int = codes.NF4_BLOCK,
  double_quant: bool = True,
  consume: bool = False,
) -> dict:
  """Replaces the kernel of every layer in `geometries` by its quantized `kernel_q`.

  Works tensor by tensor: one kernel is converted (one jitted call per shape) before
  the next is read, so at most one extra full-precision kernel exists at a time.

  Args:
    params: a base tree (adapter leaves, if any, are kept as they are).
    geometries: `{path: LayerGeometry}` (`oftjax.adapt(...).geometries`);
      exactly these layers are quantized (use `.*` targets for all).
    mode: `'nf4'` or `'int8'`.
    block_size: NF4 block (QLoRA: 64).
    double_quant: quantize NF4's absmax constants too (QLoRA: True).
    consume: take each kernel out of `params` itself (in place) and free it
      (device buffers are deleted) as soon as it is quantized, so the full-precision
      weights shrink while the quantized ones grow (`params` loses its kernels).

  Returns:
    A new tree (new containers; untouched leaves shared with `params`). Kernels
    given as host (NumPy) arrays come back as host arrays, ready for `device_put`
    onto a multi-process mesh.
  """
  if mode not in codes.MODES:
    raise ValueError(f"unknown quantization {mode!r}; use one of {codes.MODES}")
  out, layers = P.edit_layers(params, geometries)
  for path, geom, node in layers:
    if geom.weight != geo.PLAIN_WEIGHT:
      raise ValueError(
        f"layer '{path}': quantization stores a weight named 'kernel', not "
        f"'{geom.weight}'; exclude the layer from the quantized geometries"
      )
    if QUANT_KEY in node:
      raise ValueError(f"layer '{path}' is already quantized")
    kernel = node.pop("kernel")
    if consume:
      del P.node_at(params, path)["kernel"]
    node[QUANT_KEY] = _quantized_leaves(
      kernel, path, geom, mode, block_size, double_quant, free=consume
    )
    del kernel
  return out


def quantize_on_load(
  geometries: Mapping[str, geo.LayerGeometry],
  mode: str,
  block_size: int = codes.NF4_BLOCK,
  double_quant: bool = True,
):
  """An `on_param` hook for `gemma.load`: quantizes each targeted kernel as it arrives.

  The loader reads one parameter at a time, so with this hook at most one full-precision
  kernel (all layers of one projection) exists at once; the result equals
  `quantize_params(load(...)[1], geometries, mode)` leaf for leaf.
  """
  if mode not in codes.MODES:
    raise ValueError(f"unknown quantization {mode!r}; use one of {codes.MODES}")

  def on_param(path: tuple, value) -> dict:
    layer = "/".join(path[:-1])
    if path[-1] != "kernel" or layer not in geometries:
      return {path[-1]: value}
    return {
      QUANT_KEY: _quantized_leaves(
        value, layer, geometries[layer], mode, block_size, double_quant, free=True
      )
    }

  return on_param


def _quantized_leaves(kernel, path, geom, mode, block_size, double_quant, free: bool):
  """`kernel_q` leaves of one kernel, on the host when the kernel was; `free`: delete it."""
  try:
    leaves = quantize_kernel(kernel, geom, mode, block_size, double_quant)
  except ValueError as e:
    raise ValueError(f"layer '{path}': {e}") from None
  if not isinstance(kernel, jax.Array):
    return jax.device_get(leaves)
  if free:
    jax.block_until_ready(leaves)
    kernel.delete()
  return leaves


def dequantize_params(
  params, geometries: Mapping[str, geo.LayerGeometry], dtype=jnp.float32
) -> dict:
  """A tree with every `kernel_q` back to a `dtype` `kernel` (e.g. to export or evaluate)."""
  out, layers = P.edit_layers(params, geometries)
  for _, geom, node in layers:
    if QUANT_KEY in node:
      node["kernel"] = _dequantize_kernel(node.pop(QUANT_KEY), geom, jnp.dtype(dtype))
  return out
