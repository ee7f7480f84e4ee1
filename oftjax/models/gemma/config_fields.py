"""The fields every Gemma decoder config carries besides its architecture.

`GemmaConfig` (Gemma 1-3) and `Gemma4Config` both extend `CheckpointFields`: the dtypes and
remat the module runs with, and what `save` needs to write the folder back (the Hugging
Face configs and the source folder, which ride along outside hashing and comparison so a
model built from the config can be a static argument of `jax.jit`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

_UNHASHED = dict(default=None, compare=False, hash=False, repr=False)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointFields:
  """Fields shared by the Gemma decoder configs (keyword-only).

  Attributes:
    tie_word_embeddings: whether the output projection is the transposed embedding.
    pad_token_id: padding token id (used by `generate` after EOS).
    multimodal: the checkpoint is a `...ForConditionalGeneration` folder (model_type
      gemma3 or gemma4): this config is its text decoder; the other towers are kept
      only for saving.
    dtype: compute dtype.
    param_dtype: parameter storage dtype.
    remat: rematerialise each decoder layer in the backward pass.
    hf_config: the Hugging Face text config this was built from; not hashed or compared.
    hf_multimodal_config: the whole config of a multimodal folder, else None.
    source_dir: the folder the checkpoint came from, if any; not hashed or compared.
  """

  tie_word_embeddings: bool = True
  pad_token_id: int = 0
  multimodal: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False
  hf_config: Any = dataclasses.field(**_UNHASHED)
  hf_multimodal_config: Any = dataclasses.field(**_UNHASHED)
  source_dir: str | None = dataclasses.field(**_UNHASHED)

  def replace(self, **changes):
    """Returns a copy with some fields changed (e.g. `remat=True`)."""
    return dataclasses.replace(self, **changes)
