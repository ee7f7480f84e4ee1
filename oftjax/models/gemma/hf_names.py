"""Mapping between Hugging Face Gemma tensor names/layouts and our Linen parameter tree.

HF stores `nn.Linear` weights as `[out, in]`; our kernels are `[in, out]`, with the head axes
split out for the attention projections (`q_proj` `[hidden, heads, head_dim]`, `o_proj`
`[heads, head_dim, hidden]`), and per-layer tensors stacked on a leading layer axis.

Names are the text model's (`model.layers.3.mlp.up_proj.weight`). A multimodal Gemma 3
folder (`Gemma3ForConditionalGeneration`) stores them under `language_model.model.` and
`language_model.lm_head.` (as transformers saves it and the hub's gemma-3-4b+ files do;
`model.language_model.` is read too), beside its vision tower and projector: *tower
tensors*, never read, and copied byte for byte by `save`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from oftjax.models.gemma.config import GemmaConfig

# Prefixes of multimodal Gemma 3 checkpoints and the text model's names they stand for: the
# layout `save` writes, then the one transformers' modules use.
_MULTIMODAL_PREFIXES = (
  ("language_model.model.", "model."),
  ("language_model.lm_head.", "lm_head."),
)
_PREFIX_REWRITES = _MULTIMODAL_PREFIXES + (("model.language_model.", "model."),)
_TOWER_PREFIXES = (
  "vision_tower.",
  "multi_modal_projector.",
  "model.vision_tower.",
  "model.multi_modal_projector.",
)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """Where one HF tensor lives in our tree.

  Attributes:
    hf_name: the HF tensor name (`model.layers.3.mlp.up_proj.weight`).
    path: the key path in our params tree (`('layers', 'mlp', 'up_proj', 'kernel')`).
    layer: the index on the stacked layer axis, or None for unstacked tensors.
    kind: layout conversion: 'id', 'T' (transpose), 'q' / 'kv' (split heads of a
      projection), 'o' (split heads of the output projection).
    hf_shape: the expected shape in the HF file.
  """

  hf_name: str
  path: tuple[str, ...]
  layer: int | None
  kind: str
  hf_shape: tuple[int, ...]


def _layer_entries(cfg: GemmaConfig):
  d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  n, k = cfg.num_heads, cfg.num_kv_heads
  entries = [
    ("self_attn.q_proj.weight", ("self_attn", "q_proj", "kernel"), "q", (n * h, d)),
    ("self_attn.k_proj.weight", ("self_attn", "k_proj", "kernel"), "kv", (k * h, d)),
    ("self_attn.v_proj.weight", ("self_attn", "v_proj", "kernel"), "kv", (k * h, d)),
    ("self_attn.o_proj.weight", ("self_attn", "o_proj", "kernel"), "o", (d, n * h)),
  ]
  if cfg.has_qk_norm:
    entries += [
      ("self_attn.q_norm.weight", ("self_attn", "q_norm", "scale"), "id", (h,)),
      ("self_attn.k_norm.weight", ("self_attn", "k_norm", "scale"), "id", (h,)),
    ]
  entries += [
    ("mlp.gate_proj.weight", ("mlp", "gate_proj", "kernel"), "T", (f, d)),
    ("mlp.up_proj.weight", ("mlp", "up_proj", "kernel"), "T", (f, d)),
    ("mlp.down_proj.weight", ("mlp", "down_proj", "kernel"), "T", (d, f)),
    ("input_layernorm.weight", ("input_layernorm", "scale"), "id", (d,)),
    ("post_attention_layernorm.weight", ("post_attention_layernorm", "scale"), "id", (d,)),
  ]
  if cfg.has_post_norms:
    entries += [
      ("pre_feedforward_layernorm.weight", ("pre_feedforward_layernorm", "scale"), "id", (d,)),
      ("post_feedforward_layernorm.weight", ("post_feedforward_layernorm", "scale"), "id", (d,)),
    ]
  return entries


def tensor_specs(cfg: GemmaConfig) -> list[TensorSpec]:
  """All tensors of a text-only HF Gemma checkpoint, in a stable order.

  Args:
    cfg: the model config.

  Returns:
    One `TensorSpec` per HF tensor (no `lm_head.weight` when embeddings are tied).
  """
  v, d = cfg.vocab_size, cfg.hidden_size
  specs = [
    TensorSpec("model.embed_tokens.weight", ("embed_tokens", "embedding"), None, "id", (v, d))
  ]
  entries = _layer_entries(cfg)
  for layer in range(cfg.num_layers):
    for suffix, path, kind, shape in entries:
      specs.append(
        TensorSpec(f"model.layers.{layer}.{suffix}", ("layers",) + path, layer, kind, shape)
      )
  specs.append(TensorSpec("model.norm.weight", ("norm", "scale"), None, "id", (d,)))
  if not cfg.tie_word_embeddings:
    specs.append(TensorSpec("lm_head.weight", ("lm_head", "kernel"), None, "T", (v, d)))
  return specs


def canonical_name(name: str) -> str | None:
  """Rewrites a (possibly multimodal) checkpoint name to the text model's name.

  Args:
    name: the tensor name in the file.

  Returns:
    The canonical text-model name, or None for tensors to ignore (vision tower, projector,
    stale rotary buffers).
  """
  if name.startswith(_TOWER_PREFIXES) or name.endswith("rotary_emb.inv_freq"):
    return None
  for old, new in _PREFIX_REWRITES:
    if name.startswith(old):
      return new + name[len(old) :]
  return name


def is_tower_tensor(name: str, cfg: GemmaConfig) -> bool:
  """Whether `name` (as in the file) is a vision-tower tensor of a multimodal Gemma 3 folder."""
  return cfg.multimodal and name.startswith(_TOWER_PREFIXES)


def file_name(name: str, cfg: GemmaConfig) -> str:
  """Inverse of `canonical_name` for text tensors: the name `save` writes."""
  if cfg.multimodal:
    for prefix, text_prefix in _MULTIMODAL_PREFIXES:
      if name.startswith(text_prefix):
        return prefix + name[len(text_prefix) :]
  return name


def to_flax(x: np.ndarray, kind: str, cfg: GemmaConfig) -> np.ndarray:
  """Converts one HF tensor (or a row block of one, for 'id'/'T') to our layout."""
  if kind == "id":
    return x
  if kind == "T":
    return x.T
  d, h = cfg.hidden_size, cfg.head_dim
  if kind in ("q", "kv"):
    return x.T.reshape(d, x.shape[0] // h, h)
  if kind == "o":
    return x.T.reshape(x.shape[1] // h, h, d)
  raise ValueError(f"unknown layout kind {kind!r}")


def to_hf(x: np.ndarray, kind: str) -> np.ndarray:
  """Converts one of our (unstacked) arrays back to the HF layout."""
  if kind == "id":
    return x
  if kind == "T":
    return x.T
  if kind in ("q", "kv"):
    return x.reshape(x.shape[0], -1).T
  if kind == "o":
    return x.reshape(-1, x.shape[-1]).T
  raise ValueError(f"unknown layout kind {kind!r}")
