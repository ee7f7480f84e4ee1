"""Injects adapters into any Flax Linen model through a method interceptor.

``Adapted(model, config)`` is a Linen module that shares ``model``'s scope, so its
parameter tree is the base tree plus adapter leaves beside each targeted kernel::

    {'layers': {'self_attn': {'q_proj': {'kernel': ..., 'oft': {'weight': ...}}}}}

Its ``__call__`` opens ``nn.intercept_methods`` *inside* the traced function (an
interceptor around a jitted call would be invisible to the jit cache). Each
targeted ``nn.Dense`` / ``nn.DenseGeneral`` / ``nn.Einsum`` call then sees its input
rotated (OFTv2), its kernel rotated (original OFT), or a low-rank term added (LoRA).
Works under ``jax.jit``, ``nn.scan`` and ``nn.remat``.

References:
  google-deepmind/gemma ``peft/`` (adapters that share the wrapped module's scope);
  Qiu et al., OFTv2, arXiv:2506.19847.
"""

from __future__ import annotations

import contextlib
from typing import Any

import flax.linen as nn
import jax

from oftjax import adapters
from oftjax import geometry as geo
from oftjax import quant

_UNSUPPORTED_LINEAR = (nn.Conv, nn.ConvTranspose, nn.ConvLocal, nn.Embed)
_RECORDERS: list[dict] = []


@contextlib.contextmanager
def record_geometries():
  """Collects ``{path: LayerGeometry}`` of every adapted layer traced inside the block."""
  found: dict[str, geo.LayerGeometry] = {}
  _RECORDERS.append(found)
  try:
    yield found
  finally:
    _RECORDERS.remove(found)


class AdapterInterceptor:
  """Linen method interceptor that applies :class:`~oftjax.adapters.AdapterConfig`."""

  def __init__(self, config: adapters.AdapterConfig):
    self.config = config
    self.matched: list[str] = []
    self.seen: list[str] = []
    self.bypass = False  # set while our own weight-centric call runs the layer again

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or module.scope is None or self.bypass:
      return next_fun(*args, **kwargs)
    path = "/".join(str(p) for p in module.scope.path)
    linear = isinstance(module, geo.SUPPORTED_LAYERS)
    if linear:
      self.seen.append(path)
    # --- quantized frozen kernel (oftjax.quant, QOFT/QLoRA): run the layer on a kernel
    # dequantized inside the trace; the adapter code below sees an ordinary layer.
    geom = None
    if linear and quant.is_quantized(module):
      geom = geo.geometry_of(module, path, args[0], kwargs)
      next_fun = quant.dequantized_call(module, geom, self._call_with)
    # --- end quantized kernel
    if not self.config.is_target(path):
      return next_fun(*args, **kwargs)
    if isinstance(module, _UNSUPPORTED_LINEAR):
      raise ValueError(
          f"layer '{path}' is an {type(module).__name__}, which adapters do not support; "
          "narrow the targets regex")
    if not linear:
      return next_fun(*args, **kwargs)
    x, rest = args[0], args[1:]
    geom = geom or geo.geometry_of(module, path, x, kwargs)
    self.matched.append(path)
    for recorder in _RECORDERS:
      recorder[path] = geom
    config = self.config
    if config.method == "lora":
      leaves = _adapter_leaves(module, path, "lora",
                               lambda rng: adapters.init_lora(rng, geom, config, path))
      y = next_fun(*args, **kwargs)
      return y + adapters.lora_delta(x, geom, leaves, config).astype(y.dtype)
    leaves = _adapter_leaves(module, path, "oft",
                             lambda rng: adapters.init_oft(geom.d_in, config, path))
    blocks = adapters.oft_blocks(leaves, config, path)
    if config.method == "oft":
      return next_fun(adapters.rotate_input(x, geom, blocks), *rest, **kwargs)
    return self._weight_centric_call(module, next_fun, geom, blocks, x, rest, kwargs)

  def _weight_centric_call(self, module, next_fun, geom, blocks, x, rest, kwargs):
    """Original OFT: runs the same layer with ``blockdiag(R) @ kernel`` as its kernel."""
    if not quant.has_kernel(module):
      return next_fun(x, *rest, **kwargs)  # initialisation: creates kernel (R = I anyway)
    base = quant.float_params(module, geom)  # own params minus adapters; kernel_q dequantized
    base["kernel"] = adapters.weight_centric_kernel(base["kernel"], geom, blocks)
    return self._call_with(module, base, x, *rest, **kwargs)

  def _call_with(self, module, params, *args, **kwargs):
    """Runs ``module`` (not intercepted again) on the given params of its own."""
    self.bypass = True
    try:
      return module.clone(parent=None).apply({"params": params}, *args, **kwargs)
    finally:
      self.bypass = False


def _adapter_leaves(module: nn.Module, path: str, name: str, init_fn) -> dict:
  """The layer's adapter leaves: created by ``init_fn`` or read back and shape-checked."""
  if not module.has_variable("params", name):
    return module.param(name, init_fn)
  leaves = module.get_variable("params", name)
  expected = jax.eval_shape(init_fn, jax.random.key(0))
  for key, spec in expected.items():
    got = getattr(leaves.get(key), "shape", None)
    if got != spec.shape:
      raise ValueError(
          f"layer '{path}': adapter leaf '{name}/{key}' has shape {got}, expected "
          f"{spec.shape} from the adapter config; load an adapter made with the same config")
  return leaves


class Adapted(nn.Module):
  """Wraps any Linen ``model`` so that its targeted linear layers carry adapters.

  Attributes:
    model: the base Linen module (never modified).
    config: which adapter, where, and its hyper-parameters.
  """

  model: nn.Module
  config: adapters.AdapterConfig

  def setup(self):
    nn.share_scope(self, self.model)

  def __call__(self, *args, **kwargs) -> Any:
    return self.call_method("__call__", *args, **kwargs)

  def call_method(self, method_name: str, *args, **kwargs) -> Any:
    """Calls ``model.<method_name>`` with adapters active (e.g. a decode method)."""
    interceptor = AdapterInterceptor(self.config)
    with nn.intercept_methods(interceptor):
      out = getattr(self.model, method_name)(*args, **kwargs)
    if not interceptor.matched:
      seen = sorted(set(interceptor.seen))
      raise ValueError(
          f"targets regex {self.config.targets!r} matched no Dense/DenseGeneral/Einsum layer "
          f"(layer paths: {', '.join(seen[:8]) or 'none'}{' …' if len(seen) > 8 else ''})")
    return out
