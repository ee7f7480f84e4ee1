"""Gemma 1/2/3/4 text decoders in Flax Linen, with Hugging Face checkpoints in and out.

Example:
  >>> from oftjax.models import gemma
  >>> model, params = gemma.load("path/to/gemma-3-270m")
  >>> logits = model.apply({"params": params}, tokens)   # [batch, time, vocab], fp32
  >>> gemma.save("out/", model, params)
"""

from oftjax.models.gemma.config import GemmaConfig, RopeConfig, text_config_of
from oftjax.models.gemma.config import from_hf_config as config_from_hf
from oftjax.models.gemma.gemma4_config import Gemma4Config
from oftjax.models.gemma.gemma4_model import Gemma4
from oftjax.models.gemma.generate import generate, init_cache
from oftjax.models.gemma.loading import load, load_model, read_hf_config
from oftjax.models.gemma.loading import model_from_hf_config as from_hf_config
from oftjax.models.gemma.model import Gemma, default_positions, init_params
from oftjax.models.gemma.module_layout import module_layout
from oftjax.models.gemma.saving import save

__all__ = [
  "Gemma",
  "Gemma4",
  "Gemma4Config",
  "GemmaConfig",
  "RopeConfig",
  "config_from_hf",
  "default_positions",
  "from_hf_config",
  "generate",
  "init_cache",
  "init_params",
  "load",
  "load_model",
  "module_layout",
  "read_hf_config",
  "save",
  "text_config_of",
]
