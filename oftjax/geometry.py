"""Which axes of a linear layer's input and kernel are contracted.

Every supported layer (`nn.Dense`, `nn.DenseGeneral`, `nn.Einsum`) is described
by one einsum equation over its input and kernel. OFT rotates the contracted input
axes, flattened row-major in the input's order (so an output projection over
`heads × head_dim` matches a PyTorch Linear over the concatenated heads); merging
folds the rotation into the matching kernel axes, through the one kernel layout
`kernel_to_matrix` (also the layout quantized kernels are stored in).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

SUPPORTED_LAYERS = (nn.Dense, nn.DenseGeneral, nn.Einsum)


@dataclasses.dataclass(frozen=True)
class LayerGeometry:
  """Contraction structure of one linear layer call.

  Attributes:
    x_axes: input axes contracted with the kernel, in the input's order.
    kernel_axes: the matching kernel axes (same order as `x_axes`).
    kernel_shape: shape of one (un-stacked) kernel.
    lora_ok: whether the non-contracted kernel axes map one-to-one onto trailing
      output axes (no batch axes shared by input, kernel and output).
  """

  x_axes: tuple[int, ...]
  kernel_axes: tuple[int, ...]
  kernel_shape: tuple[int, ...]
  lora_ok: bool

  @property
  def d_in(self) -> int:
    return math.prod(self.kernel_shape[a] for a in self.kernel_axes)

  @property
  def d_out(self) -> int:
    return math.prod(self.kernel_shape) // self.d_in


def _normalize(axes, ndim: int) -> tuple[int, ...]:
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  return tuple(a % ndim for a in axes)


def geometry_of(module: nn.Module, path: str, x: jax.Array, kwargs: dict) -> LayerGeometry:
  """Derives the contraction structure of `module` applied to `x`.

  Raises:
    ValueError: for a layer form oftjax cannot adapt, naming the layer and the fix.
  """
  if isinstance(module, nn.Dense):
    return LayerGeometry((x.ndim - 1,), (0,), (x.shape[-1], module.features), True)
  if isinstance(module, nn.DenseGeneral):
    if module.batch_dims:
      raise ValueError(
        f"layer '{path}': DenseGeneral with batch_dims={module.batch_dims} is not "
        "supported by adapters; exclude it from the targets regex"
      )
    axis = _normalize(module.axis, x.ndim)
    features = _normalize(module.features, 1 << 30)
    shape = tuple(x.shape[a] for a in axis) + tuple(features)
    return LayerGeometry(axis, tuple(range(len(axis))), shape, True)
  if isinstance(module, nn.Einsum):
    equation = kwargs.get("einsum_str") or module.einsum_str
    equation = equation.replace(" ", "")
    if "..." in equation or "->" not in equation or equation.count(",") != 1:
      raise ValueError(
        f"layer '{path}': einsum '{equation}' is not supported (need explicit "
        "'x,kernel->out' without '...'); exclude it from the targets regex"
      )
    lhs, out = equation.split("->")
    xs, ks = lhs.split(",")
    contracted = [c for c in xs if c in ks and c not in out]
    if not contracted:
      raise ValueError(f"layer '{path}': einsum '{equation}' contracts no input axis")
    shared = [c for c in ks if c in xs and c in out]
    return LayerGeometry(
      tuple(xs.index(c) for c in contracted),
      tuple(ks.index(c) for c in contracted),
      tuple(module.shape),
      lora_ok=not shared
      and out == "".join(c for c in xs if c not in ks) + "".join(c for c in ks if c not in xs),
    )
  raise ValueError(
    f"layer '{path}' is a {type(module).__name__}; adapters support nn.Dense, "
    "nn.DenseGeneral and nn.Einsum only: narrow the targets regex"
  )


def flatten_input(x: jax.Array, geom: LayerGeometry) -> tuple[jax.Array, tuple]:
  """Moves the contracted axes of `x` last and flattens them to one axis `d_in`."""
  rest = [a for a in range(x.ndim) if a not in geom.x_axes]
  perm = tuple(rest) + geom.x_axes
  moved = jnp.transpose(x, perm)
  return moved.reshape(*moved.shape[: len(rest)], geom.d_in), (perm, moved.shape)


def unflatten_input(flat: jax.Array, plan: tuple) -> jax.Array:
  """Inverse of `flatten_input`."""
  perm, moved_shape = plan
  inverse = [0] * len(perm)
  for i, p in enumerate(perm):
    inverse[p] = i
  return jnp.transpose(flat.reshape(moved_shape), inverse)


def _kernel_perm(geom: LayerGeometry) -> tuple[int, ...]:
  """Kernel axes in matrix order: contracted axes (rows) first, then the free ones."""
  rest = tuple(a for a in range(len(geom.kernel_shape)) if a not in geom.kernel_axes)
  return geom.kernel_axes + rest


def kernel_to_matrix(kernel: jax.Array, geom: LayerGeometry) -> jax.Array:
  """Views a kernel `[*lead, *kernel_shape]` as `[*lead, d_in, d_out]`.

  Rows follow the input's flattening order (`flatten_input`); `lead` are
  stacked layer axes (e.g. from `nn.scan`), kept in front. Adapters fold into this
  matrix and quantized kernels are stored as it.
  """
  lead = kernel.ndim - len(geom.kernel_shape)
  perm = tuple(range(lead)) + tuple(lead + a for a in _kernel_perm(geom))
  return jnp.transpose(kernel, perm).reshape(*kernel.shape[:lead], geom.d_in, geom.d_out)


def matrix_to_kernel(matrix: jax.Array, geom: LayerGeometry) -> jax.Array:
  """Inverse of `kernel_to_matrix`: `[*lead, d_in, d_out]` -> `[*lead, *kernel_shape]`."""
  lead = matrix.ndim - 2
  perm = _kernel_perm(geom)
  moved = matrix.reshape(*matrix.shape[:lead], *(geom.kernel_shape[p] for p in perm))
  inverse = [0] * len(perm)
  for i, p in enumerate(perm):
    inverse[p] = i
  return jnp.transpose(moved, tuple(range(lead)) + tuple(lead + i for i in inverse))
