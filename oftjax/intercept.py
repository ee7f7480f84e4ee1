"""Injects adapters into any Flax Linen model through a method interceptor.

`Adapted(model, config)` is a Linen module that shares `model`'s scope, so its
parameter tree is the base tree plus adapter leaves beside each targeted kernel::

    {'layers': {'self_attn': {'q_proj': {'kernel': ..., 'oft': {'weight': ...}}}}}

Its `__call__` opens `nn.intercept_methods` *inside* the traced function (an
interceptor around a jitted call would be invisible to the jit cache). Each
targeted `nn.Dense` / `nn.DenseGeneral` / `nn.Einsum` call then sees its input
rotated (OFTv2), its kernel rotated (original OFT), or a low-rank term added (LoRA).
Works under `jax.jit`, `nn.scan` and `nn.remat`.

A base whose kernels are stored otherwise (QOFT / QLoRA) is wrapped first:
`Adapted(quant.Dequantized(model), config)`. The adapter interceptor, entered
first, sees each layer first; the dequantizer's runs the layer itself
(`oftjax.layer`). The original OFT path reads the float kernel through
`oftjax.layer.float_params`, whatever its storage.

References:
  google-deepmind/gemma `peft/` (adapters that share the wrapped module's scope);
  Qiu et al., OFTv2, arXiv:2506.19847.
"""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax

from oftjax import adapters, layer
from oftjax import geometry as geo
from oftjax import params as P

_UNSUPPORTED_LINEAR = (nn.Conv, nn.ConvTranspose, nn.ConvLocal, nn.Embed)


class AdapterInterceptor:
  """Linen method interceptor that applies `oftjax.adapters.AdapterConfig`.

  Attributes:
    config: the adapter config.
    deterministic: ignore `config.block_dropout` (evaluation); when False and the rate
      is positive, each OFT layer draws its dropout mask from the `'dropout'` rng.
    geometries: `{path: LayerGeometry}` of every layer it adapted so far.
    seen: paths of every linear layer it saw (for the "matched nothing" error).
    packed: paths of matrix-shaped parameters of non-linear modules the targets match.
  """

  def __init__(self, config: adapters.AdapterConfig, deterministic: bool = True):
    self.config = config
    self.deterministic = deterministic
    self.geometries: dict[str, geo.LayerGeometry] = {}
    self.seen: list[str] = []
    self.packed: list[str] = []

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or module.scope is None or layer.replaying():
      return next_fun(*args, **kwargs)
    path = "/".join(str(p) for p in module.scope.path)
    if not isinstance(module, geo.SUPPORTED_LAYERS):
      if isinstance(module, _UNSUPPORTED_LINEAR) and self.config.is_target(path):
        raise ValueError(
          f"layer '{path}' is an {type(module).__name__}, which adapters do not support; "
          "narrow the targets regex"
        )
      y = next_fun(*args, **kwargs)
      self._refuse_packed_params(module, path)
      return y
    self.seen.append(path)
    if not self.config.is_target(path):
      return next_fun(*args, **kwargs)
    x, rest = args[0], args[1:]
    geom = geo.geometry_of(module, path, x, kwargs)
    self.geometries[path] = geom
    config = self.config
    if config.method == "lora":
      leaves = _adapter_leaves(
        module, path, "lora", lambda rng: adapters.init_lora(rng, geom, config, path)
      )
      y = next_fun(*args, **kwargs)
      return y + adapters.lora_delta(x, geom, leaves, config).astype(y.dtype)
    leaves = _adapter_leaves(
      module, path, "oft", lambda rng: adapters.init_oft(geom.d_in, config, path)
    )
    blocks = adapters.oft_blocks(leaves, config, path)
    if config.block_dropout and not self.deterministic:
      rng = module.make_rng("dropout")
      blocks = adapters.drop_blocks(
        blocks, rng, config.block_dropout, geom.d_in // blocks.shape[-1]
      )
    if config.method == "oft":
      rotated = adapters.rotate_input(x, geom, blocks, config.precision)
      return next_fun(rotated, *rest, **kwargs)
    return _weight_centric_call(module, next_fun, geom, blocks, x, rest, kwargs, config.precision)

  def _refuse_packed_params(self, module: nn.Module, path: str) -> None:
    """Raises if the targets select a module that is no linear layer but holds matrices.

    Such a module (e.g. a mixture of experts, its kernels packed as `[experts, out,
    in]` parameters) applies them in its own code, which no interceptor can reach:
    targeting it would silently leave it unadapted. Modules holding only vectors (norm
    scales) are let through, since a broad regex such as `.*` matches them too. A
    regex that names such a parameter (`experts/gate_up_proj`) is remembered for the
    message when no layer matched: targets match layer paths, as PEFT's
    `target_modules` match module names.
    """
    own = module.variables.get("params", {})
    packed = [
      (name, tuple(value.shape)) for name, value in own.items() if getattr(value, "ndim", 0) >= 2
    ]
    if packed and self.config.is_target(path):
      name, shape = packed[0]
      raise ValueError(
        f"targets regex {self.config.targets!r} selects '{path}', a {type(module).__name__} "
        f"whose '{name}' {list(shape)} is a packed {len(shape)}-D parameter, not a "
        "Dense/DenseGeneral/Einsum layer: OFT and LoRA adapt linear layers only (PEFT's OFT "
        "cannot adapt packed expert kernels either); narrow the targets regex to exclude it"
      )
    self.packed.extend(
      f"{path}/{name}" for name, _ in packed if self.config.is_target(f"{path}/{name}")
    )

  def check_matched(self) -> None:
    """Raises if the targets regex matched no layer (a silent no-op adapter otherwise)."""
    if not self.geometries and self.packed:
      raise ValueError(
        f"targets regex {self.config.targets!r} matched no Dense/DenseGeneral/Einsum layer, "
        f"only '{self.packed[0]}', a packed parameter of a layer that is not linear, which "
        "OFT and LoRA cannot adapt (nor can PEFT's OFT); target linear layers instead"
      )
    if not self.geometries:
      seen = sorted(set(self.seen))
      raise ValueError(
        f"targets regex {self.config.targets!r} matched no Dense/DenseGeneral/Einsum layer "
        f"(layer paths: {', '.join(seen[:8]) or 'none'}{' …' if len(seen) > 8 else ''})"
      )


def _weight_centric_call(module, next_fun, geom, blocks, x, rest, kwargs, precision):
  """Original OFT: runs the same layer with `blockdiag(R) @ kernel` as its kernel."""
  if not layer.has_kernel(module):
    return next_fun(x, *rest, **kwargs)  # initialisation: creates kernel (R = I anyway)
  base = layer.float_params(module, geom, exclude=P.ADAPTER_KEYS)
  base["kernel"] = adapters.weight_centric_kernel(base["kernel"], geom, blocks, precision)
  return layer.call_layer(module, base, x, *rest, **kwargs)


def _adapter_leaves(module: nn.Module, path: str, name: str, init_fn) -> dict:
  """The layer's adapter leaves: created by `init_fn` or read back and shape-checked."""
  if not module.has_variable("params", name):
    return module.param(name, init_fn)
  leaves = module.get_variable("params", name)
  expected = jax.eval_shape(init_fn, jax.random.key(0))
  for key, spec in expected.items():
    got = getattr(leaves.get(key), "shape", None)
    if got != spec.shape:
      raise ValueError(
        f"layer '{path}': adapter leaf '{name}/{key}' has shape {got}, expected "
        f"{spec.shape} from the adapter config; load an adapter made with the same config"
      )
  return leaves


@contextlib.contextmanager
def _adapters_active(config: adapters.AdapterConfig, deterministic: bool = True):
  """Opens an `AdapterInterceptor`; on exit, raises if it adapted nothing."""
  interceptor = AdapterInterceptor(config, deterministic)
  with nn.intercept_methods(interceptor):
    yield interceptor
  interceptor.check_matched()


def find_geometries(
  model: nn.Module, config: adapters.AdapterConfig, *args, **kwargs
) -> dict[str, geo.LayerGeometry]:
  """`{path: LayerGeometry}` of every layer `config` adapts in `model` on these inputs.

  Traces the adapted `model.init` once under `jax.eval_shape` (shapes only: nothing
  is computed or allocated) with an interceptor of its own, so nothing is recorded in
  global state.

  Args:
    model: the base Linen module (possibly wrapped, e.g. by `quant.Dequantized`).
    config: the adapter config; its `targets` select the layers.
    *args: example inputs of `model.__call__` (only shapes matter).
    **kwargs: example keyword inputs of `model.__call__`.

  Raises:
    ValueError: as `Adapted` would (no layer matched, a block size that does
      not divide a width, an unsupported layer form), naming the layer and the fix.
  """
  found: dict[str, geo.LayerGeometry] = {}

  def init(rng):
    with _adapters_active(config) as interceptor:
      variables = model.init(rng, *args, **kwargs)
    found.update(interceptor.geometries)
    return variables

  jax.eval_shape(init, jax.random.key(0))
  return found


class Adapted(layer.InterceptingWrapper):
  """Wraps any Linen `model` so that its targeted linear layers carry adapters.

  `call_method(name, *args)` calls another method of `model` (e.g. a decode
  method) with adapters active.

  Attributes:
    model: the base Linen module (never modified); may itself be a wrapper such as
      `quant.Dequantized`.
    config: which adapter, where, and its hyper-parameters.
    deterministic: ignore `config.block_dropout` (the default: evaluation and
      inference). With `False` and a positive rate, applying the module needs a
      `'dropout'` rng (`rngs={'dropout': key}`), as Flax's `nn.Dropout`.
  """

  model: nn.Module
  config: adapters.AdapterConfig
  deterministic: bool = True

  @property
  def wrapped(self) -> nn.Module:
    return self.model

  @nn.nowrap
  def intercepting(self):
    """Context in which `AdapterInterceptor` applies `config`."""
    return _adapters_active(self.config, self.deterministic)
