"""Mapping between Hugging Face Gemma 4 tensor names/layouts and our Linen parameter tree.

Layouts are those of `hf_names` (HF `nn.Linear` weights `[out, in]`, our kernels `[in,
out]` with head axes split out), with the head width of each layer's own type. Layer `i`
lives at `layers/segment_{s}/slot_{j}` on index `r` of the stacked axis, where
`i = segment.layer(r, j)` (`gemma4_schedule`).

Names are the text model's (`model.layers.3.mlp.up_proj.weight`). A multimodal
(`Gemma4ForConditionalGeneration`) folder stores them under `model.language_model.`;
everything else in it but `lm_head.weight` (vision and audio towers, their embedders) is a
*tower tensor*: never read, and copied byte for byte by `save`. Checkpoints may also hold
key/value projections of KV-shared layers, which transformers ignores: so do we.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from oftjax.models.gemma import hf_names
from oftjax.models.gemma.gemma4_config import Gemma4Config
from oftjax.models.gemma.gemma4_layers import mlp_width, moe_module
from oftjax.models.gemma.gemma4_schedule import LayerKind, layer_kinds, layer_schedule

TEXT_PREFIX = "model."
MULTIMODAL_TEXT_PREFIX = "model.language_model."
LM_HEAD = "lm_head.weight"
_SHARED_KV_TENSOR = re.compile(r"model\.layers\.(\d+)\.self_attn\.(k_proj|v_proj|k_norm|v_norm)\.")


@dataclasses.dataclass(frozen=True)
class Gemma4TensorSpec(hf_names.TensorSpec):
  """A `TensorSpec` whose head layouts ('q', 'kv', 'o') use their own head width.

  Attributes:
    head_dim: head width of the layer's type (0 for tensors without heads).
  """

  head_dim: int = 0


def _attention_entries(cfg: Gemma4Config, kind: LayerKind):
  geom = cfg.geometry(kind.sliding)
  d, n, h, k = cfg.hidden_size, cfg.num_heads, geom.head_dim, geom.num_kv_heads
  entries = [
    ("self_attn.q_proj.weight", ("self_attn", "q_proj", "kernel"), "q", (n * h, d)),
    ("self_attn.q_norm.weight", ("self_attn", "q_norm", "scale"), "id", (h,)),
  ]
  if not kind.kv_shared:
    entries.append(("self_attn.k_proj.weight", ("self_attn", "k_proj", "kernel"), "kv", (k * h, d)))
    if not geom.k_eq_v:
      entries.append(
        ("self_attn.v_proj.weight", ("self_attn", "v_proj", "kernel"), "kv", (k * h, d))
      )
    entries.append(("self_attn.k_norm.weight", ("self_attn", "k_norm", "scale"), "id", (h,)))
  entries.append(("self_attn.o_proj.weight", ("self_attn", "o_proj", "kernel"), "o", (d, n * h)))
  return entries


def _moe_entries(cfg: Gemma4Config):
  d = cfg.hidden_size
  entries = [
    ("post_feedforward_layernorm_1.weight", ("post_feedforward_layernorm_1", "scale"), "id", (d,))
  ]
  return entries + moe_module().hf_tensor_entries(d, cfg.num_experts, cfg.moe_intermediate_size)


def _layer_entries(cfg: Gemma4Config, kind: LayerKind):
  """`(hf_suffix, path in the layer, kind, hf_shape)` of one layer of `kind`."""
  d, f = cfg.hidden_size, mlp_width(cfg, kind)
  entries = _attention_entries(cfg, kind) + [
    ("mlp.gate_proj.weight", ("mlp", "gate_proj", "kernel"), "T", (f, d)),
    ("mlp.up_proj.weight", ("mlp", "up_proj", "kernel"), "T", (f, d)),
    ("mlp.down_proj.weight", ("mlp", "down_proj", "kernel"), "T", (d, f)),
  ]
  for norm in (
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
  ):
    entries.append((f"{norm}.weight", (norm, "scale"), "id", (d,)))
  if cfg.enable_moe_block:
    entries += _moe_entries(cfg)
  if cfg.per_layer_input_size:
    p = cfg.per_layer_input_size
    entries += [
      ("per_layer_input_gate.weight", ("per_layer_input_gate", "kernel"), "T", (p, d)),
      ("per_layer_projection.weight", ("per_layer_projection", "kernel"), "T", (d, p)),
      ("post_per_layer_input_norm.weight", ("post_per_layer_input_norm", "scale"), "id", (d,)),
    ]
  entries.append(("layer_scalar", ("layer_scalar",), "id", (1,)))
  return entries


def tensor_specs(cfg: Gemma4Config) -> list[Gemma4TensorSpec]:
  """All tensors of the text decoder, by text-model name, in layer order.

  Args:
    cfg: the model config.

  Returns:
    One spec per HF tensor (no `lm_head.weight` when embeddings are tied).
  """
  v, d = cfg.vocab_size, cfg.hidden_size
  specs = [
    Gemma4TensorSpec("model.embed_tokens.weight", ("embed_tokens", "embedding"), None, "id", (v, d))
  ]
  if cfg.per_layer_input_size:
    packed = cfg.num_layers * cfg.per_layer_input_size
    specs += [
      Gemma4TensorSpec(
        "model.embed_tokens_per_layer.weight",
        ("embed_tokens_per_layer", "embedding"),
        None,
        "id",
        (cfg.per_layer_vocab_size, packed),
      ),
      Gemma4TensorSpec(
        "model.per_layer_model_projection.weight",
        ("per_layer_model_projection", "kernel"),
        None,
        "T",
        (packed, d),
      ),
      Gemma4TensorSpec(
        "model.per_layer_projection_norm.weight",
        ("per_layer_projection_norm", "scale"),
        None,
        "id",
        (cfg.per_layer_input_size,),
      ),
    ]
  by_layer = {}
  for s, segment in enumerate(layer_schedule(cfg)):
    for slot, kind in enumerate(segment.kinds):
      head_dim = cfg.geometry(kind.sliding).head_dim
      scope = ("layers", f"segment_{s}", f"slot_{slot}")
      for repeat in range(segment.repeats):
        layer = segment.layer(repeat, slot)
        by_layer[layer] = [
          Gemma4TensorSpec(
            f"model.layers.{layer}.{suffix}",
            scope + path,
            repeat,
            code,
            shape,
            head_dim if code in ("q", "kv", "o") else 0,
          )
          for suffix, path, code, shape in _layer_entries(cfg, kind)
        ]
  for layer in sorted(by_layer):
    specs += by_layer[layer]
  specs.append(Gemma4TensorSpec("model.norm.weight", ("norm", "scale"), None, "id", (d,)))
  if not cfg.tie_word_embeddings:
    specs.append(Gemma4TensorSpec(LM_HEAD, ("lm_head", "kernel"), None, "T", (v, d)))
  return specs


def is_tower_tensor(name: str, cfg: Gemma4Config) -> bool:
  """Whether `name` (as in the file) belongs to a multimodal folder's other towers."""
  return cfg.multimodal and not (name.startswith(MULTIMODAL_TEXT_PREFIX) or name == LM_HEAD)


def canonical_name(name: str, cfg: Gemma4Config) -> str | None:
  """The text-model name of a tensor in a checkpoint of `cfg`, or None to skip it unread.

  Skipped: tower tensors of a multimodal folder, stale rotary buffers, and the key/value
  projections and norms of KV-shared layers (unused, as in transformers).
  """
  if is_tower_tensor(name, cfg) or name.endswith("rotary_emb.inv_freq"):
    return None
  if cfg.multimodal and name.startswith(MULTIMODAL_TEXT_PREFIX):
    name = TEXT_PREFIX + name[len(MULTIMODAL_TEXT_PREFIX) :]
  match = _SHARED_KV_TENSOR.match(name)
  if (
    match
    and int(match.group(1)) < cfg.num_layers
    and layer_kinds(cfg)[int(match.group(1))].kv_shared
  ):
    return None
  return name


def file_name(name: str, cfg: Gemma4Config) -> str:
  """Inverse of `canonical_name` for text tensors: the name `save` writes."""
  if cfg.multimodal and name.startswith(TEXT_PREFIX):
    return MULTIMODAL_TEXT_PREFIX + name[len(TEXT_PREFIX) :]
  return name


def hf_module_name(cfg: Gemma4Config, path: str, index: int | None = None) -> str:
  """The transformers module name of one of our layers, as the file names it.

  Args:
    cfg: the model config.
    path: a '/'-joined module path of ours (`layers/segment_1/slot_0/self_attn/q_proj`).
    index: the position on the stacked axis, for a path under `layers/`.

  Returns:
    E.g. `model.layers.7.self_attn.q_proj` (`model.language_model.layers.7...` for a
    multimodal model); unstacked paths map to `model.<path with dots>`.

  Raises:
    ValueError: a stacked path without an index, or not of the form above.
  """
  parts = path.split("/")
  if parts[0] != "layers":
    return file_name(TEXT_PREFIX + ".".join(parts), cfg)
  where = re.fullmatch(r"layers/segment_(\d+)/slot_(\d+)/.+", path)
  schedule = layer_schedule(cfg)
  if index is None or not where or int(where.group(1)) >= len(schedule):
    raise ValueError(f"'{path}' (index {index}) is not a stacked Gemma 4 layer path")
  segment, slot = schedule[int(where.group(1))], int(where.group(2))
  if not (0 <= index < segment.repeats and slot < len(segment.kinds)):
    raise ValueError(f"'{path}' has no layer at index {index}")
  return file_name(
    TEXT_PREFIX + ".".join([f"layers.{segment.layer(index, slot)}"] + parts[3:]), cfg
  )


def to_flax(x: np.ndarray, spec: Gemma4TensorSpec, cfg: Gemma4Config) -> np.ndarray:
  """Converts one HF tensor (or a row block of one, for 'id'/'T') to our layout."""
  d = cfg.hidden_size
  if spec.kind in ("q", "kv"):
    return x.T.reshape(d, x.shape[0] // spec.head_dim, spec.head_dim)
  if spec.kind == "o":
    return x.T.reshape(x.shape[1] // spec.head_dim, spec.head_dim, d)
  return hf_names.to_flax(x, spec.kind, cfg)
