"""Where the text decoder's modules sit in the PyTorch model a Hugging Face config builds.

Plain data, so that code outside ``models/`` (PEFT adapter import/export) can name modules
the way transformers does, without ``models/`` importing any adapter code.
"""

from __future__ import annotations

from oftjax.models.gemma.config import text_config_of


def module_layout(hf_config) -> dict:
  """The PyTorch module layout of the model built from a folder's top-level config.

  A config with a separate text config (multimodal Gemma 3, Gemma 4: the decoder is
  ``model.language_model`` of a ``...ForConditionalGeneration``) puts the decoder under
  ``model.language_model.``; a text-only config under ``model.``. Our stacked ``layers``
  are the decoder's ``layers`` ``ModuleList``; an untied output projection is ``lm_head``
  in both (a tied one is the embedding: our tree has no ``lm_head`` layer to adapt).

  Args:
    hf_config: the folder's top-level transformers config (``read_hf_config(folder)``),
      multimodal or text-only.

  Returns:
    ``{"decoder_prefix", "stack", "num_layers", "outside"}`` (the fields of
    ``oftjax.peft_io.ModuleNaming``).

  Raises:
    ValueError: a ``model_type`` that is not a supported Gemma.
  """
  text = text_config_of(hf_config)
  return {
      "decoder_prefix": "model." if text is hf_config else "model.language_model.",
      "stack": "layers",
      "num_layers": int(text.num_hidden_layers),
      "outside": () if getattr(text, "tie_word_embeddings", True) else (("lm_head", "lm_head"),),
  }
