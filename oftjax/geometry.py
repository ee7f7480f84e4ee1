"""Which axes of a linear layer's input and weight are contracted.

Every linear layer call is described by one einsum equation over its input and its
weight (`oftjax.layer_kinds` says which modules are linear layers and gives the
equation of a call). OFT rotates the contracted input axes, flattened row-major in the
input's order (so an output projection over `heads × head_dim` matches a PyTorch
Linear over the concatenated heads); merging folds the rotation into the matching weight
axes, through the one kernel layout `kernel_to_matrix` (also the layout quantized
kernels are stored in). LoRA computes its term as `[*input rest, *weight free axes]`
and transposes it into the output's own axis order.
"""

from __future__ import annotations

import dataclasses
import math
import string

import jax
import jax.numpy as jnp

PLAIN_WEIGHT = "kernel"  # the weight name of flax's own linear layers


@dataclasses.dataclass(frozen=True)
class LayerGeometry:
  """Contraction structure of one linear layer call.

  Attributes:
    x_axes: input axes contracted with the kernel, in the input's order.
    kernel_axes: the matching kernel axes (same order as `x_axes`).
    kernel_shape: shape of one (un-stacked) kernel.
    lora_ok: whether the output is the non-contracted input axes and the free kernel
      axes, in some order (no axis shared by input, kernel and output, none summed
      on one side only): then LoRA's low-rank term has the output's shape.
    weight: name of the weight parameter (`'kernel'` for flax's layers).
    output_perm: the output's axes as positions in LoRA's canonical layout
      `[*input rest, *kernel free]`; `None` when the two orders agree.
  """

  x_axes: tuple[int, ...]
  kernel_axes: tuple[int, ...]
  kernel_shape: tuple[int, ...]
  lora_ok: bool
  weight: str = PLAIN_WEIGHT
  output_perm: tuple[int, ...] | None = None

  @property
  def d_in(self) -> int:
    return math.prod(self.kernel_shape[a] for a in self.kernel_axes)

  @property
  def d_out(self) -> int:
    return math.prod(self.kernel_shape) // self.d_in


def _ellipsis_letters(xs: str, ndim: int, fresh: str, path: str, equation: str) -> str:
  """The letters `...` stands for in the input spec `xs` of rank `ndim`."""
  explicit = xs.replace("...", "")
  if "." in explicit or ndim < len(explicit) or ("..." not in xs and ndim != len(xs)):
    raise ValueError(f"layer '{path}': einsum '{equation}' does not fit an input of rank {ndim}")
  return fresh[: ndim - len(explicit)] if "..." in xs else ""


def geometry_of_equation(
  equation: str, weight_shape: tuple[int, ...], x_ndim: int, weight: str, path: str
) -> LayerGeometry:
  """The geometry of `y = einsum(equation, x, w)` for an input of rank `x_ndim`.

  Args:
    equation: `'x,w->y'`; `...` may stand for leading axes of `x` and `y`.
    weight_shape: shape of `w`.
    x_ndim: rank of the input.
    weight: the weight's parameter name (kept in the geometry for folding).
    path: the layer's path, for messages.

  Raises:
    ValueError: for an equation adapters cannot take (implicit output, `...` on the
      weight, a repeated axis, no contracted axis), naming the layer and the fix.
  """
  eq = equation.replace(" ", "")
  fix = "exclude it from the targets regex"
  if "->" not in eq or eq.count(",") != 1:
    raise ValueError(
      f"layer '{path}': einsum '{equation}' is not supported (need 'x,weight->out'); {fix}"
    )
  lhs, out = eq.split("->")
  xs, ws = lhs.split(",")
  if "." in ws or len(ws) != len(weight_shape):
    raise ValueError(
      f"layer '{path}': einsum '{equation}' does not name the {len(weight_shape)} axes of "
      f"its weight {list(weight_shape)} explicitly; {fix}"
    )
  fresh = "".join(c for c in string.ascii_letters if c not in eq)
  batch = _ellipsis_letters(xs, x_ndim, fresh, path, equation)
  if "..." in out and "..." not in xs:
    raise ValueError(f"layer '{path}': einsum '{equation}' has '...' on its output only; {fix}")
  xs, out = xs.replace("...", batch), out.replace("...", batch)
  for spec in (xs, ws, out):
    if len(set(spec)) != len(spec):
      raise ValueError(f"layer '{path}': einsum '{equation}' repeats an axis; {fix}")
  contracted = [c for c in xs if c in ws and c not in out]
  if not contracted:
    raise ValueError(f"layer '{path}': einsum '{equation}' contracts no input axis")
  x_rest = [c for c in xs if c not in contracted]
  k_free = [c for c in ws if c not in contracted]
  canonical = x_rest + k_free
  lora_ok = sorted(canonical) == sorted(out) and not set(x_rest) & set(k_free)
  perm = tuple(canonical.index(c) for c in out) if lora_ok else None
  return LayerGeometry(
    tuple(xs.index(c) for c in contracted),
    tuple(ws.index(c) for c in contracted),
    tuple(weight_shape),
    lora_ok=lora_ok,
    weight=weight,
    output_perm=None if perm is None or perm == tuple(range(len(perm))) else perm,
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
