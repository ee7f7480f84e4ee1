"""The fields every Gemma decoder config holds, whichever the generation.

`GemmaConfig` (Gemma 1-3) and `Gemma4Config` both extend `DecoderFields`: the sizes and
norms all Gemma decoders share, the dtypes and remat the module runs with, and what `save`
needs to write the folder back (the Hugging Face configs and the source folder, which ride
along outside hashing and comparison so that a model built from the config can be a static
argument of `jax.jit`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from oftjax.models.remat import policy_name as remat_policy_name

_UNHASHED = dict(default=None, compare=False, hash=False, repr=False)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoderFields:
  """Fields shared by the Gemma decoder configs (keyword-only).

  Attributes:
    vocab_size: vocabulary size.
    hidden_size: model width.
    intermediate_size: (dense) MLP width.
    num_layers: number of decoder layers.
    num_heads: query heads.
    rms_norm_eps: RMSNorm epsilon.
    activation: Hugging Face activation name of the gated MLP.
    final_logit_softcapping: tanh soft-cap of the output logits, or None.
    tie_word_embeddings: whether the output projection is the transposed embedding.
    pad_token_id: padding token id (used by `generate` after EOS).
    multimodal: the checkpoint is a `...ForConditionalGeneration` folder (model_type
      gemma3 or gemma4): this config is its text decoder; the other towers are kept
      only for saving.
    dtype: compute dtype.
    param_dtype: parameter storage dtype.
    remat: the rematerialisation policy of each decoder layer in the backward pass, one of
      `oftjax.models.remat.POLICIES` (a bool means 'full' or 'none').
    unroll_layers: trace the layer scan fully unrolled (`nn.scan(unroll=...)`): the same
      parameters, math and results as straight-line code. XLA CPU runs a scan as a `while`
      loop that copies each layer's weights out of the stacked arrays and its saved
      activations into stacked buffers on every step; unrolled, those copies go, but
      every layer's weight slices are materialised at once (about one more copy of the
      weights) and compile time grows with the layer count. The job's default on CPU for
      decoders of at most 1 GiB (`--unroll-layers`).
    hf_config: the Hugging Face text config this was built from; not hashed or compared.
    hf_multimodal_config: the whole config of a multimodal folder, else None.
    source_dir: the folder the checkpoint came from, if any; not hashed or compared.
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  rms_norm_eps: float = 1e-6
  activation: str = "gelu_pytorch_tanh"
  final_logit_softcapping: float | None = None
  tie_word_embeddings: bool = True
  pad_token_id: int = 0
  multimodal: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: str = "none"
  unroll_layers: bool = False
  hf_config: Any = dataclasses.field(**_UNHASHED)
  hf_multimodal_config: Any = dataclasses.field(**_UNHASHED)
  source_dir: str | None = dataclasses.field(**_UNHASHED)

  def replace(self, **changes):
    """Returns a copy with some fields changed (e.g. `remat='full'`)."""
    return dataclasses.replace(self, **changes)


def source_fields(hf_config, text_config, dtype, param_dtype, remat: bool | str) -> dict:
  """The `DecoderFields` keywords that come from the folder's configs and the caller.

  Args:
    hf_config: the folder's top-level transformers config.
    text_config: its text-decoder config (`hf_config` itself for a text-only folder).
    dtype: compute dtype.
    param_dtype: parameter dtype; None for `dtype`.
    remat: a rematerialisation policy name or bool (`oftjax.models.remat.policy_name`).

  Returns:
    `multimodal`, `dtype`, `param_dtype`, `remat`, `hf_config` (the text config) and
    `hf_multimodal_config` (the whole config of a multimodal folder, else None).
  """
  multimodal = text_config is not hf_config
  return dict(
    multimodal=multimodal,
    dtype=dtype,
    param_dtype=param_dtype if param_dtype is not None else dtype,
    remat=remat_policy_name(remat),
    hf_config=text_config,
    hf_multimodal_config=hf_config if multimodal else None,
  )
