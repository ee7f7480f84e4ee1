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
import functools
import types
from typing import Any

import flax.linen as nn
from flax.linen import transforms as flax_transforms
import jax

from oftjax import geometry as geo

# reader(layer, stored value, geometry) -> the kernel in float, in the layer's kernel layout
KernelReader = Callable[[nn.Module, Any, geo.LayerGeometry], jax.Array]

PLAIN_KERNEL = geo.PLAIN_WEIGHT
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


def kernel_storage(module: nn.Module, weight: str = PLAIN_KERNEL) -> str | None:
  """The key a bound layer stores its weight under, or `None` before it exists (init).

  A weight other than `kernel` (e.g. the gemma library's `w`) has plain storage only.
  """
  if module.scope is None:
    return None
  keys = _READERS if weight == PLAIN_KERNEL else (weight,)
  return next((key for key in keys if module.scope.has_variable("params", key)), None)


def has_kernel(module: nn.Module, weight: str = PLAIN_KERNEL) -> bool:
  """Whether the layer's weight exists yet, however stored; False while initialising."""
  return kernel_storage(module, weight) is not None


def float_params(module: nn.Module, geom: geo.LayerGeometry, exclude=lambda name: False) -> dict:
  """The layer's own params with its weight (`geom.weight`) in float, under its own name.

  A stored kernel (e.g. `kernel_q`) is read back inside the trace (per scanned layer
  under `nn.scan`), so between steps only the stored form exists.

  Args:
    module: a bound linear layer whose weight exists (`has_kernel`).
    geom: its geometry (names the weight; readers may store the kernel in another layout).
    exclude: `exclude(name)` is true for entries to leave out (e.g. adapter leaves).

  Returns:
    `{geom.weight: ..., 'bias': ..., ...}`, ready for `call_layer`.
  """
  own = module.scope.variables()["params"]
  storage = _READERS if geom.weight == PLAIN_KERNEL else {geom.weight: None}
  out = {k: v for k, v in own.items() if not exclude(k) and k not in storage}
  key = kernel_storage(module, geom.weight)
  value = own[key]
  out[geom.weight] = _READERS[key](module, value, geom) if geom.weight == PLAIN_KERNEL else value
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
  """Calls `module.<method_name>`, through any wrappers' interceptors.

  A method wrapped in `nn.jit` (the gemma library's `Transformer.__call__`) is run
  beneath its `nn.jit`: flax caches that trace by module and inputs, blind to the
  interceptors, so a later call could reuse a trace made without them. The caller's own
  `jax.jit` compiles the call as before.
  """
  if isinstance(module, InterceptingWrapper):
    return module.call_method(method_name, *args, **kwargs)
  beneath = beneath_nn_jit(getattr(type(module), method_name, None))
  if beneath is None:
    return getattr(module, method_name)(*args, **kwargs)
  token = _BENEATH_JIT.set((module, method_name))
  try:
    return beneath(module, *args, **kwargs)
  finally:
    _BENEATH_JIT.reset(token)


def _nn_jit_codes() -> frozenset:
  """Code objects of the functions flax's `nn.jit` wraps a method in."""
  outer = getattr(flax_transforms, "decorator_lift_transform_cached", None)
  consts = outer.__code__.co_consts if outer is not None else ()
  return frozenset(c for c in consts if isinstance(c, types.CodeType))


_NN_JIT_CODES = _nn_jit_codes()
_BENEATH_JIT = contextvars.ContextVar("oftjax_beneath_nn_jit", default=None)


def beneath_nn_jit(method) -> Callable | None:
  """The function an `nn.jit`-wrapped method runs (`None` when not so wrapped)."""
  while method is not None:
    if getattr(method, "__code__", None) in _NN_JIT_CODES:
      return method.__wrapped__
    method = getattr(method, "__wrapped__", None)
  return None


def jitted_methods(module: nn.Module) -> tuple[str, ...]:
  """Names of `module`'s methods wrapped in `nn.jit`."""
  return _jitted_method_names(type(module))


@functools.cache
def _jitted_method_names(cls: type) -> tuple[str, ...]:
  names = {n for c in cls.__mro__ for n, v in vars(c).items() if callable(v)}
  return tuple(sorted(n for n in names if beneath_nn_jit(getattr(cls, n, None))))


def runs_beneath_jit(module: nn.Module, method_name: str) -> bool:
  """Whether this call is `call_through` running `module`'s method beneath `nn.jit`."""
  current = _BENEATH_JIT.get()
  return current is not None and current[0] is module and current[1] == method_name
