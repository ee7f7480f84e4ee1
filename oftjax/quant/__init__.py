"""QOFT / QLoRA: adapters on a frozen base whose linear kernels are stored in NF4 or int8.

    base_q = quant.quantize_params(base, geometries, "nf4")      # tensor by tensor
    y = Adapted(model, config).apply({"params": merge_params(base_q, adapter)}, x)
    merged_q, report = quant.merge_into_quantized(params_q, geometries, config)

The interceptor dequantizes each ``kernel_q`` inside the traced step (see
:mod:`oftjax.quant.tree`); adapters stay float32.
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
from oftjax.quant.merge import merge_into_quantized
from oftjax.quant.tree import (
    QUANT_KEY,
    dequantize_params,
    dequantized_call,
    float_params,
    has_kernel,
    is_quantized,
    kernel_to_matrix,
    logical_count,
    matrix_to_kernel,
    quantize_on_load,
    quantize_params,
    storage_report,
)

__all__ = [
    "MODES", "NF4_BLOCK", "QUANT_KEY", "dequantize_matrix", "dequantize_params",
    "dequantized_call", "error_bound", "float_params", "has_kernel", "is_quantized",
    "kernel_to_matrix", "logical_count", "matrix_to_kernel", "merge_into_quantized",
    "nf4_code_values", "nf4_max_half_gap", "quantize_matrix", "quantize_on_load",
    "quantize_params", "storage_report",
]
