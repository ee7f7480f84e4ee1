"""`Dequantized(model)`: runs every linear layer holding `kernel_q` on its dequantized kernel.

A wrapper sharing `model`'s scope (the tree is unchanged) whose interceptor, opened
inside the traced call, replaces each such layer's call by the same layer applied to
its kernel dequantized in the trace: between jitted steps only the quantized bytes
exist. Compose it *inside* the adapter wrapper, `Adapted(Dequantized(model), config)`:
flax calls interceptors in the order they were entered, so the adapters see each layer
first (OFT rotates its input, LoRA adds its term after) and this one runs the layer.

References:
  Dettmers et al. "QLoRA", arXiv:2305.14314; Qiu et al. OFTv2 (QOFT), arXiv:2506.19847.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from oftjax import layer, layer_kinds
from oftjax import params as P
from oftjax.quant.kernel import QUANT_KEY, dequantize_kernel, is_quantized


def dequantizing_interceptor(next_fun, args, kwargs, context):
  """Linen method interceptor: a quantized linear layer's call runs on its dequantized kernel.

  The call is wrapped in `jax.checkpoint` so that the backward pass recomputes the
  dequantized kernel from `kernel_q` instead of keeping it: without this, the
  dequantized kernels of all scanned layers were saved as residuals, a full-precision
  copy of every targeted kernel in the step's temporaries (measured with
  `memory_analysis()`: QOFT temp bytes = OFT's + the fp32 kernel bytes).
  """
  module = context.module
  if (
    context.method_name != "__call__"
    or layer.replaying()
    or layer_kinds.kind_of(module) is None
    or not is_quantized(module)
  ):
    return next_fun(*args, **kwargs)
  path = "/".join(str(p) for p in module.scope.path)
  call = layer_kinds.describe_call(module, path, args, kwargs)
  x = call.input_of(args, kwargs)
  geom = call.geometry(x, path)
  own = module.scope.variables()["params"]
  others = {k: v for k, v in own.items() if not P.is_adapter_key(k, v) and k != QUANT_KEY}
  dtype = getattr(module, "param_dtype", jnp.float32)

  def run(quantized, x):
    kernel = dequantize_kernel(quantized, geom, dtype)
    call_args, call_kwargs = call.with_input(args, kwargs, x)
    return layer.call_layer(module, {**others, "kernel": kernel}, *call_args, **call_kwargs)

  return jax.checkpoint(run)(own[QUANT_KEY], x)


class Dequantized(layer.InterceptingWrapper):
  """Wraps a Linen model whose linear kernels may be stored as `kernel_q`.

  Layers with a plain `kernel` run as they are, so the wrapper is inert on a float
  tree and while initialising. It runs each quantized layer itself, so it must be the
  innermost oftjax wrapper: `Adapted(Dequantized(model), config)`.
  `call_method(name, *args)` runs another method (e.g. a decode method) the same way.

  Attributes:
    base: the Linen model (never modified).
  """

  base: nn.Module

  @property
  def wrapped(self) -> nn.Module:
    return self.base

  @nn.nowrap
  def intercepting(self):
    """Context in which `dequantizing_interceptor` is active.

    Raises:
      ValueError: when it wraps another oftjax wrapper (e.g. `Adapted`): its
        interceptor would then see each layer first and run it without the adapters.
    """
    if isinstance(self.base, layer.InterceptingWrapper):
      raise ValueError(
        f"quant.Dequantized wraps a {type(self.base).__name__}; it must wrap the base model "
        "itself, inside the adapters: Adapted(quant.Dequantized(model), config)"
      )
    return nn.intercept_methods(dequantizing_interceptor)
