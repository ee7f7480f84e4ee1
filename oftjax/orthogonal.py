"""Orthogonal blocks from packed skew-symmetric parameters (pure math, no oftjax imports).

Conventions (docs/DESIGN.md §1, identical to Hugging Face PEFT's OFT layout):

* A block of size `b` is stored as the strict upper triangle of a skew-symmetric
  `b x b` matrix `Q` in row-major `triu(b, b, k=1)` order, a vector of length
  `b(b-1)/2`; `Q[i, j] = v` and `Q[j, i] = -v`.
* `cayley(Q) = (I + Q)(I - Q)^-1`.
* `cayley_neumann(Q, n) = (I + Q) · sum_{i=0}^{n-2} Q^i = I + 2Q + … + 2Q^{n-2} + Q^{n-1}`.
* Input-centric rotation of row vectors: `x_rot[..., k, :] = x[..., k, :] @ R_k`.

All functions are jit/vmap/grad safe. Adapter math runs in float32 whatever the
activation dtype; `rotate` returns the activation dtype.

Precision: every matmul here takes a `precision` (one of `PRECISIONS`, default
`"highest"`) that is written onto its `dot_general`. JAX's default precision is
full float32 on CPU but TF32 (10-bit mantissa) on recent NVIDIA GPUs and one bf16 pass
on TPU, where the Neumann powers and the rotated activations carry that rounding and
the orthogonality proven on CPU no longer holds; `"highest"` is true float32
everywhere, as PEFT's torch rotation is (torch keeps TF32 off for matmuls by default).

References:
  Qiu, Liu, Weller, Schölkopf. "Orthogonal Finetuning Made Scalable" (OFTv2),
  EMNLP 2025, arXiv:2506.19847.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

PARAMETERIZATIONS = ("cayley_neumann", "cayley")
PRECISIONS = ("default", "high", "highest")  # jax.lax.Precision names, as strings


def check_precision(precision: str) -> str:
  """Returns `precision` if it is one of `PRECISIONS`; raises ValueError otherwise."""
  if precision not in PRECISIONS:
    raise ValueError(f"unknown matmul precision {precision!r}; use one of {PRECISIONS}")
  return precision


def num_packed(block_size: int) -> int:
  """Length of the packed vector of one skew-symmetric `b x b` block."""
  return block_size * (block_size - 1) // 2


def block_size_from_packed(length: int) -> int:
  """Inverse of `num_packed`; raises ValueError if `length` is not b(b-1)/2."""
  b = int(round((1 + math.sqrt(1 + 8 * length)) / 2))
  if num_packed(b) != length or b < 2:
    raise ValueError(
      f"packed length {length} is not b(b-1)/2 for any block size b >= 2; "
      "check the adapter's block size"
    )
  return b


@functools.cache
def _gather_plan(block_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Index into `[0, packed...]` and sign for every entry of the `b x b` skew matrix."""
  rows, cols = np.triu_indices(block_size, k=1)
  index = np.zeros((block_size, block_size), np.int32)
  sign = np.zeros((block_size, block_size), np.float32)
  index[rows, cols] = np.arange(1, len(rows) + 1)
  index[cols, rows] = np.arange(1, len(rows) + 1)
  sign[rows, cols] = 1.0
  sign[cols, rows] = -1.0
  return index, sign


def skew_symmetric(packed: jax.Array, block_size: int) -> jax.Array:
  """Unpacks `[..., b(b-1)/2]` into skew-symmetric matrices `[..., b, b]`.

  Args:
    packed: strict upper triangles in row-major `triu(b, b, k=1)` order.
    block_size: `b`.

  Returns:
    `Q` with `Q[i, j] = packed[k]` above the diagonal and `Q[j, i] = -packed[k]`.
  """
  n = num_packed(block_size)
  if packed.shape[-1] != n:
    raise ValueError(
      f"packed vector has length {packed.shape[-1]} but block size {block_size} "
      f"needs {n} = b(b-1)/2; pass the block size the adapter was made with"
    )
  index, sign = _gather_plan(block_size)
  padded = jnp.concatenate([jnp.zeros_like(packed[..., :1]), packed], axis=-1)
  return padded[..., index] * sign.astype(packed.dtype)


def pack_skew_symmetric(q: jax.Array) -> jax.Array:
  """Inverse of `skew_symmetric`: the strict upper triangle of `[..., b, b]`."""
  rows, cols = np.triu_indices(q.shape[-1], k=1)
  return q[..., rows, cols]


def cayley(q: jax.Array) -> jax.Array:
  """Exact Cayley transform `(I + Q)(I - Q)^-1` of skew-symmetric `[..., b, b]`.

  `I + Q` and `(I - Q)^-1` commute, so this is `solve(I - Q, I + Q)`; `I - Q`
  is always invertible for skew-symmetric `Q` (eigenvalues `1 - iλ`).
  """
  eye = jnp.eye(q.shape[-1], dtype=q.dtype)
  return jnp.linalg.solve(eye - q, jnp.broadcast_to(eye + q, q.shape))


def cayley_neumann(q: jax.Array, num_terms: int, precision: str = "highest") -> jax.Array:
  """Cayley–Neumann approximation with `num_terms` terms (PEFT's meaning for n >= 4).

  `(I + Q) · sum_{i=0}^{n-2} Q^i = I + 2Q + … + 2Q^{n-2} + Q^{n-1}`. Equals
  `cayley(Q) (I - Q^{n-1})`, so the orthogonality error `RᵀR - I` is exactly
  `-Q^{2n-2}` for even `n` and `-2Q^{n-1} + Q^{2n-2}` for odd `n`. Only
  useful for `‖Q‖ < 1`.

  Args:
    q: skew-symmetric `[..., b, b]`.
    num_terms: `n >= 2`.
    precision: of the `n - 2` power matmuls (`PRECISIONS`).

  Returns:
    `[..., b, b]` approximately orthogonal blocks.
  """
  if num_terms < 2:
    raise ValueError(f"num_terms must be >= 2 (got {num_terms}); n=2 is I + Q")
  eye = jnp.broadcast_to(jnp.eye(q.shape[-1], dtype=q.dtype), q.shape)
  result = eye + (2.0 if num_terms > 2 else 1.0) * q
  power = q
  for i in range(2, num_terms):
    power = jnp.matmul(power, q, precision=precision)
    result = result + (2.0 if i < num_terms - 1 else 1.0) * power
  return result


def project_coft(packed: jax.Array, block_size: int, eps: float) -> jax.Array:
  """COFT: projects each block's `Q` into the Frobenius ball of radius `eps / sqrt(r)`.

  Same as PEFT's `_project_batch` (`r` = number of stored blocks): blocks with
  `‖Q‖_F <= eps/sqrt(r)` are kept, larger ones are rescaled onto the sphere.
  """
  radius = eps / math.sqrt(packed.shape[-2] if packed.ndim >= 2 else 1)
  norm = jnp.sqrt(2.0) * jnp.linalg.norm(packed, axis=-1, keepdims=True)
  safe = jnp.where(norm > 0, norm, 1.0)
  return jnp.where(norm <= radius, packed, packed * (radius / safe))


def orthogonal_blocks(
  packed: jax.Array,
  block_size: int,
  parameterization: str = "cayley_neumann",
  num_terms: int = 4,
  coft_eps: float | None = None,
  precision: str = "highest",
) -> jax.Array:
  """Packed `[r, b(b-1)/2]` parameters -> float32 orthogonal blocks `[r, b, b]`.

  Args:
    packed: adapter parameters (any float dtype; computed in float32).
    block_size: `b`.
    parameterization: `"cayley_neumann"` (OFTv2) or `"cayley"` (exact inverse).
    num_terms: Neumann terms, used by `"cayley_neumann"` only.
    coft_eps: if set, apply the COFT projection first (straight-through gradient,
      as PEFT projects the stored weight outside the autograd graph). Training also
      writes the projection back after every update (`make_train_step`'s
      `project`), so this forward projection only acts on weights loaded from
      elsewhere.
    precision: of the Neumann power matmuls (`PRECISIONS`).
  """
  packed = packed.astype(jnp.float32)
  if coft_eps is not None:
    packed = packed + jax.lax.stop_gradient(project_coft(packed, block_size, coft_eps) - packed)
  q = skew_symmetric(packed, block_size)
  if parameterization == "cayley_neumann":
    return cayley_neumann(q, num_terms, precision)
  if parameterization == "cayley":
    return cayley(q)
  raise ValueError(f"unknown parameterization {parameterization!r}; use one of {PARAMETERIZATIONS}")


def rotate(x: jax.Array, blocks: jax.Array, precision: str = "highest") -> jax.Array:
  """Input-centric block rotation of the last axis of `x` (OFTv2).

  `x[..., d]` is viewed as `[..., r, b]` and each chunk is multiplied as a row
  vector: `x_rot[..., k, :] = x[..., k, :] @ R_k`. `blocks` is `[r, b, b]` or
  `[1, b, b]` (one block shared by all chunks). Cost `O(tokens · d · b)`.

  Cost of `precision="highest"` (the default): the flops are the same at every
  precision, only how the hardware runs them changes. On CPU it is what XLA does anyway.
  On NVIDIA GPUs it turns TF32 off, so the float32 matmul runs on the CUDA cores (on an
  H100 about 1/7 of the TF32 tensor-core rate); on TPU a float32 product becomes ~6
  bf16 passes (`"high"`: ~3) instead of one. The rotation is `b / d_out` of its
  layer's flops (b=32, d_out=2048: 1.6%) and, at about `b / 4` flops per byte moved,
  memory-bound on both, so most of that is hidden. `"default"` gives the speed back to
  users who accept the operand rounding: a relative error of up to ~5e-4 (TF32, 10-bit
  mantissa) or ~4e-3 (one bf16 pass) in every rotated activation and Neumann power.

  Args:
    x: `[..., d]` activations (any float dtype).
    blocks: `[r, b, b]` or `[1, b, b]` orthogonal blocks.
    precision: of the rotation matmul (`PRECISIONS`).

  Returns:
    The rotated activations in `x`'s dtype (the rotation itself runs in float32).
  """
  b = blocks.shape[-1]
  d = x.shape[-1]
  if d % b:
    raise ValueError(f"input width {d} is not divisible by the block size {b}")
  r = d // b
  if blocks.shape[0] not in (1, r):
    raise ValueError(f"{blocks.shape[0]} blocks of size {b} cannot rotate width {d}")
  chunks = x.astype(jnp.float32).reshape(-1, r, b)  # tokens flattened: [n, r, b]
  if blocks.shape[0] == 1:
    out = jnp.matmul(chunks, blocks[0].astype(jnp.float32), precision=precision)
  else:
    # One batched matmul over the blocks, with the block axis moved first explicitly:
    # [r, n, b] @ [r, b, b]. XLA CPU runs this (and its backward) ~1.5x faster than the
    # equivalent einsum "nrk,rkc->nrc" over the token-major layout, whose batch axis sits
    # in the middle of both operands (experiments/benchmark.py, BENCHMARKS.md).
    out = jnp.matmul(jnp.swapaxes(chunks, 0, 1), blocks.astype(jnp.float32), precision=precision)
    out = jnp.swapaxes(out, 0, 1)
  return out.reshape(x.shape).astype(x.dtype)


def block_diagonal(blocks: jax.Array, num_blocks: int | None = None) -> jax.Array:
  """Dense `[r·b, r·b]` block-diagonal matrix (original OFT; cubic cost, baseline only).

  Built by placement (no product), so every entry is exactly a block entry or zero.
  """
  r = num_blocks or blocks.shape[0]
  blocks = jnp.broadcast_to(blocks, (r,) + blocks.shape[-2:])
  b = blocks.shape[-1]
  eye = jnp.eye(r, dtype=blocks.dtype)
  dense = eye[:, None, :, None] * blocks[:, :, None, :]  # [r, b, r, b]: blocks on r == s
  return dense.reshape(r * b, r * b)


def orthogonality_error(r: jax.Array) -> jax.Array:
  """`max |RᵀR - I|` over all entries (and all leading batch axes).

  The Gram matrix is always formed at `HIGHEST` precision: a measurement must not add
  its own TF32/bf16 rounding (~1e-3) to the error it reports.
  """
  r = r.astype(jnp.float32)
  gram = jnp.matmul(jnp.swapaxes(r, -1, -2), r, precision="highest")
  return jnp.max(jnp.abs(gram - jnp.eye(r.shape[-1], dtype=r.dtype)))


def spectral_norm(x: jax.Array, squarings: int = 14) -> jax.Array:
  """The largest singular value of each matrix of `x` (`[..., m, n]` -> `[...]`).

  Power iteration by repeated squaring, in matmuls only: `M = xᵀx` is squared
  `squarings` times (rescaled each time), which leaves `M^(2^k)` proportional to the
  projector onto `M`'s top eigenspace, so its largest column `v` gives
  `‖x v‖ / ‖v‖`. The error shrinks like `(σ₂/σ₁)^(2^(k+2))`: with 14 squarings fp32
  rounding (~1e-7 relative) dominates down to `σ₂ = 0.999 σ₁`; zero matrices give 0. `jnp.linalg.norm(ord=2)`
  is not used because its LAPACK SVD kernels wait on the XLA CPU thread pool they run on:
  two of them at once deadlocked a 2-core machine.
  """
  x = x.astype(jnp.float32)
  m = jnp.matmul(jnp.swapaxes(x, -1, -2), x, precision="highest")
  for _ in range(squarings):
    m = m / jnp.maximum(jnp.max(jnp.abs(m), axis=(-2, -1), keepdims=True), 1e-30)
    m = jnp.matmul(m, m, precision="highest")
  columns = jnp.sum(jnp.square(m), axis=-2)  # squared norm of each column
  v = jnp.take_along_axis(m, jnp.argmax(columns, axis=-1)[..., None, None], axis=-1)
  v = v / jnp.maximum(jnp.linalg.norm(v, axis=(-2, -1), keepdims=True), 1e-30)
  return jnp.linalg.norm(jnp.matmul(x, v, precision="highest"), axis=(-2, -1))
