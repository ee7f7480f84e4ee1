"""Which Linen module classes are linear layers, and how each one is called: a registry.

An entry says, for one module class, how a call of it contracts its input with its
weight: a function `describe(module, args, kwargs) -> LayerCall` that names the
argument holding the input, the weight's parameter name and shape, and the contraction
as an einsum equation `'x,w->y'` (`...` allowed on the input and the output). The
adapters need nothing else: OFT rotates the contracted input axes, LoRA adds its term in
the output's own axis order, folding writes into the weight under its own name.

Built in: `nn.Dense`, `nn.DenseGeneral`, `nn.Einsum` (weight `kernel`) and the
google-deepmind/gemma library's `Einsum`, called as `layer(eqn, x)` with its weight
named by its `weight_name` (`w`, or `gating_einsum` / `linear` for the two MLP
einsums that share their parent's scope). That entry is keyed by the class's qualified
name, so the library is never imported here. Another library's layer is one
`register_layer` call away::

    oftjax.layer_kinds.register_layer(
        MyProjection,
        lambda m, args, kwargs: LayerCall("btd,dh->bth", "w", m.shape, input=0),
    )

References:
  flax `nn.Dense` / `nn.DenseGeneral` / `nn.Einsum`; google-deepmind/gemma
  `gm/nn/_layers.py` (`Einsum`) and `gm/nn/_modules.py` (its call sites).
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import string

import flax.linen as nn
import jax

from oftjax import geometry as geo

PLAIN_WEIGHT = geo.PLAIN_WEIGHT


@dataclasses.dataclass(frozen=True)
class LayerCall:
  """One call of a linear layer, as the adapters see it.

  Attributes:
    equation: the contraction as an einsum `'x,w->y'` over the input and the weight;
      `...` may stand for leading axes of the input and the output (not the weight).
    weight: name of the weight parameter (`'kernel'` for flax's layers).
    weight_shape: shape of the weight (known before it is created, for init).
    input: where the input is in the call: a position in `args` or a keyword name.
  """

  equation: str
  weight: str
  weight_shape: tuple[int, ...]
  input: int | str = 0

  def input_of(self, args: tuple, kwargs: dict) -> jax.Array:
    """The call's input array."""
    if isinstance(self.input, str):
      return kwargs[self.input]
    return args[self.input]

  def with_input(self, args: tuple, kwargs: dict, x: jax.Array) -> tuple[tuple, dict]:
    """`(args, kwargs)` of the same call with `x` as its input."""
    if isinstance(self.input, str):
      return args, {**kwargs, self.input: x}
    return args[: self.input] + (x,) + args[self.input + 1 :], kwargs

  def geometry(self, x: jax.Array, path: str) -> geo.LayerGeometry:
    """The call's `oftjax.geometry.LayerGeometry` on input `x`."""
    return geo.geometry_of_equation(
      self.equation, tuple(self.weight_shape), x.ndim, self.weight, path
    )


Describe = Callable[[nn.Module, tuple, dict], LayerCall]

_KINDS: dict[type | str, Describe] = {}


def register_layer(layer_class: type | str, describe: Describe) -> None:
  """Makes a Linen module class a linear layer that adapters can target.

  Args:
    layer_class: the module class (its subclasses are covered too), or its qualified
      name `'package.module.Class'` to register a library's class without importing it.
    describe: `describe(module, args, kwargs) -> LayerCall` for one call of a bound
      module (`args`/`kwargs` as passed to its `__call__`). It may raise
      `ValueError` for a call form the adapters cannot take; the message is prefixed
      with the layer's path.
  """
  _KINDS[layer_class] = describe


def kind_of(module: nn.Module) -> Describe | None:
  """The `describe` function registered for `module`'s class (or a base), else `None`."""
  for cls in type(module).__mro__:
    describe = _KINDS.get(cls) or _KINDS.get(f"{cls.__module__}.{cls.__qualname__}")
    if describe is not None:
      return describe
  return None


def describe_call(module: nn.Module, path: str, args: tuple, kwargs: dict) -> LayerCall | None:
  """How this call of `module` contracts its input, or `None` for no registered layer.

  Raises:
    ValueError: the layer's entry refuses the call form, prefixed with `path`.
  """
  describe = kind_of(module)
  if describe is None:
    return None
  try:
    return describe(module, args, kwargs)
  except ValueError as e:
    raise ValueError(f"layer '{path}': {e}") from None


def registered_names() -> list[str]:
  """Names of the registered layer classes, for error messages."""
  return [
    k
    if isinstance(k, str)
    else f"nn.{k.__name__}"
    if k.__module__.startswith("flax.")
    else f"{k.__module__}.{k.__qualname__}"
    for k in _KINDS
  ]


# ------------------------------------------------------------------- built-in entries


def _input_slot(args: tuple, name: str) -> int | str:
  return 0 if args else name


def _dense(module: nn.Dense, args: tuple, kwargs: dict) -> LayerCall:
  slot = _input_slot(args, "inputs")
  x = args[0] if args else kwargs["inputs"]
  return LayerCall("...i,io->...o", PLAIN_WEIGHT, (x.shape[-1], module.features), slot)


def _dense_general(module: nn.DenseGeneral, args: tuple, kwargs: dict) -> LayerCall:
  if module.batch_dims:
    raise ValueError(
      f"DenseGeneral with batch_dims={module.batch_dims} is not supported by adapters; "
      "exclude it from the targets regex"
    )
  slot = _input_slot(args, "inputs")
  x = args[0] if args else kwargs["inputs"]
  axes = (module.axis,) if isinstance(module.axis, int) else tuple(module.axis)
  axes = tuple(a % x.ndim for a in axes)
  features = (module.features,) if isinstance(module.features, int) else tuple(module.features)
  letters = string.ascii_letters
  xs = letters[: x.ndim]
  fs = letters[x.ndim : x.ndim + len(features)]
  ws = "".join(xs[a] for a in axes) + fs
  out = "".join(c for i, c in enumerate(xs) if i not in axes) + fs
  shape = tuple(x.shape[a] for a in axes) + features
  return LayerCall(f"{xs},{ws}->{out}", PLAIN_WEIGHT, shape, slot)


def _flax_einsum(module: nn.Einsum, args: tuple, kwargs: dict) -> LayerCall:
  equation = kwargs.get("einsum_str") or (args[1] if len(args) > 1 else None) or module.einsum_str
  return LayerCall(equation, PLAIN_WEIGHT, tuple(module.shape), _input_slot(args, "inputs"))


def describe_gemma_einsum(module: nn.Module, args: tuple, kwargs: dict) -> LayerCall:
  """google-deepmind/gemma's `Einsum`: `layer(eqn, x)`, weight `module.weight_name`.

  Public so that a copy of that layer elsewhere registers with the same description.
  """
  equation = args[0] if args else kwargs["eqn"]
  slot = 1 if len(args) > 1 else "x"
  return LayerCall(equation, module.weight_name, tuple(module.shape), slot)


register_layer(nn.Dense, _dense)
register_layer(nn.DenseGeneral, _dense_general)
register_layer(nn.Einsum, _flax_einsum)
register_layer("gemma.gm.nn._layers.Einsum", describe_gemma_einsum)
