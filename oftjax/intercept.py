"""Injects adapters into any Flax Linen model through a method interceptor.

`Adapted(model, config)` is a Linen module that shares `model`'s scope, so its
parameter tree is the base tree plus adapter leaves beside each targeted kernel::

    {'layers': {'self_attn': {'q_proj': {'kernel': ..., 'oft': {'weight': ...}}}}}

Its `__call__` opens `nn.intercept_methods` *inside* the traced function (an
interceptor around a jitted call would be invisible to the jit cache). Each targeted
call of a registered linear layer (`oftjax.layer_kinds`: `nn.Dense`,
`nn.DenseGeneral`, `nn.Einsum`, the gemma library's `Einsum`, or a user's entry)
then sees its input rotated (OFTv2), its weight rotated (original OFT), or a low-rank
term added (LoRA). Targets are full-matched against the layer's path and against its
weight key (`<path>/<weight>` for a weight not named `kernel`, so the two einsums
of the gemma library's MLP, which share the path `…/mlp`, can be told apart).
Works under `jax.jit`, `nn.scan` and `nn.remat`. The wrapped model's own method
may be an `nn.jit` one (it is run beneath it); an `nn.jit` method deeper in the
model is refused, since flax's cache of its trace cannot see the adapters.

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

from oftjax import adapters, layer, layer_kinds
from oftjax import geometry as geo
from oftjax import params as P

_UNSUPPORTED_LINEAR = (nn.Conv, nn.ConvTranspose, nn.ConvLocal, nn.Embed)


class AdapterInterceptor:
  """Linen method interceptor that applies `oftjax.adapters.AdapterConfig`.

  Attributes:
    config: the adapter config.
    deterministic: ignore `config.block_dropout` (evaluation); when False and the rate
      is positive, each OFT layer draws its dropout mask from the `'dropout'` rng.
    geometries: `{weight key: LayerGeometry}` of every weight it adapted so far
      (keys as `oftjax.params.weight_key`).
    seen: weight keys of every linear layer it saw (for the "matched nothing" error).
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
    if module.scope is None or layer.replaying():
      return next_fun(*args, **kwargs)
    path = "/".join(str(p) for p in module.scope.path)
    _refuse_nn_jit(module, context.method_name, path)
    if context.method_name != "__call__":
      return _checked_children(module, path, next_fun(*args, **kwargs))
    call = layer_kinds.describe_call(module, path, args, kwargs)
    if call is None:
      if isinstance(module, _UNSUPPORTED_LINEAR) and self.config.is_target(path):
        raise ValueError(
          f"layer '{path}' is an {type(module).__name__}, which adapters do not support; "
          "narrow the targets regex"
        )
      y = next_fun(*args, **kwargs)
      self._refuse_packed_params(module, path)
      return _checked_children(module, path, y)
    key = P.weight_key(path, call.weight)
    self.seen.append(key)
    if not (self.config.is_target(path) or self.config.is_target(key)):
      return next_fun(*args, **kwargs)
    x = call.input_of(args, kwargs)
    geom = call.geometry(x, path)
    self.geometries[key] = geom
    config = self.config
    name = P.adapter_key(config.leaf_name, call.weight)
    if config.method == "lora":
      leaves = _adapter_leaves(
        module, key, name, lambda rng: adapters.init_lora(rng, geom, config, key)
      )
      y = next_fun(*args, **kwargs)
      return y + adapters.lora_delta(x, geom, leaves, config).astype(y.dtype)
    leaves = _adapter_leaves(
      module, key, name, lambda rng: adapters.init_oft(geom.d_in, config, key)
    )
    blocks = adapters.oft_blocks(leaves, config, key)
    if config.block_dropout and not self.deterministic:
      rng = module.make_rng("dropout")
      blocks = adapters.drop_blocks(
        blocks, rng, config.block_dropout, geom.d_in // blocks.shape[-1]
      )
    if config.method == "oft":
      rotated = adapters.rotate_input(x, geom, blocks, config.precision)
      args, kwargs = call.with_input(args, kwargs, rotated)
      return next_fun(*args, **kwargs)
    return _weight_centric_call(module, next_fun, call, geom, blocks, args, kwargs, config)

  def _refuse_packed_params(self, module: nn.Module, path: str) -> None:
    """Raises if the targets select a module that is no linear layer but holds matrices.

    Such a module (e.g. a mixture of experts, its kernels packed as ``[experts, out,
    in]`` parameters, or another library's projection nobody registered) applies them
    in its own code, which no interceptor can reach: targeting it would silently leave
    it unadapted. Modules holding only vectors (norm scales) are let through, since a
    broad regex such as `.*` matches them too. A regex that names such a parameter
    (`experts/gate_up_proj`) is remembered for the message when no layer matched:
    targets match layer paths, as PEFT's `target_modules` match module names.
    """
    own = module.scope.variables().get("params", {})
    packed = [
      (name, tuple(value.shape))
      for name, value in own.items()
      if getattr(value, "ndim", 0) >= 2
      and not P.is_adapter_key(name, value)
      and P.weight_key(path, name) not in self.seen  # a linear layer sharing this scope
    ]
    if packed and self.config.is_target(path):
      name, shape = packed[0]
      raise ValueError(
        f"targets regex {self.config.targets!r} selects '{path}', a {type(module).__name__} "
        f"whose '{name}' {list(shape)} is a packed {len(shape)}-D parameter, not a "
        f"registered linear layer ({', '.join(layer_kinds.registered_names())}): OFT and "
        "LoRA adapt linear layers only (PEFT's OFT cannot adapt packed expert kernels "
        "either); narrow the targets regex to exclude it, or describe the module with "
        "oftjax.layer_kinds.register_layer if it is a linear layer"
      )
    self.packed.extend(
      f"{path}/{name}" for name, _ in packed if self.config.is_target(f"{path}/{name}")
    )

  def check_matched(self) -> None:
    """Raises if the targets regex matched no layer (a silent no-op adapter otherwise)."""
    if not self.geometries and self.packed:
      raise ValueError(
        f"targets regex {self.config.targets!r} matched no linear layer, only "
        f"'{self.packed[0]}', a packed parameter of a layer that is not linear, which "
        "OFT and LoRA cannot adapt (nor can PEFT's OFT); target linear layers instead"
      )
    if not self.geometries:
      seen = sorted(set(self.seen))
      raise ValueError(
        f"targets regex {self.config.targets!r} matched no linear layer "
        f"(layer paths: {', '.join(seen[:8]) or 'none'}{' …' if len(seen) > 8 else ''}; "
        f"registered kinds: {', '.join(layer_kinds.registered_names())})"
      )


def _refuse_nn_jit(module: nn.Module, method_name: str, path: str) -> None:
  """Raises for a method wrapped in `nn.jit` traced under the adapters.

  flax caches an `nn.jit` trace by module and inputs, blind to interceptors: a later
  call with the same shapes would reuse it and run without (or with stale) adapters.
  The wrapped model's own method is run beneath its `nn.jit` instead
  (`oftjax.layer.call_through`); one deeper in the model cannot be.
  """
  if layer.runs_beneath_jit(module, method_name):
    return
  if layer.beneath_nn_jit(getattr(type(module), method_name, None)) is not None:
    raise ValueError(_nn_jit_message(module, path, method_name))


def _checked_children(module: nn.Module, path: str, result):
  """`result`, after refusing a submodule of `module` with an `nn.jit` method.

  A cached `nn.jit` trace runs without calling the interceptor at all, so it is found
  from its parent: after the parent's call every submodule it built is known.
  """
  if isinstance(module, layer.InterceptingWrapper):
    return result  # its wrapped model runs beneath its nn.jit (layer.call_through)
  for name, child in getattr(module._state, "children", {}).items():
    if isinstance(child, nn.Module) and child is not module:
      jitted = layer.jitted_methods(child)
      if jitted:
        raise ValueError(_nn_jit_message(child, f"{path}/{name}".lstrip("/"), jitted[0]))
  return result


def _nn_jit_message(module: nn.Module, path: str, method_name: str) -> str:
  return (
    f"module '{path or '(root)'}' ({type(module).__name__}) has its '{method_name}' "
    "wrapped in nn.jit, whose trace cache cannot see the adapters (a later call could run "
    "without them); wrap that module itself with oftjax.Adapted, or call it without nn.jit"
  )


def _weight_centric_call(module, next_fun, call, geom, blocks, args, kwargs, config):
  """Original OFT: runs the same layer with `blockdiag(R) @ kernel` as its kernel."""
  if not layer.has_kernel(module, geom.weight):
    return next_fun(*args, **kwargs)  # initialisation: creates the weight (R = I anyway)
  own = module.scope.variables()["params"]
  base = layer.float_params(module, geom, exclude=lambda name: P.is_adapter_key(name, own[name]))
  base[geom.weight] = adapters.weight_centric_kernel(
    base[geom.weight], geom, blocks, config.precision
  )
  return layer.call_layer(module, base, *args, **kwargs)


def _adapter_leaves(module: nn.Module, key: str, name: str, init_fn) -> dict:
  """The layer's adapter leaves `name`: created by `init_fn` or read back and checked.

  Created through the module's scope rather than `Module.param`, which a library may
  replace (the gemma library's requires a `shape`), and beside the weight even when
  the layer shares its parent's scope.
  """
  scope = module.scope
  if not scope.has_variable("params", name):
    return scope.param(name, init_fn)
  leaves = scope.get_variable("params", name)
  expected = jax.eval_shape(init_fn, jax.random.key(0))
  for leaf, spec in expected.items():
    got = getattr(leaves.get(leaf), "shape", None)
    if got != spec.shape:
      raise ValueError(
        f"layer '{key}': adapter leaf '{name}/{leaf}' has shape {got}, expected "
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


def _call_method(module: nn.Module, *args, **kwargs):
  return layer.call_through(module, "__call__", *args, **kwargs)


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
      variables = model.init(rng, *args, method=_call_method, **kwargs)
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
