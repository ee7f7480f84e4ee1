"""Where the text decoder's modules sit in the PyTorch model a Hugging Face config builds.

Plain data, so that code outside `models/` (PEFT adapter import/export) can name modules
the way transformers does, without `models/` importing any adapter code.
"""

from __future__ import annotations

from oftjax.models.gemma import gemma4_config, gemma4_names, hf_names
from oftjax.models.gemma.config import from_hf_config, text_config_of
from oftjax.models.gemma.gemma4_schedule import layer_schedule


def _stacks(cfg) -> dict[str, list[int]]:
  """`{our stacked path: the PyTorch layer number of each index of its stacked axis}`."""
  if isinstance(cfg, gemma4_config.Gemma4Config):  # layers/segment_s/slot_j, scanned by repeat
    return {
      f"layers/segment_{s}/slot_{j}": [segment.layer(r, j) for r in range(segment.repeats)]
      for s, segment in enumerate(layer_schedule(cfg))
      for j in range(len(segment.kinds))
    }
  return {"layers": list(range(cfg.num_layers))}


def _linear_layers(cfg) -> list[str]:
  """Our paths of every linear layer (a `kernel`: PyTorch `nn.Linear`), sorted."""
  specs = (
    gemma4_names.tensor_specs(cfg)
    if isinstance(cfg, gemma4_config.Gemma4Config)
    else hf_names.tensor_specs(cfg)
  )
  return sorted({"/".join(s.path[:-1]) for s in specs if s.path[-1] == "kernel"})


def module_layout(hf_config) -> dict:
  """The PyTorch module layout of the model built from a folder's top-level config.

  A config with a separate text config (multimodal Gemma 3, Gemma 4: the decoder is
  `model.language_model` of a `...ForConditionalGeneration`) puts the decoder under
  `model.language_model.`; a text-only config under `model.`. The decoder's layers are
  its `layers` `ModuleList`: Gemma 1-3 stack them all on one axis (`layers`, index
  `i` is layer `i`); Gemma 4 on one axis per segment slot
  (`layers/segment_{s}/slot_{j}`, index `r` is layer `segment.layer(r, j)`). An
  untied output projection is `lm_head` in both (a tied one is the embedding: our tree
  has no `lm_head` layer to adapt).

  Args:
    hf_config: the folder's top-level transformers config (`read_hf_config(folder)`),
      multimodal or text-only.

  Returns:
    `{"decoder_prefix", "module_list", "stacks", "linear_layers", "outside"}` (the fields
    of `oftjax.peft_io.ModuleNaming`): `stacks` maps each stacked path of ours to the
    PyTorch layer numbers of its stacked axis, `linear_layers` lists our path of every
    linear layer (the modules PEFT can wrap: a Gemma 4 layer that reuses another's keys
    and values has no `k_proj`/`v_proj`, a full layer with `attention_k_eq_v` no
    `v_proj`, and MoE experts are packed parameters, not linear layers).

  Raises:
    ValueError: a `model_type` that is not a supported Gemma.
  """
  text = text_config_of(hf_config)
  cfg = from_hf_config(hf_config)
  return {
    "decoder_prefix": "model." if text is hf_config else "model.language_model.",
    "module_list": "layers",
    "stacks": _stacks(cfg),
    "linear_layers": _linear_layers(cfg),
    "outside": () if cfg.tie_word_embeddings else (("lm_head", "lm_head"),),
  }
