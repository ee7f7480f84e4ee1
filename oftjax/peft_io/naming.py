"""Where oftjax layer paths live among a Hugging Face model's PyTorch module names.

A layer path of ours (``layers/self_attn/q_proj`` with a leading layer axis, ``lm_head``) is
one PyTorch module per layer (``model.layers.3.self_attn.q_proj``, ``lm_head``). How the
two correspond depends on the model the adapter is for, not on PEFT: a text-only Gemma
decoder sits at ``model.``, the same decoder inside a multimodal model (Gemma 3 4b+,
Gemma 4) at ``model.language_model.``, and the output projection at ``lm_head`` in both.
A model family describes its layout as plain data (e.g.
``oftjax.models.gemma.module_layout``) and :class:`ModuleNaming` reads it.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping


@dataclasses.dataclass(frozen=True)
class ModuleNaming:
  """How one model's PyTorch modules are named, seen from our parameter tree.

  Attributes:
    decoder_prefix: module path of the decoder whose children are our tree's top-level
      entries, with its trailing dot: ``"model."`` (text-only) or
      ``"model.language_model."`` (the decoder of a multimodal model).
    stack: the stacked-layer collection: the name of our tree's node with a leading layer
      axis and of the PyTorch ``ModuleList`` (``"layers"``).
    num_layers: the number of layers in the stack, or ``None`` when unknown (import then
      needs every layer to be present in the adapter).
    outside: ``(our top-level path, PyTorch module name)`` pairs for modules that live
      outside the decoder (``(("lm_head", "lm_head"),)``).
  """

  decoder_prefix: str = "model."
  stack: str = "layers"
  num_layers: int | None = None
  outside: tuple[tuple[str, str], ...] = (("lm_head", "lm_head"),)

  def __post_init__(self):
    if self.decoder_prefix and not self.decoder_prefix.endswith("."):
      raise ValueError(f"decoder_prefix {self.decoder_prefix!r} must end with '.'")
    object.__setattr__(self, "outside", tuple(tuple(p) for p in dict(self.outside).items()))

  @classmethod
  def from_layout(cls, layout: Mapping) -> "ModuleNaming":
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

  def module_name(self, path: str, layer: int | None) -> str:
    """The PyTorch module name of layer ``layer`` (``None``: not stacked) of ``path``."""
    parts = path.split("/")
    outside = dict(self.outside)
    if layer is None and parts[0] in outside:
      return ".".join([outside[parts[0]]] + parts[1:])
    if layer is None:
      return self.decoder_prefix + ".".join(parts)
    if parts[0] != self.stack or len(parts) < 2:
      raise ValueError(f"layer '{path}' has a stacked axis but is not under '{self.stack}/'")
    return self.decoder_prefix + ".".join([self.stack, str(layer)] + parts[1:])

  def path_of(self, module: str) -> tuple[str, int | None]:
    """``(our layer path, layer index or None)`` of a PyTorch module name.

    Raises:
      ValueError: the module is not part of the decoder or the outside modules (e.g. a
        vision tower), or names a layer collection other than ``stack``.
    """
    for ours, theirs in self.outside:
      if module == theirs or module.startswith(theirs + "."):
        return ours + module[len(theirs):].replace(".", "/"), None
    if module.startswith(self.decoder_prefix):
      rest = module[len(self.decoder_prefix):]
      stacked = re.fullmatch(re.escape(self.stack) + r"\.(\d+)\.(.+)", rest)
      if stacked:
        return f"{self.stack}/" + stacked.group(2).replace(".", "/"), int(stacked.group(1))
      if not any(part.isdigit() for part in rest.split(".")):
        return rest.replace(".", "/"), None
    where = [f"'{self.decoder_prefix}{self.stack}.N.…'"] + [f"'{t}'" for _, t in self.outside]
    raise ValueError(f"module '{module}' is not an adaptable layer of this model's text "
                     f"decoder (those are {' or '.join(where)}); the adapter adapts a "
                     "vision/audio tower or a tied lm_head, or was made on another base")

  def target_pattern(self, paths) -> str:
    """A regex that PEFT ``fullmatch``-es against exactly the modules of ``paths``.

    Stacked paths match every layer index; nothing outside the decoder and the listed
    outside modules can match (no vision or audio tower module is ever wrapped).
    """
    outside = dict(self.outside)
    alternatives = []
    for path in sorted(set(paths)):
      parts = path.split("/")
      if parts[0] == self.stack and len(parts) > 1:
        alternatives.append(re.escape(f"{self.decoder_prefix}{self.stack}.") + r"\d+"
                            + re.escape("." + ".".join(parts[1:])))
      elif parts[0] in outside:
        alternatives.append(re.escape(self.module_name(path, None)))
      else:
        alternatives.append(re.escape(self.decoder_prefix + ".".join(parts)))
    return "(?:" + "|".join(alternatives) + ")"
