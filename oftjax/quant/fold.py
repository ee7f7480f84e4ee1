"""Folding an OFT or LoRA adapter into a quantized base: dequantize, fold, requantize.

Requantizing adds error on top of the base's own quantization error, and may swamp a
small adapter update, so `fold_into_quantized` measures it: on random probe
inputs `x ~ N(0, 1)` it compares each merged-and-requantized layer's output with the
*unmerged* adapted layer (`rotate(x) @ deq(K)` for OFT, `x @ deq(K) + LoRA(x)`),
next to the size of the adapter's own effect `|adapted - base|`.

References:
  Dettmers et al. "QLoRA", arXiv:2305.14314; Qiu et al. OFTv2, arXiv:2506.19847.
"""

from __future__ import annotations

from collections.abc import Mapping
import functools
import math

import jax
import jax.numpy as jnp

from oftjax import adapters, orthogonal
from oftjax import geometry as geo
from oftjax import params as P
from oftjax.quant import codes
from oftjax.quant.kernel import QUANT_KEY


def _settings(leaves: dict) -> tuple[str, int, bool]:
  """(mode, NF4 block size, double quant) of stored leaves, so requantizing matches them."""
  mode = codes.mode_of(leaves)
  if mode == "int8":
    return mode, codes.NF4_BLOCK, False
  d_in = 2 * leaves["nf4"].shape[-2]
  d_out = leaves["nf4"].shape[-1]
  n_const = leaves["absmax"].size if "absmax" in leaves else leaves["absmax_q"].size
  per_matrix = n_const // math.prod(leaves["nf4"].shape[:-2])
  return mode, d_in * d_out // per_matrix, "absmax_q" in leaves


def _fold_one(q_leaves, adapter_leaves, config, settings, x):
  """One layer (no stacked axes): requantized merged leaves and output differences."""
  mode, block, dq = settings
  mat = codes.dequantize_matrix(q_leaves)
  d_in, d_out = mat.shape
  flat = geo.LayerGeometry((1,), (0,), (d_in, d_out), True)
  base_y = x @ mat
  if config.method == "lora":
    merged = adapters.fold_lora(mat, flat, adapter_leaves, config)
    ref_y = base_y + adapters.lora_delta(x, flat, adapter_leaves, config)
  else:
    blocks = adapters.oft_blocks(adapter_leaves, config)
    merged = adapters.fold_oft(mat, flat, blocks)
    ref_y = orthogonal.rotate(x, blocks) @ mat
  new_leaves = codes.quantize_matrix(merged, mode, block, dq)
  merged_y = x @ codes.dequantize_matrix(new_leaves)
  err = jnp.abs(merged_y - ref_y)
  stats = {
    "max_abs": jnp.max(err),
    "mean_abs": jnp.mean(err),
    "fp32_merge_max_abs": jnp.max(jnp.abs(x @ merged - ref_y)),
    "adapter_effect_mean_abs": jnp.mean(jnp.abs(ref_y - base_y)),
    "requant_only_mean_abs": jnp.mean(
      jnp.abs(  # same path with no adapter
        x @ codes.dequantize_matrix(codes.quantize_matrix(mat, mode, block, dq)) - base_y
      )
    ),
    "output_mean_abs": jnp.mean(jnp.abs(ref_y)),
  }
  return new_leaves, stats


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _fold_stacked(q_leaves, adapter_leaves, x, config, settings, lead):
  one = lambda q, a: _fold_one(q, a, config, settings, x)
  return P.over_stacked_axes(one, lead)(q_leaves, adapter_leaves)


def fold_into_quantized(
  params,
  geometries: Mapping[str, geo.LayerGeometry],
  config: adapters.AdapterConfig,
  probe_rows: int = 256,
  seed: int = 0,
) -> tuple[dict, dict]:
  """Folds every adapter into its quantized kernel and requantizes it the same way.

  Args:
    params: adapted tree whose targeted layers hold `kernel_q` and adapter leaves.
    geometries: `{path: LayerGeometry}` of the adapted layers.
    config: the adapter config the leaves were trained with (`oft` or `lora`).
    probe_rows: random input rows per layer for the error figures.
    seed: seed of the probe inputs.

  Returns:
    `(tree, report)`: a base-shaped quantized tree (no adapter leaves) and
    `{'layers': {path: stats}, 'max_abs', 'mean_abs', 'adapter_effect_mean_abs',
    'output_mean_abs', 'fp32_merge_max_abs', 'requant_only_mean_abs'}`, where
    `max_abs`/`mean_abs` are `|merged-requantized output - unmerged adapted
    output|` (max over layers and stacked copies / mean of per-layer means),
    `fp32_merge_max_abs` the same before requantizing (fp32 rounding only), and
    `requant_only_mean_abs` what requantizing the unchanged base alone costs
    (int8: qwix's scale `absmax / 127.5` shrinks by `127/127.5` per round trip;
    NF4 without double quant: 0).
  """
  base, adapter = P.split_params(params)
  base, nodes = P.edit_layers(base, geometries)
  layers = {}
  for i, (path, geom, node) in enumerate(nodes):
    if QUANT_KEY not in node:
      raise ValueError(f"layer '{path}' has no quantized kernel; quantize the base first")
    q_leaves, a_leaves = node[QUANT_KEY], P.node_at(adapter, path)[config.leaf_name]
    settings = _settings(q_leaves)
    lead = q_leaves[codes.mode_of(q_leaves)].ndim - 2
    x = jax.random.normal(jax.random.fold_in(jax.random.key(seed), i), (probe_rows, geom.d_in))
    node[QUANT_KEY], stats = _fold_stacked(q_leaves, a_leaves, x, config, settings, lead)
    layers[path] = {k: float(jnp.max(v) if "max" in k else jnp.mean(v)) for k, v in stats.items()}
  summary = (
    {
      k: (max if "max" in k else lambda v: sum(v) / len(v))([s[k] for s in layers.values()])
      for k in next(iter(layers.values()))
    }
    if layers
    else {}
  )
  return base, {"layers": layers, **summary}
