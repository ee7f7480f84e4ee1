"""Gemma 4 text-decoder configuration, read from Hugging Face config objects.

Gemma 4 layers are not all alike: sliding-window and full-attention layers have their
own head width, key/value head count and rotary embedding; full layers may take their
values from their keys (`attention_k_eq_v`); the last `num_kv_shared_layers` layers
reuse the keys and values of an earlier layer (and may have a double-wide MLP). The
frozen dataclasses below hold exactly that, in a hashable form (a model built from them
can be a static argument of `jax.jit`). The Hugging Face config objects ride along,
outside hashing and comparison, so that `save` writes a `config.json` transformers reads.

transformers 5.24 accepts two spellings of the per-layer geometry in `config.json`:
top-level `global_head_dim` / `num_global_key_value_heads` (the latter only applied when
`attention_k_eq_v`), which its `__post_init__` turns into `per_layer_config`, and
`per_layer_config` itself (`{"layer index": {"head_dim": ..., "num_key_value_heads": ...}}`).
Both are read here through the resolved `config.per_layer_config[i]`.

References:
  transformers `models/gemma4/configuration_gemma4.py` and `modeling_gemma4.py` (5.24).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from oftjax.models.gemma.config_fields import DecoderFields, source_fields

TEXT_MODEL_TYPE = "gemma4_text"
MULTIMODAL_MODEL_TYPE = "gemma4"
MODEL_TYPES = (TEXT_MODEL_TYPE, MULTIMODAL_MODEL_TYPE)
ROPE_TYPES = ("default", "linear", "proportional")
SLIDING, FULL = "sliding_attention", "full_attention"
_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu", "gelu_new", "gelu_fast", "gelu_python_tanh")
_PER_LAYER_FIELDS = ("head_dim", "num_key_value_heads")


@dataclasses.dataclass(frozen=True)
class Gemma4Rope:
  """Rotary embedding of one attention-layer type.

  Attributes:
    kind: 'default', 'linear' or 'proportional' (rotates only the first
      `partial_rotary_factor` of each half of the head; the rest keeps angle zero).
    theta: the rope base wavelength.
    factor: inverse frequencies are divided by it (1.0: no scaling).
    partial_rotary_factor: fraction of the head that rotates ('proportional' only).
  """

  kind: str = "default"
  theta: float = 10_000.0
  factor: float = 1.0
  partial_rotary_factor: float = 1.0


@dataclasses.dataclass(frozen=True)
class AttentionGeometry:
  """Attention shape of one layer type (sliding or full).

  Attributes:
    head_dim: width of one query/key/value head.
    num_kv_heads: key/value heads.
    k_eq_v: no `v_proj`: values are the key projection (before the key norm).
    rope: the rotary embedding of this layer type.
  """

  head_dim: int
  num_kv_heads: int
  k_eq_v: bool
  rope: Gemma4Rope


@dataclasses.dataclass(frozen=True)
class Gemma4Config(DecoderFields):
  """Architecture of a Gemma 4 text decoder.

  Attributes:
    intermediate_size: dense MLP width (doubled on KV-shared layers with
      `use_double_wide_mlp`).
    sliding: geometry of sliding-window layers (None when there are none).
    full: geometry of full-attention layers (None when there are none).
    layer_is_sliding: one flag per layer.
    sliding_window: a key is visible to a sliding layer's query when `q - k < window`.
    num_kv_shared_layers: the last this many layers reuse the keys/values of the last
      earlier layer of their type.
    use_double_wide_mlp: KV-shared layers have an MLP of twice `intermediate_size`.
    per_layer_input_size: width of the per-layer embeddings (PLE); 0 disables them.
    per_layer_vocab_size: rows of the packed PLE table.
    enable_moe_block: every layer adds a mixture-of-experts block beside its MLP.
    num_experts: experts per MoE block.
    top_k_experts: experts each token is routed to.
    moe_intermediate_size: width of one expert's MLP.
    moe_implementation: 'ragged_dot' (grouped matmul over the chosen experts) or 'dense'
      (every expert on every token; cheaper on CPU), see `gemma4_moe`.

  Sizes, norms, dtypes, `multimodal` and the Hugging Face configs: `DecoderFields`.
  """

  sliding: AttentionGeometry | None
  full: AttentionGeometry | None
  layer_is_sliding: tuple[bool, ...]
  sliding_window: int
  num_kv_shared_layers: int = 0
  use_double_wide_mlp: bool = False
  per_layer_input_size: int = 0
  per_layer_vocab_size: int = 0
  enable_moe_block: bool = False
  num_experts: int | None = None
  top_k_experts: int | None = None
  moe_intermediate_size: int | None = None
  moe_implementation: str = "ragged_dot"

  @property
  def first_kv_shared_layer(self) -> int:
    """Index of the first layer that reuses an earlier layer's keys and values."""
    return self.num_layers - self.num_kv_shared_layers

  def geometry(self, sliding: bool) -> AttentionGeometry:
    """The attention geometry of sliding (True) or full (False) layers."""
    geom = self.sliding if sliding else self.full
    if geom is None:
      raise ValueError(f"this model has no {'sliding' if sliding else 'full'}-attention layers")
    return geom


def _fail(model_type: str, problem: str) -> ValueError:
  return ValueError(f"{model_type}: {problem}")


def _rope_kind(params: dict, layer_type: str, model_type: str) -> str:
  """The rope type of one layer type's parameters, refusing those not implemented."""
  kind = params.get("rope_type", params.get("type", "default"))
  if kind not in ROPE_TYPES:
    raise _fail(
      model_type,
      f"rope_type {kind!r} of {layer_type} layers is not supported "
      f"(supported: {', '.join(ROPE_TYPES)})",
    )
  return kind


def _rope_of(params, layer_type: str, model_type: str) -> Gemma4Rope:
  """Validates the rope parameters of one layer type (a plain dict from the config)."""
  if params is None:
    raise _fail(model_type, f"rope_parameters has no entry for {layer_type} layers")
  params = dict(params)
  kind = _rope_kind(params, layer_type, model_type)
  partial = float(params.get("partial_rotary_factor", 1.0) or 1.0)
  if kind != "proportional" and partial != 1.0:
    raise _fail(
      model_type,
      f"partial_rotary_factor={partial} with rope_type {kind!r} on "
      f"{layer_type} layers is not implemented (use rope_type 'proportional')",
    )
  if not 0.0 <= partial <= 1.0:
    raise _fail(
      model_type, f"partial_rotary_factor={partial} of {layer_type} layers is outside [0, 1]"
    )
  if kind == "linear" and "factor" not in params:
    raise _fail(model_type, f"linear rope of {layer_type} layers has no 'factor'")
  factor = float(params.get("factor", 1.0)) if kind != "default" else 1.0
  return Gemma4Rope(
    kind=kind, theta=float(params["rope_theta"]), factor=factor, partial_rotary_factor=partial
  )


def check_raw_config(raw: dict) -> None:
  """Refuses what transformers would fail on obscurely, before it parses `config.json`.

  Args:
    raw: the parsed `config.json` of a `gemma4` or `gemma4_text` folder.

  Raises:
    ValueError: a rope type this module does not implement (transformers would raise a
      `KeyError` for some, e.g. 'yarn' without its extra keys).
  """
  multimodal = raw.get("model_type") == MULTIMODAL_MODEL_TYPE
  text = (raw.get("text_config") or {}) if multimodal else raw
  model_type = text.get("model_type", TEXT_MODEL_TYPE)
  ropes = text.get("rope_parameters") or {}
  for layer_type, params in ropes.items():
    if isinstance(params, dict):
      _rope_kind(params, layer_type, model_type)


def text_config_of(hf_config):
  """The text-decoder config of a `gemma4` or `gemma4_text` Hugging Face config."""
  model_type = getattr(hf_config, "model_type", None)
  if model_type == MULTIMODAL_MODEL_TYPE:
    return hf_config.text_config
  if model_type == TEXT_MODEL_TYPE:
    return hf_config
  raise ValueError(
    f"unsupported model_type {model_type!r}: expected one of {', '.join(MODEL_TYPES)}"
  )


def _layer_geometry(cfg, layer: int, model_type: str) -> tuple[int, int]:
  layer_cfg = cfg.per_layer_config[layer]
  skip = getattr(layer_cfg, "skip", None)
  if skip:
    raise _fail(model_type, f"per_layer_config skips {skip} on layer {layer}; not implemented")
  return int(layer_cfg.head_dim), int(layer_cfg.num_key_value_heads)


def _geometries(cfg, layer_types, model_type: str):
  """`{layer_type: (head_dim, num_kv_heads)}`, refusing per-layer fields not implemented."""
  overridden = set(cfg.per_layer_attributes or ())
  unknown = sorted(overridden - set(_PER_LAYER_FIELDS))
  if unknown:
    raise _fail(
      model_type,
      f"per_layer_config overrides {unknown}; only {list(_PER_LAYER_FIELDS)} may vary by layer",
    )
  found: dict[str, tuple[int, int]] = {}
  for layer, layer_type in enumerate(layer_types):
    geom = _layer_geometry(cfg, layer, model_type)
    if found.setdefault(layer_type, geom) != geom:
      raise _fail(
        model_type,
        f"{layer_type} layers differ in (head_dim, num_key_value_heads): "
        f"{found[layer_type]} vs {geom} on layer {layer}",
      )
  return found


def _check_kv_sharing(layer_types, shared: int, model_type: str) -> None:
  num_layers = len(layer_types)
  if not 0 <= shared < num_layers:
    raise _fail(
      model_type,
      f"num_kv_shared_layers={shared} must be in [0, {num_layers}) "
      "(some layer has to compute the keys and values that others reuse)",
    )
  producers = set(layer_types[: num_layers - shared])
  consumers = set(layer_types[num_layers - shared :])
  if consumers - producers:
    raise _fail(
      model_type,
      f"KV-shared {sorted(consumers - producers)} layers have no earlier "
      "layer of their type to share keys and values with",
    )


def _check_unimplemented(cfg, model_type: str) -> None:
  if getattr(cfg, "attention_bias", False):
    raise _fail(model_type, "attention_bias=True is not implemented")
  if getattr(cfg, "use_bidirectional_attention", None) == "all":
    raise _fail(
      model_type,
      "use_bidirectional_attention='all' is not implemented "
      "(only causal attention; 'vision' is causal on text)",
    )
  if float(getattr(cfg, "attention_dropout", 0.0) or 0.0) != 0.0:
    raise _fail(model_type, f"attention_dropout={cfg.attention_dropout} is not implemented")


def from_hf_config(
  hf_config, dtype=jnp.float32, param_dtype=None, remat: bool | str = False
) -> Gemma4Config:
  """Builds a `Gemma4Config` from a transformers `Gemma4TextConfig` or `Gemma4Config`.

  Args:
    hf_config: a `gemma4_text` config, or a multimodal `gemma4` config (its `text_config`
      is used; the vision and audio configs are kept only for saving).
    dtype: compute dtype.
    param_dtype: parameter dtype; defaults to `dtype`.
    remat: the decoder layers' rematerialisation policy, as in `oftjax.models.gemma.config.from_hf_config`.

  Returns:
    The `Gemma4Config`.

  Raises:
    ValueError: another model_type, or a feature this module does not implement (the
      message names the field).
  """
  cfg = text_config_of(hf_config)
  multimodal = hf_config.model_type == MULTIMODAL_MODEL_TYPE
  model_type = cfg.model_type
  _check_unimplemented(cfg, model_type)
  activation = cfg.hidden_activation
  if activation not in _ACTIVATIONS:
    raise _fail(model_type, f"hidden_activation {activation!r} is not supported")
  num_layers = int(cfg.num_hidden_layers)
  layer_types = tuple(cfg.layer_types)
  if len(layer_types) != num_layers:
    raise _fail(model_type, f"{len(layer_types)} layer_types for {num_layers} layers")
  unknown = sorted(set(layer_types) - {SLIDING, FULL})
  if unknown:
    raise _fail(model_type, f"unsupported layer types {unknown}")
  shared = int(cfg.num_kv_shared_layers or 0)
  _check_kv_sharing(layer_types, shared, model_type)
  geoms = _geometries(cfg, layer_types, model_type)
  num_heads = int(cfg.num_attention_heads)
  ropes = cfg.rope_parameters or {}
  by_type = {}
  for layer_type, (head_dim, kv_heads) in geoms.items():
    if num_heads % kv_heads:
      raise _fail(
        model_type,
        f"{num_heads} attention heads are not a multiple of the "
        f"{kv_heads} key/value heads of {layer_type} layers",
      )
    by_type[layer_type] = AttentionGeometry(
      head_dim=head_dim,
      num_kv_heads=kv_heads,
      k_eq_v=bool(cfg.attention_k_eq_v) and layer_type == FULL,
      rope=_rope_of(ropes.get(layer_type), layer_type, model_type),
    )
  moe = bool(cfg.enable_moe_block)
  if moe and not (cfg.num_experts and cfg.top_k_experts and cfg.moe_intermediate_size):
    raise _fail(
      model_type, "enable_moe_block needs num_experts, top_k_experts and moe_intermediate_size"
    )
  ple = int(cfg.hidden_size_per_layer_input or 0)
  softcap = cfg.final_logit_softcapping
  tie = (hf_config if multimodal else cfg).tie_word_embeddings
  return Gemma4Config(
    vocab_size=int(cfg.vocab_size),
    hidden_size=int(cfg.hidden_size),
    intermediate_size=int(cfg.intermediate_size),
    num_layers=num_layers,
    num_heads=num_heads,
    sliding=by_type.get(SLIDING),
    full=by_type.get(FULL),
    layer_is_sliding=tuple(t == SLIDING for t in layer_types),
    sliding_window=int(cfg.sliding_window),
    num_kv_shared_layers=shared,
    use_double_wide_mlp=bool(cfg.use_double_wide_mlp),
    per_layer_input_size=ple,
    per_layer_vocab_size=int(cfg.vocab_size_per_layer_input) if ple else 0,
    enable_moe_block=moe,
    num_experts=int(cfg.num_experts) if moe else None,
    top_k_experts=int(cfg.top_k_experts) if moe else None,
    moe_intermediate_size=int(cfg.moe_intermediate_size) if moe else None,
    rms_norm_eps=float(cfg.rms_norm_eps),
    activation=activation,
    final_logit_softcapping=float(softcap) if softcap else None,
    tie_word_embeddings=bool(tie),
    pad_token_id=int(cfg.pad_token_id if cfg.pad_token_id is not None else 0),
    **source_fields(hf_config, cfg, dtype, param_dtype, remat),
  )
