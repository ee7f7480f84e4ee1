"""Quantized frozen kernels in a parameter tree, and their on-the-fly dequantization.

``quantize_params`` replaces each targeted layer's ``kernel`` by a ``kernel_q`` dict of
plain arrays (:mod:`oftjax.quant.codes`) holding the kernel *as a matrix*
``[..., d_in, d_out]`` (rows in the input's flattening order, docs/DESIGN.md §1)::

    {'q_proj': {'kernel_q': {'nf4': uint8[L, 32, 64], 'absmax_q': ..., ...},
                'oft': {'weight': ...}}}

``kernel_q`` is not an adapter key, so :func:`oftjax.split_params` keeps it in the frozen
tree and :func:`oftjax.tree_bytes` counts the quantized storage. The adapter interceptor
(:mod:`oftjax.intercept`) sees ``kernel_q`` and calls the layer with
:func:`float_params` (kernel dequantized inside the trace: between jitted steps only the
quantized bytes exist); OFT rotates the input first, LoRA adds its term after.

References:
  Dettmers et al. "QLoRA", arXiv:2305.14314; Qiu et al. OFTv2 (QOFT), arXiv:2506.19847.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from oftjax import geometry as geo
from oftjax import params as P
from oftjax.quant import codes

QUANT_KEY = "kernel_q"


def _perm(geom: geo.LayerGeometry) -> tuple[int, ...]:
  rest = tuple(a for a in range(len(geom.kernel_shape)) if a not in geom.kernel_axes)
  return geom.kernel_axes + rest


def kernel_to_matrix(kernel: jax.Array, geom: geo.LayerGeometry) -> jax.Array:
  """``[*lead, *kernel_shape]`` -> ``[*lead, d_in, d_out]`` (lead: stacked layer axes)."""
  lead = kernel.ndim - len(geom.kernel_shape)
  perm = tuple(range(lead)) + tuple(lead + a for a in _perm(geom))
  return jnp.transpose(kernel, perm).reshape(*kernel.shape[:lead], geom.d_in, geom.d_out)


def matrix_to_kernel(mat: jax.Array, geom: geo.LayerGeometry) -> jax.Array:
  """Inverse of :func:`kernel_to_matrix`."""
  lead = mat.ndim - 2
  perm = _perm(geom)
  moved = mat.reshape(*mat.shape[:lead], *(geom.kernel_shape[p] for p in perm))
  inverse = [0] * len(perm)
  for i, p in enumerate(perm):
    inverse[p] = i
  return jnp.transpose(moved, tuple(range(lead)) + tuple(lead + i for i in inverse))


def quantize_params(params, geometries: Mapping[str, geo.LayerGeometry], mode: str,
                    block_size: int = codes.NF4_BLOCK, double_quant: bool = True,
                    consume: bool = False) -> dict:
  """Replaces the kernel of every layer in ``geometries`` by its quantized ``kernel_q``.

  Works tensor by tensor: one kernel is converted (one jitted call per shape) before
  the next is read, so at most one extra full-precision kernel exists at a time.

  Args:
    params: a base tree (adapter leaves, if any, are kept as they are).
    geometries: ``{path: LayerGeometry}`` from :func:`oftjax.record_geometries`;
      exactly these layers are quantized (use a ``.*`` targets trace for all).
    mode: ``'nf4'`` or ``'int8'``.
    block_size, double_quant: NF4 block and double quantization (QLoRA: 64, True).
    consume: take each kernel out of ``params`` itself (in place) and free it
      (device buffers are deleted) as soon as it is quantized, so the full-precision
      weights shrink while the quantized ones grow (``params`` loses its kernels).

  Returns:
    A new tree (new containers; untouched leaves shared with ``params``). Kernels
    given as host (NumPy) arrays come back as host arrays, ready for ``device_put``
    onto a multi-process mesh.
  """
  if mode not in codes.MODES:
    raise ValueError(f"unknown quantization {mode!r}; use one of {codes.MODES}")
  out = P.copy_containers(params)
  for path, geom in geometries.items():
    node = P.node_at(out, path)
    if QUANT_KEY in node:
      raise ValueError(f"layer '{path}' is already quantized")
    kernel = node.pop("kernel")
    if consume:
      del P.node_at(params, path)["kernel"]
    node[QUANT_KEY] = _quantized_leaves(kernel, path, geom, mode, block_size, double_quant,
                                        free=consume)
    del kernel
  return out


def quantize_on_load(geometries: Mapping[str, geo.LayerGeometry], mode: str,
                     block_size: int = codes.NF4_BLOCK, double_quant: bool = True):
  """An ``on_param`` hook for ``gemma.load``: quantizes each targeted kernel as it arrives.

  The loader reads one parameter at a time, so with this hook at most one full-precision
  kernel (all layers of one projection) exists at once; the result equals
  ``quantize_params(load(...)[1], geometries, mode)`` leaf for leaf.
  """
  if mode not in codes.MODES:
    raise ValueError(f"unknown quantization {mode!r}; use one of {codes.MODES}")

  def on_param(path: tuple, value) -> dict:
    layer = "/".join(path[:-1])
    if path[-1] != "kernel" or layer not in geometries:
      return {path[-1]: value}
    return {QUANT_KEY: _quantized_leaves(value, layer, geometries[layer], mode, block_size,
                                         double_quant, free=True)}

  return on_param


def _quantized_leaves(kernel, path, geom, mode, block_size, double_quant, free: bool):
  """``kernel_q`` leaves of one kernel, on the host when the kernel was; ``free``: delete it."""
  try:
    leaves = _quantize_kernel(kernel, geom, mode, block_size, double_quant)
  except ValueError as e:
    raise ValueError(f"layer '{path}': {e}") from None
  if not isinstance(kernel, jax.Array):
    return jax.device_get(leaves)
  if free:
    jax.block_until_ready(leaves)
    kernel.delete()
  return leaves


def dequantize_params(params, geometries: Mapping[str, geo.LayerGeometry],
                      dtype=jnp.float32) -> dict:
  """A tree with every ``kernel_q`` back to a ``dtype`` ``kernel`` (e.g. to export or evaluate)."""
  out = P.copy_containers(params)
  for path, geom in geometries.items():
    node = P.node_at(out, path)
    if QUANT_KEY in node:
      node["kernel"] = _dequantize_kernel(node.pop(QUANT_KEY), geom, jnp.dtype(dtype))
  return out


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _quantize_kernel(kernel, geom, mode, block_size, double_quant):
  return codes.quantize_matrix(kernel_to_matrix(kernel, geom), mode, block_size, double_quant)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _dequantize_kernel(leaves, geom, dtype):
  return matrix_to_kernel(codes.dequantize_matrix(leaves, dtype), geom)


def is_quantized(module: nn.Module) -> bool:
  """Whether a bound linear layer stores its kernel as ``kernel_q``."""
  return module.scope is not None and module.has_variable("params", QUANT_KEY)


def has_kernel(module: nn.Module) -> bool:
  """Whether the layer's kernel exists yet (plain or quantized); False during init."""
  return module.has_variable("params", "kernel") or is_quantized(module)


def float_params(module: nn.Module, geom: geo.LayerGeometry) -> dict:
  """The layer's own params without adapters, ``kernel_q`` dequantized to ``kernel``.

  The dequantized kernel has the layer's ``param_dtype`` and exists only inside the
  trace (per scanned layer under ``nn.scan``).
  """
  own = module.variables["params"]
  out = {k: v for k, v in own.items() if k not in P.ADAPTER_KEYS and k != QUANT_KEY}
  if QUANT_KEY in own:
    dtype = getattr(module, "param_dtype", jnp.float32)
    out["kernel"] = matrix_to_kernel(codes.dequantize_matrix(own[QUANT_KEY], dtype), geom)
  return out


def logical_count(tree) -> int:
  """Number of parameters the tree represents (a ``kernel_q`` counts as its full kernel)."""
  total = 0
  for key, value in tree.items():
    if key == QUANT_KEY:
      total += math.prod(jax.eval_shape(codes.dequantize_matrix, value).shape)
    elif isinstance(value, Mapping):
      total += logical_count(value)
    else:
      total += math.prod(value.shape)
  return total


def dequantized_call(module: nn.Module, geom: geo.LayerGeometry, call) -> Callable:
  """``f(x, *rest, **kw)`` running the layer on its dequantized kernel via ``call``.

  ``call(module, params, x, *rest, **kw)`` applies the layer to the given params. The
  call is wrapped in ``jax.checkpoint`` so that the backward pass recomputes the
  dequantized kernel from ``kernel_q`` instead of keeping it: without this, the
  dequantized kernels of all scanned layers were saved as residuals, a full-precision
  copy of every targeted kernel in the step's temporaries (measured with
  ``memory_analysis()``: QOFT temp bytes = OFT's + the fp32 kernel bytes).
  """
  own = module.variables["params"]
  quantized = own[QUANT_KEY]
  others = {k: v for k, v in own.items() if k not in P.ADAPTER_KEYS and k != QUANT_KEY}
  dtype = getattr(module, "param_dtype", jnp.float32)

  def run(x, *rest, **kwargs):
    def layer(q, x):
      kernel = matrix_to_kernel(codes.dequantize_matrix(q, dtype), geom)
      return call(module, {**others, "kernel": kernel}, x, *rest, **kwargs)

    return jax.checkpoint(layer)(quantized, x)

  return run


def storage_report(frozen, reference_dtype=jnp.bfloat16) -> dict:
  """Bytes of the quantized layers as stored vs the same kernels in ``reference_dtype``."""
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
  return {"stored_bytes": stored, "reference_bytes": reference,
          "ratio": stored / reference if reference else None}
