"""NF4 and int8 storage of one weight matrix `[..., d_in, d_out]`, built on qwix.

Both formats keep every trailing `[d_in, d_out]` matrix (leading axes are stacked
layers, e.g. from `nn.scan`) as a dict of plain arrays, so a parameter tree holding
them still splits, shards, counts and checkpoints like any other:

- `int8`: `{'int8': int8[..., d_in, d_out], 'scale': f32[..., 1, d_out]}`; symmetric,
  one absmax scale per output channel (qwix `channelwise_axes`). Error per element
  `<= absmax / 255` (qwix maps `absmax` to `127.5` and rounds; `absmax / 254` is
  the textbook bound for a `127` grid).
- `nf4`: `{'nf4': uint8[..., d_in/2, d_out], 'absmax': f32[..., d_in/block, d_out]}`;
  the 4-bit NormalFloat of QLoRA, one absmax per block of `block` (64) consecutive
  *input* features of one output channel, i.e. 64 consecutive entries of a row of the
  PyTorch `[d_out, d_in]` weight, as bitsandbytes blocks them. qwix computes the codes
  (`qtype='nf4'`, `tiled_axes`) as uint4; we pack two per byte along `d_in` (qwix's
  uint4 would report one byte per code to `itemsize`-based byte counts).
  With double quantization, `absmax` is replaced by `absmax_q` (int8, blocks of 256
  constants after subtracting the per-matrix mean), `absmax_scale` and `absmax_mean`
  (float32): ~0.127 instead of 0.5 bits per weight for the constants. QLoRA stores these
  as 8-bit floats; we use qwix's symmetric int8, which is more precise for the centred,
  narrow-range constants.

References:
  Dettmers et al. "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv:2305.14314
  (NF4 in §3 and Appendix E, double quantization in §3); google/qwix.
"""

from __future__ import annotations

import math
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import qwix

MODES = ("int8", "nf4")
NF4_BLOCK = 64
DQ_BLOCK = 256
_NF4_OFFSET = 0.5 * ((1 - 1 / 32) + (1 - 1 / 30))  # QLoRA's 0.9677: avoids ppf(1) = inf


def nf4_code_values() -> np.ndarray:
  """The 16 NF4 values from their definition, in float64 and ascending order.

  Quantiles of N(0, 1): 8 positive ones at `linspace(offset, 0.5, 9)[:-1]`, 7
  negative ones at `-ppf(linspace(offset, 0.5, 8)[:-1])`, and an exact 0, then all
  divided by the largest so that they span `[-1, 1]` (QLoRA Appendix E; bitsandbytes'
  `create_normal_map`). qwix hard-codes the same table; tests compare the two.
  """
  ppf = statistics.NormalDist().inv_cdf
  positive = [ppf(p) for p in np.linspace(_NF4_OFFSET, 0.5, 9)[:-1]]
  negative = [-ppf(p) for p in np.linspace(_NF4_OFFSET, 0.5, 8)[:-1]]
  values = np.sort(np.asarray(positive + [0.0] + negative, np.float64))
  return values / values.max()


def nf4_max_half_gap() -> float:
  """Half the largest gap between adjacent NF4 values: the rounding bound per unit absmax."""
  return float(np.max(np.diff(nf4_code_values())) / 2)


def mode_of(leaves: dict) -> str:
  """`'int8'` or `'nf4'` from a quantized matrix's leaf names."""
  for mode in MODES:
    if mode in leaves:
      return mode
  raise ValueError(f"not a quantized kernel: leaves {sorted(leaves)}")


def _pack_nibbles(codes: jax.Array) -> jax.Array:
  """uint4 `[..., d_in, d_out]` -> uint8 `[..., d_in/2, d_out]` (even rows low nibble)."""
  c = codes.astype(jnp.uint8)
  c = c.reshape(*c.shape[:-2], c.shape[-2] // 2, 2, c.shape[-1])
  return c[..., 0, :] | (c[..., 1, :] << 4)


def _unpack_nibbles(packed: jax.Array) -> jax.Array:
  """Inverse of `_pack_nibbles`, as uint4 (qwix's NF4 code dtype)."""
  both = jnp.stack([packed & 15, packed >> 4], axis=-2)
  return both.reshape(*packed.shape[:-2], 2 * packed.shape[-2], packed.shape[-1]).astype(jnp.uint4)


def _double_quantize(absmax: jax.Array) -> dict:
  """Per matrix: subtract the mean constant, int8 over blocks of (up to) 256 constants."""
  lead, n = absmax.shape[:-2], math.prod(absmax.shape[-2:])
  block = math.gcd(n, DQ_BLOCK)
  flat = absmax.reshape(*lead, n)
  mean = jnp.mean(flat, axis=-1, keepdims=True)
  centred = (flat - mean).reshape(*lead, n // block, block)
  q = qwix.quantize(centred, jnp.int8, channelwise_axes=tuple(range(centred.ndim - 1)))
  return {"absmax_q": q.qvalue, "absmax_scale": q.scale, "absmax_mean": mean}


def _absmax_of(leaves: dict, d_in: int, d_out: int) -> jax.Array:
  """The float32 NF4 block constants `[..., d_in/block, d_out]` (undoing double quant)."""
  if "absmax" in leaves:
    return leaves["absmax"]
  q = leaves["absmax_q"]
  centred = qwix.dequantize(qwix.QArray(q, leaves["absmax_scale"], None, jnp.int8))
  flat = centred.reshape(*q.shape[:-2], -1) + leaves["absmax_mean"]
  return flat.reshape(*q.shape[:-2], -1, d_out)


def quantize_matrix(
  mat: jax.Array, mode: str, block_size: int = NF4_BLOCK, double_quant: bool = True
) -> dict:
  """Quantizes `mat` `[..., d_in, d_out]` (computed in float32).

  Args:
    mat: the weight as a matrix, rows = input features.
    mode: `'int8'` (per output channel) or `'nf4'` (blocks along `d_in`).
    block_size: NF4 block of input features sharing one absmax (64 as in QLoRA).
    double_quant: NF4 only: also quantize the block constants (QLoRA's double quant).

  Returns:
    The leaves described in the module docstring.

  Raises:
    ValueError: unknown mode, or `d_in` not divisible by `block_size` (or odd).
  """
  mat = mat.astype(jnp.float32)
  channel = tuple(range(mat.ndim - 2)) + (mat.ndim - 1,)
  if mode == "int8":
    q = qwix.quantize(mat, jnp.int8, channelwise_axes=channel)
    return {"int8": q.qvalue, "scale": q.scale}
  if mode != "nf4":
    raise ValueError(f"unknown quantization {mode!r}; use one of {MODES}")
  d_in = mat.shape[-2]
  if d_in % block_size or block_size % 2:
    raise ValueError(
      f"NF4 block size {block_size} must be even and divide the input width "
      f"{d_in}; exclude the layer from the targets or change the block size"
    )
  q = qwix.quantize(mat, "nf4", tiled_axes={mat.ndim - 2: block_size}, channelwise_axes=channel)
  leaves = {"nf4": _pack_nibbles(q.qvalue)}
  leaves.update(_double_quantize(q.scale) if double_quant else {"absmax": q.scale})
  return leaves


def dequantize_matrix(leaves: dict, dtype=jnp.float32) -> jax.Array:
  """`[..., d_in, d_out]` weight in `dtype` from `quantize_matrix`'s leaves."""
  if mode_of(leaves) == "int8":
    out = qwix.dequantize(qwix.QArray(leaves["int8"], leaves["scale"], None, jnp.int8))
    return out.astype(dtype)
  packed = leaves["nf4"]
  d_in, d_out = 2 * packed.shape[-2], packed.shape[-1]
  absmax = _absmax_of(leaves, d_in, d_out)
  out = qwix.dequantize(qwix.QArray(_unpack_nibbles(packed), absmax, None, "nf4"))
  return out.astype(dtype)


def error_bound(mat: jax.Array, leaves: dict) -> jax.Array:
  """Per-element bound on `|mat - dequantize(quantize(mat))|` for these leaves.

  int8: `absmax / 254` per output channel. NF4: `half_gap · absmax` per block, plus
  `|absmax - absmax'|` when the constants were double-quantized to `absmax'`
  (codes are chosen with the exact absmax, decoded with `absmax'`).
  """
  mat = mat.astype(jnp.float32)
  if mode_of(leaves) == "int8":
    absmax = jnp.max(jnp.abs(mat), axis=-2, keepdims=True)
    return jnp.broadcast_to(absmax / 254.0, mat.shape)
  d_in, d_out = mat.shape[-2:]
  stored = _absmax_of(leaves, d_in, d_out)
  blocks = mat.reshape(*mat.shape[:-2], -1, d_in // stored.shape[-2], d_out)
  exact = jnp.max(jnp.abs(blocks), axis=-2, keepdims=True)
  stored = stored[..., None, :]
  bound = nf4_max_half_gap() * exact + jnp.abs(exact - stored)
  return jnp.broadcast_to(bound, blocks.shape).reshape(mat.shape)
