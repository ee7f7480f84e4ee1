"""Adapter math on one linear layer: OFT (input- and weight-centric), LoRA, fold, unfold.

A layer is described by its `oftjax.geometry.LayerGeometry`; adapter leaves
are plain arrays (`{'weight': [r, b(b-1)/2]}` for OFT, `{'a': [d_in, rank],
'b': [rank, d_out]}` for LoRA), always float32.

References:
  Qiu et al. "Orthogonal Finetuning Made Scalable" (OFTv2), arXiv:2506.19847;
  Qiu et al. "Controlling Text-to-Image Diffusion by Orthogonal Finetuning" (OFT),
  arXiv:2306.07280; Hu et al. "LoRA", arXiv:2106.09685.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp

from oftjax import geometry as geo
from oftjax import orthogonal

METHODS = ("oft", "oftv1", "lora")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  """What to attach and where.

  Attributes:
    method: `"oft"` (OFTv2, input-centric), `"oftv1"` (original weight-centric
      OFT, a baseline only) or `"lora"`.
    targets: regex, `re.fullmatch`-ed against '/'-joined paths of linear layers.
    block_size: OFT block size `b`; must divide every targeted input width.
    num_terms: Cayley–Neumann terms `n` (even `n` is more orthogonal than odd,
      docs/DESIGN.md §1); building blocks costs `r·b³·(n-2)`, negligible next to the
      rotation's `tokens·d·b`.
    parameterization: `"cayley_neumann"` or `"cayley"` (exact).
    block_share: one block shared by all chunks of a layer (`[1, …]` leaves).
    coft_eps: COFT radius (PEFT's `eps`); `None` disables the constraint.
    block_dropout: OFT's multiplicative dropout rate `p` (Qiu et al. 2023): while
      training, each block of each layer is replaced by the identity with probability
      `p`, drawn afresh every forward from the `'dropout'` rng (`drop_blocks`).
      Evaluation, folding and export are unaffected (inference uses every block).
      Exported as PEFT's `module_dropout` (which PEFT builds but never applies).
    lora_rank, lora_alpha: LoRA rank and scale numerator (scale = alpha / rank).
    precision: matmul precision of the adapter's own products (Neumann powers,
      rotation, LoRA's two products, fold): `"highest"` (true float32 on every
      backend, as PEFT's), `"high"` or `"default"` (the backend's default: TF32 on
      recent NVIDIA GPUs, one bf16 pass on TPU; faster, less exact). See
      `oftjax.orthogonal.rotate` for the cost. The frozen layer's own matmul is
      never changed.
  """

  method: str = "oft"
  targets: str = r".*"
  block_size: int = 32
  num_terms: int = 6
  parameterization: str = "cayley_neumann"
  block_share: bool = False
  coft_eps: float | None = None
  block_dropout: float = 0.0
  lora_rank: int = 16
  lora_alpha: float = 16.0
  precision: str = "highest"

  def __post_init__(self):
    """Checks every value; a message starts with the name of the field it is about.

    Raises:
      ValueError: one line naming the field, the value and what it must be.
    """
    if self.method not in METHODS:
      raise ValueError(f"unknown adapter method {self.method!r}; use one of {METHODS}")
    if self.parameterization not in orthogonal.PARAMETERIZATIONS:
      raise ValueError(
        f"unknown parameterization {self.parameterization!r}; "
        f"use one of {orthogonal.PARAMETERIZATIONS}"
      )
    if self.block_size < 2:
      raise ValueError(f"block_size must be >= 2 (got {self.block_size})")
    if self.num_terms < 2:
      raise ValueError(f"num_terms must be >= 2 (got {self.num_terms})")
    if self.lora_rank < 1:
      raise ValueError(f"lora_rank must be a positive integer (got {self.lora_rank})")
    if not 0.0 <= self.block_dropout < 1.0:
      raise ValueError(f"block_dropout must be in [0, 1) (got {self.block_dropout})")
    if self.block_dropout and self.method == "lora":
      raise ValueError(
        f"block_dropout={self.block_dropout} drops OFT blocks, and a LoRA adapter has none; "
        "set it to 0 for method 'lora'"
      )
    targets_pattern(self.targets)
    orthogonal.check_precision(self.precision)

  @property
  def leaf_name(self) -> str:
    """Name of the adapter sub-tree beside the kernel."""
    return "lora" if self.method == "lora" else "oft"

  def is_target(self, path: str) -> bool:
    """Whether the layer at '/'-joined `path` gets an adapter (`targets` full-matches it)."""
    return targets_pattern(self.targets).fullmatch(path) is not None


def targets_pattern(targets: str) -> re.Pattern:
  """The compiled `targets` regex (`re` caches it, so calling this per layer is cheap).

  Raises:
    ValueError: `targets` is not a valid regular expression.
  """
  try:
    return re.compile(targets)
  except re.error as e:
    raise ValueError(f"targets {targets!r} is not a valid regular expression ({e})") from None


# ----------------------------------------------------------------------------- OFT


def check_block_size(d_in: int, config: AdapterConfig, path: str) -> int:
  """Number of blocks `r`; raises if `block_size` does not divide `d_in` (no resizing)."""
  b = config.block_size
  if d_in % b:
    divisors = [k for k in range(2, min(d_in, 256) + 1) if d_in % k == 0]
    raise ValueError(
      f"layer '{path}': block size {b} does not divide its input width {d_in}; "
      f"choose a divisor such as {divisors[-6:]} or exclude the layer from targets"
    )
  return d_in // b


def init_oft(d_in: int, config: AdapterConfig, path: str) -> dict:
  """Zero packed parameters (`R = I`): the adapted layer equals the base layer."""
  r = check_block_size(d_in, config, path)
  rows = 1 if config.block_share else r
  return {"weight": jnp.zeros((rows, orthogonal.num_packed(config.block_size)), jnp.float32)}


def oft_blocks(leaves: dict, config: AdapterConfig, path: str = "?") -> jax.Array:
  """Float32 orthogonal blocks `[r or 1, b, b]` from a layer's OFT leaves."""
  packed = leaves["weight"]
  expected = orthogonal.num_packed(config.block_size)
  if packed.shape[-1] != expected:
    raise ValueError(
      f"layer '{path}': OFT weight has {packed.shape[-1]} entries per block but "
      f"block size {config.block_size} needs {expected}; use the block size it was trained with"
    )
  return orthogonal.orthogonal_blocks(
    packed,
    config.block_size,
    config.parameterization,
    config.num_terms,
    config.coft_eps,
    config.precision,
  )


def project_oft(leaves: dict, config: AdapterConfig) -> dict:
  """COFT: the layer's OFT leaves with every block projected into PEFT's ball.

  The projection PEFT writes back into `weight` before each forward
  (`OFTRotationModule._project_batch`): blocks with `‖Q‖_F > eps / sqrt(r)` (`r`
  = stored blocks of the layer) are rescaled onto that sphere. Leading stacked axes
  (`nn.scan` layers) are kept, so the radius is per layer. Unchanged without COFT.
  """
  if config.coft_eps is None:
    return leaves
  packed = leaves["weight"]
  projected = orthogonal.project_coft(
    packed.astype(jnp.float32), config.block_size, config.coft_eps
  )
  return {**leaves, "weight": projected.astype(packed.dtype)}


def drop_blocks(blocks: jax.Array, rng: jax.Array, rate: float, num_blocks: int) -> jax.Array:
  """OFT's multiplicative dropout: each block replaced by the identity with probability `rate`.

  Independent Bernoulli draws per block (the paper's rule; PEFT's unused
  `MultiplicativeDropoutLayer` instead replaces exactly `int(p·r)` blocks and skips
  shared blocks). With a shared block (`[1, b, b]`) each of the `r` chunks it rotates
  is dropped on its own.

  Args:
    blocks: orthogonal blocks `[*lead, r or 1, b, b]`.
    rng: a PRNG key.
    rate: the dropout probability `p` in `[0, 1)`.
    num_blocks: `r`, the chunks of the layer's input (`d_in / b`).

  Returns:
    `[*lead, r, b, b]` blocks, the dropped ones exactly `I`.

  References:
    Qiu et al. "Controlling Text-to-Image Diffusion by Orthogonal Finetuning" (OFT),
    arXiv:2306.07280 (its multiplicative dropout).
  """
  b = blocks.shape[-1]
  full = jnp.broadcast_to(blocks, (*blocks.shape[:-3], num_blocks, b, b))
  dropped = jax.random.bernoulli(rng, rate, full.shape[:-2])
  return jnp.where(dropped[..., None, None], jnp.eye(b, dtype=full.dtype), full)


def rotate_input(
  x: jax.Array, geom: geo.LayerGeometry, blocks: jax.Array, precision: str = "highest"
) -> jax.Array:
  """OFTv2: rotates the contracted input axes of `x`; the kernel is untouched."""
  flat, plan = geo.flatten_input(x, geom)
  return geo.unflatten_input(orthogonal.rotate(flat, blocks, precision), plan)


def fold_oft(
  kernel: jax.Array, geom: geo.LayerGeometry, blocks: jax.Array, precision: str = "highest"
) -> jax.Array:
  """Folds the rotation into the kernel: `K' = blockdiag(R) @ K` (block by block)."""
  mat = geo.kernel_to_matrix(kernel.astype(jnp.float32), geom)
  b = blocks.shape[-1]
  r = mat.shape[0] // b
  chunks = mat.reshape(r, b, -1)
  merged = jnp.einsum(
    "rij,rjo->rio", jnp.broadcast_to(blocks, (r, b, b)), chunks, precision=precision
  )
  return geo.matrix_to_kernel(merged.reshape(mat.shape), geom).astype(kernel.dtype)


def unfold_oft(kernel: jax.Array, geom: geo.LayerGeometry, blocks: jax.Array) -> jax.Array:
  """Inverse of `fold_oft` by block-wise solves (exact even for Neumann blocks).

  `jnp.linalg.solve` is an LU factorisation at full float32 on every backend (its
  products are lowered at `HIGHEST`), so it takes no precision.
  """
  mat = geo.kernel_to_matrix(kernel.astype(jnp.float32), geom)
  b = blocks.shape[-1]
  r = mat.shape[0] // b
  chunks = mat.reshape(r, b, -1)
  restored = jnp.linalg.solve(jnp.broadcast_to(blocks, (r, b, b)), chunks)
  return geo.matrix_to_kernel(restored.reshape(mat.shape), geom).astype(kernel.dtype)


def weight_centric_kernel(
  kernel: jax.Array, geom: geo.LayerGeometry, blocks: jax.Array, precision: str = "highest"
) -> jax.Array:
  """Original OFT: forms the dense `d_in x d_in` block-diagonal R and multiplies `R·K`.

  Cubic in the width; kept only as the baseline OFTv2 is measured against.
  """
  mat = geo.kernel_to_matrix(kernel, geom)
  dense = orthogonal.block_diagonal(blocks, mat.shape[0] // blocks.shape[-1])
  merged = jnp.matmul(dense.astype(kernel.dtype), mat, precision=precision)
  return geo.matrix_to_kernel(merged, geom)


# ---------------------------------------------------------------------------- LoRA


def init_lora(rng: jax.Array, geom: geo.LayerGeometry, config: AdapterConfig, path: str) -> dict:
  """PEFT's LoRA init: `a` Kaiming-uniform (a=sqrt(5)), `b` zeros (adapted = base)."""
  if not geom.lora_ok:
    raise ValueError(
      f"layer '{path}': LoRA needs the output to be the input's and the kernel's free axes "
      "(no axis shared or summed on one side only); exclude this einsum from the targets regex"
    )
  bound = 1.0 / math.sqrt(geom.d_in)
  a = jax.random.uniform(rng, (geom.d_in, config.lora_rank), jnp.float32, -bound, bound)
  return {"a": a, "b": jnp.zeros((config.lora_rank, geom.d_out), jnp.float32)}


def lora_delta(
  x: jax.Array, geom: geo.LayerGeometry, leaves: dict, config: AdapterConfig
) -> jax.Array:
  """LoRA's additive output `scale · (x A) B` in the layer's output layout.

  The tokens are flattened to one axis so that both products and their backward are
  plain 2-D matmuls: with `[batch, time, d]` operands, XLA CPU computes the weight
  gradients `xᵀ·g` by first copying the big activation / cotangent into a transposed
  layout, which made a LoRA step ~1.5x slower than the no-adapter floor (measured in
  `experiments/benchmark.py`; 2-D: ~1.0x). The scale is folded into the small `B`
  instead of multiplying the `[tokens, d_out]` output (and its cotangent). The term
  is formed as `[*input rest, *kernel free axes]` and transposed into the output's
  axis order when the layer's equation orders them otherwise (`'BSD,CKDH->CBSKH'`).

  Both products run in the activation dtype at `config.precision`: with float32
  activations `"highest"` keeps them true float32 (no TF32 / single bf16 pass); with
  bfloat16 activations the operands already are bf16, as in PEFT under autocast.
  """
  flat, _ = geo.flatten_input(x, geom)
  free = tuple(n for a, n in enumerate(geom.kernel_shape) if a not in geom.kernel_axes)
  lead = flat.shape[:-1]
  a = leaves["a"].astype(x.dtype)
  b = (leaves["b"] * (config.lora_alpha / config.lora_rank)).astype(x.dtype)
  hidden = jnp.matmul(flat.reshape(-1, flat.shape[-1]), a, precision=config.precision)
  delta = jnp.matmul(hidden, b, precision=config.precision).reshape(*lead, *free)
  return delta if geom.output_perm is None else jnp.transpose(delta, geom.output_perm)


def fold_lora(
  kernel: jax.Array, geom: geo.LayerGeometry, leaves: dict, config: AdapterConfig
) -> jax.Array:
  """`K' = K + scale · A B` in the kernel's own layout."""
  mat = geo.kernel_to_matrix(kernel.astype(jnp.float32), geom)
  delta = jnp.matmul(leaves["a"], leaves["b"], precision=config.precision)
  mat = mat + (config.lora_alpha / config.lora_rank) * delta
  return geo.matrix_to_kernel(mat, geom).astype(kernel.dtype)


def unfold_lora(
  kernel: jax.Array, geom: geo.LayerGeometry, leaves: dict, config: AdapterConfig
) -> jax.Array:
  """Inverse of `fold_lora`."""
  negated = {"a": -leaves["a"], "b": leaves["b"]}
  return fold_lora(kernel, geom, negated, config)
