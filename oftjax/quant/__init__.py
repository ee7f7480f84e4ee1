"""QOFT / QLoRA: adapters on a frozen base whose linear kernels are stored in NF4 or int8.

    adapted = oftjax.adapt(quant.Dequantized(model), config, tokens)
    base_q = quant.quantize_params(base, adapted.geometries, "nf4")   # tensor by tensor
    y = adapted.apply(merge_params(base_q, adapter), tokens)
    folded_q, report = quant.fold_into_quantized(params_q, adapted.geometries, config)

Modules: `codes` (NF4 / int8 of one matrix, on qwix), `kernel` (a layer's
`kernel_q` leaves; registers them as a kernel storage), `tree` (quantizing and
dequantizing a tree), `dequantized` (the `Dequantized` wrapper that runs
layers on kernels dequantized inside the trace; adapters stay float32), `fold`
(folding adapters into a quantized base), `report` (bytes and counts).
"""

from oftjax.quant.codes import (
  MODES,
  NF4_BLOCK,
  dequantize_matrix,
  error_bound,
  nf4_code_values,
  nf4_max_half_gap,
  quantize_matrix,
)
from oftjax.quant.dequantized import Dequantized
from oftjax.quant.fold import fold_into_quantized
from oftjax.quant.kernel import QUANT_KEY
from oftjax.quant.report import logical_count, storage_report
from oftjax.quant.tree import dequantize_params, quantize_on_load, quantize_params

__all__ = [
  "Dequantized",
  "MODES",
  "NF4_BLOCK",
  "QUANT_KEY",
  "dequantize_matrix",
  "dequantize_params",
  "error_bound",
  "logical_count",
  "fold_into_quantized",
  "nf4_code_values",
  "nf4_max_half_gap",
  "quantize_matrix",
  "quantize_on_load",
  "quantize_params",
  "storage_report",
]
