"""Tiny random multimodal Gemma 3 models (`Gemma3ForConditionalGeneration`), built locally.

A real transformers multimodal model with a tiny SigLIP vision tower, so the folder has the
layout gemma-3-4b/12b/27b ship with (text decoder under `model.language_model.`, the tower
under `model.vision_tower.`, `multi_modal_projector`) and loads back in transformers.
"""

from __future__ import annotations

import gemma_helpers as H
import torch
import transformers

_VISION = dict(
  hidden_size=16,
  intermediate_size=32,
  num_hidden_layers=1,
  num_attention_heads=2,
  image_size=16,
  patch_size=4,
)


def multimodal_config(
  text_config: transformers.Gemma3TextConfig, tie_word_embeddings: bool | None = None
) -> transformers.Gemma3Config:
  """A `Gemma3Config` around `text_config` with a tiny SigLIP tower (4 image tokens).

  transformers' `Gemma3ForConditionalGeneration` applies no final logit soft-cap, so the
  text config must not set one for the two worlds to agree.
  """
  text = text_config.to_dict()
  if text.get("final_logit_softcapping") is not None:
    raise ValueError(
      "Gemma3ForConditionalGeneration ignores final_logit_softcapping; "
      "build the text config without it"
    )
  tie = (
    text.get("tie_word_embeddings", True) if tie_word_embeddings is None else tie_word_embeddings
  )
  text["tie_word_embeddings"] = tie
  return transformers.Gemma3Config(
    text_config=text,
    vision_config=transformers.SiglipVisionConfig(**_VISION).to_dict(),
    mm_tokens_per_image=4,
    tie_word_embeddings=tie,
  )


def make_multimodal_model(text_config, seed: int = 0, tie_word_embeddings: bool | None = None):
  """A random fp32 eager `Gemma3ForConditionalGeneration` (every weight random)."""
  torch.manual_seed(seed)
  config = multimodal_config(text_config, tie_word_embeddings)
  config._attn_implementation = "eager"
  model = transformers.Gemma3ForConditionalGeneration(config).eval()
  H.randomize_(model, seed)
  if config.tie_word_embeddings:
    model.tie_weights()
  return model


def save_multimodal_model(
  text_config, folder, seed: int = 0, tie_word_embeddings: bool | None = None
):
  """Builds and `save_pretrained`s a random multimodal model; returns the torch model."""
  model = make_multimodal_model(text_config, seed, tie_word_embeddings)
  model.save_pretrained(folder)
  return model
