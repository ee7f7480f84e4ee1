"""What oftjax's interceptors share: kernel storage, re-running a layer, scope-sharing wrappers.

The adapter interceptor (`oftjax.intercept`) and the dequantizer
(`oftjax.quant.dequantized`) both build on this module, so neither imports the other:

- *Kernel storage.* A linear layer holds its kernel as a plain `kernel` or under a key
  that another module registers together with a reader (`oftjax.quant` registers
  `kernel_q` when imported). `float_params` returns a layer's params with its
  kernel as a float `kernel`, however it is stored.
- *Re-running a layer.* `call_layer` applies a layer to substituted params (e.g. a
  rotated or dequantized kernel). While it runs, `replaying` is true and every
  oftjax interceptor lets the layer through, so no layer is adapted or dequantized twice.
- *Wrappers.* `InterceptingWrapper` is a Linen module that shares the wrapped
  module's scope (the parameter tree is unchanged) and opens its interceptor inside the
  traced call (an interceptor entered around a jitted call is invisible to the jit
  cache). Wrappers nest; flax runs interceptors in the order they were entered, so the
  outer wrapper's interceptor sees a layer first and the inner one runs closest to it:
  `Adapted(quant.Dequantized(model), config)` adapts a layer, then the dequantizer
  runs it on its dequantized kernel.

References:
  flax `nn.intercept_methods` and `nn.share_scope`; google-deepmind/gemma `peft/`.
"""

from __future__ import annotations

from collections.abc import Callable
import contextvars
from typing import Any

import flax.linen as nn
import jax

from oftjax import geometry as geo

# reader(layer, stored value, geometry) -> the kernel in float, in the layer's kernel layout
KernelReader = Callable[[nn.Module, Any, geo.LayerGeometry], jax.Array]

PLAIN_KERNEL = "kernel"
_READERS: dict[str, KernelReader] = {PLAIN_KERNEL: lambda module, kernel, geom: kernel}
_REPLAYING = contextvars.ContextVar("oftjax_replaying_layer", default=False)


def register_kernel_storage(key: str, reader: KernelReader) -> None:
  """Lets a layer hold its kernel under `key`; `reader` turns it back into a float kernel.

  Args:
    key: the parameter name the stored kernel sits under, beside the layer's `bias`.
    reader: `reader(layer, stored, geometry)` returning the kernel (shape
      `geometry.kernel_shape`), traceable so that it runs inside the step.

  Raises:
    ValueError: for the plain `'kernel'` key, which needs no reader.
  """
  if key == PLAIN_KERNEL:
    raise ValueError("'kernel' is the plain kernel storage; register another key")
  _READERS[key] = reader


def kernel_storage(module: nn.Module) -> str | None:
  """The key a bound layer stores its kernel under, or `None` before it exists (init)."""
  if module.scope is None:
    return None
  return next((key for key in _READERS if module.has_variable("params", key)), None)


def has_kernel(module: nn.Module) -> bool:
  """Whether the layer's kernel exists yet, however stored; False while initialising."""
  return kernel_storage(module) is not None


def float_params(module: nn.Module, geom: geo.LayerGeometry, exclude=()) -> dict:
  """The layer's own params with its kernel as a float `kernel`, without `exclude` entries.

  A stored kernel (e.g. `kernel_q`) is read back inside the trace (per scanned layer
  under `nn.scan`), so between steps only the stored form exists.

  Args:
    module: a bound linear layer whose kernel exists (`has_kernel`).
    geom: its geometry, for readers that store the kernel in another layout.
    exclude: names of sub-trees to leave out (e.g. adapter leaves).

  Returns:
    `{'kernel': ..., 'bias': ..., ...}`, ready for `call_layer`.
  """
  own = module.variables["params"]
  out = {k: v for k, v in own.items() if k not in exclude and k not in _READERS}
  key = kernel_storage(module)
  out[PLAIN_KERNEL] = _READERS[key](module, own[key], geom)
  return out


def replaying() -> bool:
  """True while `call_layer` re-runs a layer: interceptors must let it through."""
  return _REPLAYING.get()


def call_layer(module: nn.Module, params: dict, *args, **kwargs) -> Any:
  """Runs the layer `module` on `params` of its own, not intercepted again."""
  token = _REPLAYING.set(True)
  try:
    return module.clone(parent=None).apply({"params": params}, *args, **kwargs)
  finally:
    _REPLAYING.reset(token)


class InterceptingWrapper(nn.Module):
  """A module that runs the module it wraps (sharing its scope) under an interceptor.

  Subclasses hold the wrapped module in a dataclass field, expose it as the `wrapped`
  property, and implement `intercepting()`: an `nn.nowrap` context manager that
  opens their interceptor. Nested wrappers need distinct field names (one shared scope
  cannot hold two children of the same name).
  """

  def setup(self):
    nn.share_scope(self, self.wrapped)

  def __call__(self, *args, **kwargs) -> Any:
    return self.call_method("__call__", *args, **kwargs)

  def call_method(self, method_name: str, *args, **kwargs) -> Any:
    """Calls `wrapped.<method_name>` (e.g. a decode method) under the interceptor."""
    with self.intercepting():
      return call_through(self.wrapped, method_name, *args, **kwargs)


def call_through(module: nn.Module, method_name: str, *args, **kwargs) -> Any:
  """Calls `module.<method_name>`, through any wrappers' interceptors."""
  if isinstance(module, InterceptingWrapper):
    return module.call_method(method_name, *args, **kwargs)
  return getattr(module, method_name)(*args, **kwargs)
