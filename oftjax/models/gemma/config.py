"""Gemma 1/2/3 text-decoder configuration, read from Hugging Face config objects.

The dataclass below holds exactly what the Linen model needs, in a hashable form
(so a model built from it can be a static argument of `jax.jit`). The original
Hugging Face config object rides along, outside hashing and comparison, so that
`save` can write a `config.json` that `transformers` loads back.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from oftjax.models.gemma import gemma4_config
from oftjax.models.gemma.config_fields import DecoderFields, source_fields

SUPPORTED_MODEL_TYPES = ("gemma", "gemma2", "gemma3_text", "gemma3")
_GENERATION = {"gemma": 1, "gemma2": 2, "gemma3_text": 3}
_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu", "gelu_new", "gelu_fast", "gelu_python_tanh")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  """Rotary embedding parameters for one attention-layer type.

  Attributes:
    theta: the rope base wavelength.
    factor: linear scaling factor (inverse frequencies are divided by it); 1.0 means none.
  """

  theta: float = 10_000.0
  factor: float = 1.0


@dataclasses.dataclass(frozen=True)
class GemmaConfig(DecoderFields):
  """Architecture of a Gemma 1, 2 or 3 text decoder.

  Attributes:
    generation: 1, 2 or 3 (Gemma, Gemma 2, Gemma 3 text).
    num_kv_heads: key/value heads (GQA when smaller than `num_heads`, MQA when 1).
    head_dim: width of one head (need not equal hidden_size / num_heads).
    query_pre_attn_scalar: attention scores are multiplied by `query_pre_attn_scalar ** -0.5`.
    attn_logit_softcapping: tanh soft-cap of attention scores (Gemma 2), or None.
    sliding_window: window of the local layers (a key is visible when `q - k < window`), or None.
    layer_is_sliding: one flag per layer; True for a sliding-window (local) layer.
    rope_global: rope parameters of full-attention layers.
    rope_local: rope parameters of sliding-window layers.

  Sizes, norms, dtypes, `multimodal` and the Hugging Face configs: `DecoderFields`.
  """

  generation: int
  num_kv_heads: int
  head_dim: int
  query_pre_attn_scalar: float = 256.0
  attn_logit_softcapping: float | None = None
  sliding_window: int | None = None
  layer_is_sliding: tuple[bool, ...] = ()
  rope_global: RopeConfig = RopeConfig()
  rope_local: RopeConfig = RopeConfig()

  @property
  def has_post_norms(self) -> bool:
    """Gemma 2/3 normalise attention and MLP outputs (sandwich norms)."""
    return self.generation >= 2

  @property
  def has_qk_norm(self) -> bool:
    """Gemma 3 normalises queries and keys per head."""
    return self.generation >= 3


def text_config_of(hf_config):
  """Returns the text-decoder config of a Hugging Face Gemma config.

  Args:
    hf_config: a `GemmaConfig`, `Gemma2Config`, `Gemma3TextConfig`, multimodal `Gemma3Config`,
      or a Gemma 4 config (`gemma4_text`, multimodal `gemma4`).

  Returns:
    The text config (the `text_config` of a multimodal config, else the input).

  Raises:
    ValueError: for any other `model_type`.
  """
  model_type = getattr(hf_config, "model_type", None)
  if model_type in gemma4_config.MODEL_TYPES:
    return gemma4_config.text_config_of(hf_config)
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(
      f"unsupported model_type {model_type!r}: expected one of {', '.join(SUPPORTED_MODEL_TYPES)}"
    )
  if model_type == "gemma3":
    return hf_config.text_config
  return hf_config


def _rope_of(params: dict | None, model_type: str) -> RopeConfig:
  params = dict(params or {})
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type not in ("default", "linear"):
    raise ValueError(
      f"{model_type}: rope_type {rope_type!r} is not supported (only 'default' and 'linear')"
    )
  if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
    raise ValueError(f"{model_type}: partial_rotary_factor != 1 is not supported")
  factor = float(params["factor"]) if rope_type == "linear" else 1.0
  return RopeConfig(theta=float(params["rope_theta"]), factor=factor)


def from_hf_config(
  hf_config, dtype=jnp.float32, param_dtype=None, remat: bool | str = False
) -> GemmaConfig:
  """Builds a `GemmaConfig` from a Hugging Face config object.

  Args:
    hf_config: a transformers Gemma/Gemma2/Gemma3Text config, or a multimodal Gemma3 config
      (its `text_config` is used; the whole config is kept for saving).
    dtype: compute dtype.
    param_dtype: parameter dtype; defaults to `dtype`.
    remat: the rematerialisation policy of the decoder layers in the backward pass (one of
      `oftjax.models.remat.POLICIES`: 'none', 'full', 'dots', 'dots_no_batch'; `True` is
      'full', `False` 'none').

  Returns:
    The `GemmaConfig` (a `Gemma4Config` for a `gemma4_text` or `gemma4` config).

  Raises:
    ValueError: unknown model_type or an unsupported feature (attention bias, bidirectional
      attention, rope types other than default/linear).
  """
  if getattr(hf_config, "model_type", None) in gemma4_config.MODEL_TYPES:  # Gemma 4: own config
    return gemma4_config.from_hf_config(
      hf_config, dtype=dtype, param_dtype=param_dtype, remat=remat
    )
  cfg = text_config_of(hf_config)
  model_type = cfg.model_type
  generation = _GENERATION[model_type]
  if getattr(cfg, "attention_bias", False):
    raise ValueError(f"{model_type}: attention_bias=True is not supported")
  if getattr(cfg, "use_bidirectional_attention", False):
    raise ValueError(f"{model_type}: use_bidirectional_attention=True is not supported")
  activation = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", None)
  if generation == 1:
    activation = cfg.hidden_act  # transformers' Gemma reads hidden_act (legacy "gelu" -> tanh)
  if activation not in _ACTIVATIONS:
    raise ValueError(f"{model_type}: activation {activation!r} is not supported")
  head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
  num_layers = cfg.num_hidden_layers
  rope_params = cfg.rope_parameters or {}
  if generation == 3:
    layer_types = tuple(cfg.layer_types)
    rope_global = _rope_of(rope_params.get("full_attention"), model_type)
    rope_local = _rope_of(rope_params.get("sliding_attention"), model_type)
  else:
    layer_types = tuple(getattr(cfg, "layer_types", None) or ("full_attention",) * num_layers)
    rope_global = rope_local = _rope_of(rope_params, model_type)
  if len(layer_types) != num_layers:
    raise ValueError(f"{model_type}: {len(layer_types)} layer_types for {num_layers} layers")
  unknown = set(layer_types) - {"full_attention", "sliding_attention"}
  if unknown:
    raise ValueError(f"{model_type}: unsupported layer types {sorted(unknown)}")
  if generation == 1:
    scalar = float(head_dim)
    attn_softcap = None
  else:
    scalar = float(cfg.query_pre_attn_scalar)
    # transformers' Gemma 3 attention does not pass its softcap to the kernel: it is unused.
    attn_softcap = cfg.attn_logit_softcapping if generation == 2 else None
  final_softcap = getattr(cfg, "final_logit_softcapping", None)
  pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
  return GemmaConfig(
    generation=generation,
    vocab_size=cfg.vocab_size,
    hidden_size=cfg.hidden_size,
    intermediate_size=cfg.intermediate_size,
    num_layers=num_layers,
    num_heads=cfg.num_attention_heads,
    num_kv_heads=cfg.num_key_value_heads,
    head_dim=head_dim,
    rms_norm_eps=float(cfg.rms_norm_eps),
    activation=activation,
    query_pre_attn_scalar=scalar,
    attn_logit_softcapping=float(attn_softcap) if attn_softcap else None,
    final_logit_softcapping=float(final_softcap) if final_softcap else None,
    sliding_window=getattr(cfg, "sliding_window", None),
    layer_is_sliding=tuple(t == "sliding_attention" for t in layer_types),
    rope_global=rope_global,
    rope_local=rope_local,
    tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", True)),
    pad_token_id=int(pad),
    **source_fields(hf_config, cfg, dtype, param_dtype, remat),
  )
