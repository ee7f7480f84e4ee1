"""An OFT adapter as a LoRA adapter of a chosen rank, for servers that serve LoRA but not OFT.

vLLM and SGLang serve many LoRA adapters over one base, but no OFT. An OFT layer's merged
kernel is `K' = blockdiag(R) @ K` in the kernel's matrix layout `[d_in, d_out]`
(`oftjax.geometry.kernel_to_matrix`, `y = x @ K`): OFT rotates the input, so in
PyTorch's `[d_out, d_in]` weight the merged weight is `W · blockdiag(R)ᵀ`. Its exact update
is `Δ = (blockdiag(R) - I) @ K`, computed block by block (never as `K' - K`, which would
cancel digits). `Δ` has rank at most `min(d_in, d_out)`; its truncated SVD
`U_k S_k V_kᵀ` is the best rank-`k` approximation in the Frobenius norm (Eckart–Young), and
LoRA holds it as `a = U_k S_k^½` (`[d_in, k]`) and `b = S_k^½ V_kᵀ` (`[k, d_out]`) with
scale 1 (`lora_alpha = r`), so PEFT's `lora_B @ lora_A` is `Δᵀ` truncated.

What is lost is measured, never guessed: per layer (and per stacked copy) the discarded
singular values give `‖Δ - a b‖_F / ‖Δ‖_F` and `‖Δ - a b‖_F / ‖K‖_F`; the model-level
figures are the same ratios over all layers' squared norms summed. A rank above a layer's
`min(d_in, d_out)` pads `a` and `b` with zeros (exact).

On a quantized base (QOFT) pass the dequantized tree (`oftjax.quant.dequantize_params`):
`Δ` uses the dequantized `K`, the kernel the adapter was trained on. Served over the same
quantized base the LoRA model then computes `deq(K) + Δ = R·deq(K)`, the trained function
(up to truncation); served over the float base it computes `K + (R - I)·deq(K)`, which
differs from `R·K` by `(R - I)(K - deq(K))`.

References:
  Hu et al. "LoRA", arXiv:2106.09685; Qiu et al. OFTv2, arXiv:2506.19847; Eckart & Young,
  "The approximation of one matrix by another of lower rank", Psychometrika 1936.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import math

import jax
import numpy as np

from oftjax import adapters
from oftjax import geometry as geo
from oftjax import params as P


@dataclasses.dataclass(frozen=True)
class _LayerSpectrum:
  """One layer's update as stacked copies: its singular values and the kernel norms."""

  path: str
  singular_values: np.ndarray  # [copies, min(d_in, d_out)], float64, descending
  weight_norms: np.ndarray  # [copies]: ‖K‖_F of each copy
  factors: tuple[np.ndarray, np.ndarray]  # (U [copies, d_in, m], Vᵀ [copies, m, d_out])
  lead_shape: tuple[int, ...]


def oft_update(kernel: np.ndarray, geom: geo.LayerGeometry, blocks: np.ndarray) -> np.ndarray:
  """The exact update `(blockdiag(R) - I) @ K` of one OFT layer, float64 `[*lead, d_in, d_out]`.

  Args:
    kernel: the layer's float kernel `[*lead, *geom.kernel_shape]` (`lead`: stacked layers).
    geom: its geometry.
    blocks: its orthogonal blocks `[*lead, r or 1, b, b]` (`oftjax.adapters.oft_blocks`).

  Returns:
    `Δ` in the kernel's matrix layout (`oftjax.geometry.kernel_to_matrix`): adding it
    to that matrix gives `oftjax.adapters.fold_oft`'s kernel.
  """
  mat = np.asarray(geo.kernel_to_matrix(np.asarray(kernel, np.float32), geom), np.float64)
  blocks = np.asarray(blocks, np.float64)
  b = blocks.shape[-1]
  lead = mat.shape[:-2]
  r = geom.d_in // b
  chunks = mat.reshape(*lead, r, b, geom.d_out)
  rotation_minus_identity = np.broadcast_to(blocks - np.eye(b), (*lead, r, b, b))
  delta = np.einsum("...rij,...rjo->...rio", rotation_minus_identity, chunks)
  return delta.reshape(*lead, geom.d_in, geom.d_out)


def _spectrum(path, geom, kernel, blocks) -> _LayerSpectrum:
  delta = oft_update(kernel, geom, blocks)
  lead = delta.shape[:-2]
  flat = delta.reshape(-1, geom.d_in, geom.d_out)
  u, s, vt = np.linalg.svd(flat, full_matrices=False)
  mat = np.asarray(geo.kernel_to_matrix(np.asarray(kernel, np.float32), geom), np.float64)
  weight_norms = np.linalg.norm(mat.reshape(-1, geom.d_in * geom.d_out), axis=-1)
  return _LayerSpectrum(path, s, weight_norms, (u, vt), lead)


def _ratio(num_sq: float, den_sq: float) -> float:
  """`sqrt(num² / den²)`, 0 for a zero update (nothing to lose)."""
  return math.sqrt(num_sq / den_sq) if den_sq > 0 else 0.0


def _errors(spectra: Sequence[_LayerSpectrum], rank: int) -> dict:
  """Model-level relative errors of a rank-`rank` truncation of every layer."""
  res = sum(float(np.sum(s.singular_values[:, rank:] ** 2)) for s in spectra)
  delta = sum(float(np.sum(s.singular_values**2)) for s in spectra)
  weight = sum(float(np.sum(s.weight_norms**2)) for s in spectra)
  return {
    "relative_error": _ratio(res, delta),
    "relative_to_weight": _ratio(res, weight),
  }


def _lora_leaves(spectrum: _LayerSpectrum, rank: int) -> dict:
  """`{'a', 'b'}` float32, shaped like the layer's stacked axes, rank padded with zeros."""
  u, vt = spectrum.factors
  keep = min(rank, u.shape[-1])
  root = np.sqrt(spectrum.singular_values[:, :keep])
  a = np.zeros((u.shape[0], u.shape[1], rank))
  b = np.zeros((u.shape[0], rank, vt.shape[-1]))
  a[..., :keep] = u[..., :keep] * root[:, None, :]
  b[:, :keep] = root[:, :, None] * vt[:, :keep]
  lead = spectrum.lead_shape
  return {
    "a": a.reshape(*lead, *a.shape[1:]).astype(np.float32),
    "b": b.reshape(*lead, *b.shape[1:]).astype(np.float32),
  }


def _layer_report(spectrum: _LayerSpectrum, rank: int) -> dict:
  s, w = spectrum.singular_values, spectrum.weight_norms
  res = np.sum(s[:, rank:] ** 2, axis=-1)
  delta = np.sum(s**2, axis=-1)
  shape = spectrum.lead_shape

  def per_copy(values):
    out = np.asarray(values, np.float64).reshape(shape)
    return out.tolist() if shape else float(out)

  return {
    "full_rank": int(s.shape[-1]),
    "relative_error": per_copy([_ratio(r, d) for r, d in zip(res, delta)]),
    "relative_to_weight": per_copy([_ratio(r, x**2) for r, x in zip(res, w)]),
    "delta_norm": per_copy(np.sqrt(delta)),
    "weight_norm": per_copy(w),
  }


def default_curve_ranks(full_rank: int) -> list[int]:
  """Powers of two below `full_rank`, then `full_rank` itself: the ranks a curve reports."""
  ranks = [1 << i for i in range(max(full_rank, 1).bit_length()) if (1 << i) < full_rank]
  return ranks + [full_rank]


def lora_from_oft(
  params: Mapping,
  geometries: Mapping[str, geo.LayerGeometry],
  config: adapters.AdapterConfig,
  rank: int,
  curve_ranks: Sequence[int] | None = None,
) -> tuple[dict, adapters.AdapterConfig, dict]:
  """The rank-`rank` LoRA adapter closest to an OFT adapter, and what the truncation loses.

  Args:
    params: the adapted tree, float kernels merged with the OFT adapter leaves (on a
      quantized base: `oftjax.quant.dequantize_params` of it first, see the module doc).
    geometries: `oftjax.adapt(...).geometries` of the model.
    config: the OFT adapter's config (method `oft` or `oftv1`).
    rank: the LoRA rank `r` of every layer.
    curve_ranks: ranks at which the model-level errors are also reported (default: powers
      of two up to the largest layer's full rank, `default_curve_ranks`).

  Returns:
    `(lora_tree, lora_config, report)`: the LoRA adapter tree (`{'lora': {'a', 'b'}}` beside
    each OFT layer's kernel, stacked like it), its config (`method='lora'`, same targets,
    `lora_rank = lora_alpha = rank`: scale 1; write it with `oftjax.peft_io.export_peft`)
    and `{'rank', 'relative_error', 'relative_to_weight', 'full_rank', 'lora_params',
    'layers': {path: {'full_rank', 'relative_error', 'relative_to_weight', 'delta_norm',
    'weight_norm'}}, 'curve': [{'rank', 'relative_error', 'relative_to_weight',
    'lora_params'}]}`; per-layer figures are lists over a stacked axis.

  Raises:
    ValueError: `rank` < 1, `config` is not an OFT config, a layer's kernel is not a
      plain float `kernel` (dequantize first), or a layer's output layout cannot hold LoRA.
  """
  if config.leaf_name != "oft":
    raise ValueError(
      f"lora_from_oft converts OFT adapters; this config's method is {config.method!r}"
    )
  if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
    raise ValueError(f"rank must be a positive integer (got {rank!r})")
  base, adapter = P.split_params(params)
  spectra, tree = [], {}
  for path, geom in geometries.items():
    node = P.node_at(base, path)
    if "kernel" not in node:
      raise ValueError(
        f"layer '{path}' has no float kernel (keys {sorted(node)}); dequantize the base "
        "first (oftjax.quant.dequantize_params)"
      )
    if not geom.lora_ok:
      raise ValueError(
        f"layer '{path}': its kernel's free axes are not the trailing output axes, so "
        "LoRA cannot represent its update; exclude it from the OFT targets"
      )
    leaves = P.node_at(adapter, path)["oft"]
    blocks = jax.device_get(adapters.oft_blocks(leaves, config, path))
    spectrum = _spectrum(path, geom, jax.device_get(node["kernel"]), blocks)
    spectra.append(spectrum)
    target = tree
    for part in path.split("/"):
      target = target.setdefault(part, {})
    target["lora"] = _lora_leaves(spectrum, rank)
  full = max(s.singular_values.shape[-1] for s in spectra)
  copies = {s.path: s.singular_values.shape[0] for s in spectra}

  def lora_params(k):
    return sum(copies[p] * k * (g.d_in + g.d_out) for p, g in geometries.items())

  curve = [
    {"rank": k, **_errors(spectra, k), "lora_params": lora_params(k)}
    for k in sorted(set(curve_ranks if curve_ranks is not None else default_curve_ranks(full)))
  ]
  report = {
    "rank": rank,
    **_errors(spectra, rank),
    "full_rank": full,
    "lora_params": lora_params(rank),
    "layers": {s.path: _layer_report(s, rank) for s in spectra},
    "curve": curve,
  }
  lora_config = dataclasses.replace(
    config, method="lora", lora_rank=rank, lora_alpha=float(rank), coft_eps=None, block_dropout=0.0
  )
  return tree, lora_config, report
