"""Where oftjax layer paths live among a Hugging Face model's PyTorch module names.

A layer path of ours (`layers/self_attn/q_proj` with a leading stacked axis, `lm_head`)
is one PyTorch module per index of that axis (`model.layers.3.self_attn.q_proj`,
`lm_head`). How the two correspond depends on the model the adapter is for, not on PEFT:
a text-only Gemma decoder sits at `model.`, the same decoder inside a multimodal model
(Gemma 3 4b+, Gemma 4) at `model.language_model.`, and the output projection at
`lm_head` in both. The decoder's PyTorch layers form one `ModuleList` (`layers`),
which our tree may stack on one axis (Gemma 1-3: index `i` is layer `i`) or on several
(Gemma 4: `layers/segment_{s}/slot_{j}`, each holding every few layers). A model family
describes all this as plain data (e.g. `oftjax.models.gemma.module_layout`) and
`ModuleNaming` reads it.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class ModuleNaming:
  """How one model's PyTorch modules are named, seen from our parameter tree.

  Attributes:
    decoder_prefix: module path of the decoder whose children are our tree's top-level
      entries, with its trailing dot: `"model."` (text-only) or
      `"model.language_model."` (the decoder of a multimodal model).
    module_list: the decoder's `ModuleList` of layers (`"layers"`).
    stacks: `((our stacked path, PyTorch layer numbers), ...)`: index `i` of the
      stacked axis of every layer under that path is PyTorch layer `numbers[i]`. `None`
      when unknown: then the only stack is `module_list` itself, index `i` is layer
      `i`, its depth is unknown, and import needs every layer to be in the adapter.
    linear_layers: our path of every linear layer the model has (the modules PEFT can
      wrap), or `None` when unknown (then no module is refused for not existing).
    outside: `(our top-level path, PyTorch module name)` pairs for modules that live
      outside the decoder (`(("lm_head", "lm_head"),)`).
  """

  decoder_prefix: str = "model."
  module_list: str = "layers"
  stacks: tuple[tuple[str, tuple[int, ...]], ...] | None = None
  linear_layers: tuple[str, ...] | None = None
  outside: tuple[tuple[str, str], ...] = (("lm_head", "lm_head"),)

  def __post_init__(self):
    if self.decoder_prefix and not self.decoder_prefix.endswith("."):
      raise ValueError(f"decoder_prefix {self.decoder_prefix!r} must end with '.'")
    object.__setattr__(self, "outside", tuple(tuple(p) for p in dict(self.outside).items()))
    if self.stacks is not None:
      items = self.stacks.items() if isinstance(self.stacks, Mapping) else self.stacks
      stacks = tuple((str(path), tuple(int(n) for n in numbers)) for path, numbers in items)
      numbers = [n for _, ns in stacks for n in ns]
      if len(set(numbers)) != len(numbers):
        raise ValueError("stacks map some PyTorch layer number to two stacked indices")
      object.__setattr__(self, "stacks", stacks)
    if self.linear_layers is not None:
      object.__setattr__(self, "linear_layers", tuple(sorted(set(self.linear_layers))))

  @classmethod
  def from_layout(cls, layout: Mapping) -> ModuleNaming:
    """Builds the naming from a model family's plain-data layout (same keys as the fields).

    Raises:
      ValueError: the layout holds a key that is not a field.
    """
    unknown = sorted(set(layout) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ValueError(f"module layout has unknown keys {unknown}")
    layout = dict(layout)
    if isinstance(layout.get("outside"), Mapping):
      layout["outside"] = tuple(layout["outside"].items())
    return cls(**layout)

  @property
  def num_layers(self) -> int | None:
    """The decoder's layer count, or `None` when `stacks` is unknown."""
    return None if self.stacks is None else sum(len(ns) for _, ns in self.stacks)

  def stack_size(self, path: str) -> int | None:
    """Length of the stacked axis of layer `path` (`None`: unknown).

    Raises:
      ValueError: `path` is not under a stacked path.
    """
    stack, _ = self._split(path)
    return None if self.stacks is None else len(dict(self.stacks)[stack])

  def _split(self, path: str) -> tuple[str, str]:
    """`(stacked path, rest)` of a layer under a stack (the longest stacked prefix)."""
    stacks = [self.module_list] if self.stacks is None else [s for s, _ in self.stacks]
    for stack in sorted(stacks, key=len, reverse=True):
      if path.startswith(stack + "/") and len(path) > len(stack) + 1:
        return stack, path[len(stack) + 1 :]
    raise ValueError(
      f"layer '{path}' has a stacked axis but is under none of the stacked "
      f"paths {', '.join(repr(s) for s in stacks)}"
    )

  def _is_stacked(self, path: str) -> bool:
    try:
      self._split(path)
    except ValueError:
      return False
    return True

  def _check_exists(self, path: str, module: str) -> None:
    """Raises unless `path` is one of the model's linear layers (when those are known)."""
    if self.linear_layers is None or path in self.linear_layers:
      return
    if self._is_stacked(path):
      stack = self._split(path)[0]
      have = sorted(p[len(stack) + 1 :] for p in self.linear_layers if p.startswith(stack + "/"))
      raise ValueError(
        f"module '{module}' is not a linear layer of this model (the layer has "
        f"only {', '.join(have) or 'none'}); the adapter was made on another "
        "base or another version of it"
      )
    raise ValueError(
      f"module '{module}' is not a linear layer of this model's text decoder; "
      "the adapter was made on another base or another version of it"
    )

  def module_name(self, path: str, layer: int | None) -> str:
    """The PyTorch module name of index `layer` (`None`: not stacked) of `path`.

    Raises:
      ValueError: `path` is not a linear layer of the model, is stacked without an index
        (or the reverse), or `layer` is past the end of its stacked axis.
    """
    parts = path.split("/")
    outside = dict(self.outside)
    if layer is None and self._is_stacked(path) and parts[0] not in outside:
      raise ValueError(f"layer '{path}' sits under a stacked path but has no stacked axis")
    if layer is None and parts[0] in outside:
      name = ".".join([outside[parts[0]]] + parts[1:])
    elif layer is None:
      name = self.decoder_prefix + ".".join(parts)
    else:
      stack, rest = self._split(path)
      number = layer
      if self.stacks is not None:
        numbers = dict(self.stacks)[stack]
        if not 0 <= layer < len(numbers):
          raise ValueError(
            f"layer '{path}' has no index {layer}: its stacked axis holds {len(numbers)} layers"
          )
        number = numbers[layer]
      name = self.decoder_prefix + ".".join([self.module_list, str(number)] + rest.split("/"))
    self._check_exists(path, name)
    return name

  def path_of(self, module: str) -> tuple[str, int | None]:
    """`(our layer path, index on its stacked axis or None)` of a PyTorch module name.

    Raises:
      ValueError: the module is not part of the decoder or the outside modules (e.g. a
        vision tower), names a layer the model does not have, or is not one of the
        model's linear layers.
    """
    for ours, theirs in self.outside:
      if module == theirs or module.startswith(theirs + "."):
        path = ours + module[len(theirs) :].replace(".", "/")
        self._check_exists(path, module)
        return path, None
    if module.startswith(self.decoder_prefix):
      rest = module[len(self.decoder_prefix) :]
      stacked = re.fullmatch(re.escape(self.module_list) + r"\.(\d+)\.(.+)", rest)
      if stacked:
        number, tail = int(stacked.group(1)), stacked.group(2).replace(".", "/")
        path, index = self._locate(number, module)
        path = f"{path}/{tail}"
        self._check_exists(path, module)
        return path, index
      if not any(part.isdigit() for part in rest.split(".")):
        path = rest.replace(".", "/")
        self._check_exists(path, module)
        return path, None
    where = [f"'{self.decoder_prefix}{self.module_list}.N.…'"] + [f"'{t}'" for _, t in self.outside]
    raise ValueError(
      f"module '{module}' is not an adaptable layer of this model's text "
      f"decoder (those are {' or '.join(where)}); the adapter adapts a "
      "vision/audio tower or a tied lm_head, or was made on another base"
    )

  def _locate(self, number: int, module: str) -> tuple[str, int]:
    """`(stacked path, index)` of PyTorch layer `number`."""
    if self.stacks is None:
      return self.module_list, number
    for stack, numbers in self.stacks:
      if number in numbers:
        return stack, numbers.index(number)
    raise ValueError(
      f"module '{module}' is in layer {number} but the model has "
      f"{self.num_layers} layers; use an adapter made for this model"
    )

  def target_pattern(self, paths) -> str:
    r"""A regex that PEFT `fullmatch`-es against exactly the modules of `paths`.

    A stacked path's modules are those of its layer numbers (every number, `\d+`, when
    the paths cover all layers); nothing outside the decoder and the listed outside
    modules can match (no vision or audio tower module is ever wrapped).
    """
    outside = dict(self.outside)
    alternatives, numbers_of = [], {}
    for path in sorted(set(paths)):
      parts = path.split("/")
      if parts[0] in outside:
        alternatives.append(re.escape(self.module_name(path, None)))
      elif self._is_stacked(path):
        stack, rest = self._split(path)
        numbers = None if self.stacks is None else dict(self.stacks)[stack]
        have = numbers_of.setdefault(rest, set())
        numbers_of[rest] = None if have is None or numbers is None else have | set(numbers)
      else:
        alternatives.append(re.escape(self.module_name(path, None)))
    every = None if self.stacks is None else {n for _, ns in self.stacks for n in ns}
    for rest, numbers in sorted(numbers_of.items()):
      layer = (
        r"\d+"
        if numbers is None or numbers == every
        else "(?:" + "|".join(str(n) for n in sorted(numbers)) + ")"
      )
      alternatives.append(
        re.escape(f"{self.decoder_prefix}{self.module_list}.")
        + layer
        + re.escape("." + rest.replace("/", "."))
      )
    return "(?:" + "|".join(sorted(alternatives)) + ")"
