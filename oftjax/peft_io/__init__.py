"""Adapters in and out of Hugging Face PEFT's format (`adapter_config.json` + safetensors).

OFT leaves are stored as PEFT's `oft_R.weight` (`[r, b(b-1)/2]`, same packing); LoRA as
`lora_A.weight = aᵀ`, `lora_B.weight = bᵀ`. Tensor names follow the base model's module
layout (`ModuleNaming`, filled from the model family, e.g.
`oftjax.models.gemma.module_layout`): `base_model.model.model.layers.N.…` on a text-only
base, `base_model.model.model.language_model.layers.N.…` on a multimodal one, and
`base_model.model.lm_head` for an untied output projection.

Conventions that differ (docs/DESIGN.md §1): PEFT's exact Cayley is `cayley(-Q)`, so the
vector is negated in that mode; PEFT's Neumann series with `n` terms equals ours for
`n >= 4` and its `n = 3` equals its `n = 4`; our `n = 2, 3` have no PEFT twin.

Example:
  >>> naming = peft_io.ModuleNaming.from_layout(gemma.module_layout(hf_config))
  >>> peft_io.export_peft("out/peft_adapter", adapter, config, naming=naming)
  >>> adapter, config = peft_io.import_peft("out/peft_adapter", naming=naming)
"""

from oftjax.peft_io.fields import PEFT_VERSION
from oftjax.peft_io.naming import ModuleNaming
from oftjax.peft_io.oft_to_lora import lora_from_oft
from oftjax.peft_io.reading import import_peft
from oftjax.peft_io.writing import export_peft, unexportable_reason

__all__ = [
  "PEFT_VERSION",
  "ModuleNaming",
  "export_peft",
  "import_peft",
  "lora_from_oft",
  "unexportable_reason",
]
