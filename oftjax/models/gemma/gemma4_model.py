"""The Gemma 4 text decoder as a Flax Linen module, with the same calls as `Gemma`.

`Gemma4(config)` is a `TextDecoder` (`oftjax.models.gemma.model`): `apply({'params': p},
tokens, positions=..., segment_ids=..., attention_mask=...)` returns fp32 logits `[batch,
time, vocab]`, and `decode(tokens, positions, cache, cache_index, kv_mask)` runs against the
cache of `init_cache`, exactly as `Gemma` does. The layers are scanned by segment
(`gemma4_stack`).

Per-layer embeddings (PLE): a packed table `[per_layer_vocab, num_layers * ple]` looked up
by token (times `sqrt(ple)`), plus a projection of the embedded tokens (times
`hidden**-0.5`, RMS-normalised per layer), summed and scaled by `2**-0.5`; layer `i` gets
slice `i`.

References:
  transformers `models/gemma4/modeling_gemma4.py` (`Gemma4TextModel`,
  `Gemma4ForCausalLM`), 5.24.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from oftjax.models.gemma.gemma4_config import Gemma4Config, from_hf_config
from oftjax.models.gemma.gemma4_layers import Gemma4RMSNorm
from oftjax.models.gemma.gemma4_rope import rope_tables
from oftjax.models.gemma.gemma4_schedule import layer_schedule
from oftjax.models.gemma.gemma4_stack import Gemma4Layers, shared_types
from oftjax.models.gemma.model import TextDecoder, output_head, token_embedding

Array = Any


def init_cache(config: Gemma4Config, batch: int, max_len: int, dtype=None):
  """Zero key/value cache for `Gemma4.decode`; arguments as `model.init_cache`'s.

  Returns:
    One tuple per segment with one entry per slot: `(k, v)`, each `[repeats, batch,
    max_len, kv_heads, head_dim]` of the slot's layer type, or None for KV-shared slots
    (they attend with an earlier layer's cache).
  """
  dtype = dtype or config.dtype
  caches = []
  for segment in layer_schedule(config):
    slots = []
    for kind in segment.kinds:
      if kind.kv_shared:
        slots.append(None)
        continue
      geom = config.geometry(kind.sliding)
      shape = (segment.repeats, batch, max_len, geom.num_kv_heads, geom.head_dim)
      slots.append((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)))
    caches.append(tuple(slots))
  return tuple(caches)


class Gemma4(TextDecoder):
  """Gemma 4 text decoder: per-layer embeddings, layers scanned by segment (`gemma4_stack`).

  Attributes:
    config: the architecture (see `Gemma4Config`); `decode` takes the cache of this
      module's `init_cache`, and KV-shared layers attend with their source layer's
      updated cache.
  """

  config: Gemma4Config

  def setup(self):
    cfg = self.config
    self.embed_tokens = token_embedding(cfg)
    if cfg.per_layer_input_size:
      common = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
      packed = cfg.num_layers * cfg.per_layer_input_size
      self.embed_tokens_per_layer = nn.Embed(
        cfg.per_layer_vocab_size, packed, embedding_init=nn.initializers.normal(0.02), **common
      )
      self.per_layer_model_projection = nn.Dense(packed, use_bias=False, **common)
      self.per_layer_projection_norm = Gemma4RMSNorm(cfg.rms_norm_eps, cfg.param_dtype)
    self.layers = Gemma4Layers(cfg)
    self.norm = Gemma4RMSNorm(cfg.rms_norm_eps, cfg.param_dtype)
    self.lm_head = output_head(cfg)

  def _per_layer_inputs(self, tokens, x):
    """PLE inputs `[batch, time, num_layers, ple]` (None without PLE)."""
    cfg = self.config
    if not cfg.per_layer_input_size:
      return None
    shape = tokens.shape + (cfg.num_layers, cfg.per_layer_input_size)
    by_token = self.embed_tokens_per_layer(tokens)
    by_token = by_token * jnp.asarray(cfg.per_layer_input_size**0.5, by_token.dtype)
    projected = self.per_layer_model_projection(x) * (cfg.hidden_size**-0.5)
    projected = self.per_layer_projection_norm(projected.reshape(shape))
    return (projected + by_token.reshape(shape)) * (2.0**-0.5)

  def _run(self, tokens, positions, masks, caches=None, cache_index=None):
    cfg = self.config
    x = self._embed(tokens)
    per_layer_inputs = self._per_layer_inputs(tokens, x)
    context = {"cache_index": cache_index}
    for key, geom, mask in (("sliding", cfg.sliding, masks[1]), ("full", cfg.full, masks[0])):
      if geom is not None:
        context[key] = (*rope_tables(positions, geom.rope, geom.head_dim, cfg.dtype), mask)
    batch, kv_len = masks[0].shape[0], masks[0].shape[-1]
    cache_leaves = jax.tree_util.tree_leaves(caches)
    kv_dtype = cache_leaves[0].dtype if cache_leaves else cfg.dtype
    shared = {}
    for key in shared_types(cfg):
      geom = cfg.geometry(key == "sliding")
      zeros = jnp.zeros((batch, kv_len, geom.num_kv_heads, geom.head_dim), kv_dtype)
      shared[key] = (zeros, zeros)
    return self.layers(x, per_layer_inputs, context, shared, caches)


def from_hf_config_model(
  hf_config, dtype=jnp.float32, param_dtype=None, remat: bool | str = False
) -> Gemma4:
  """Builds a `Gemma4` module from a `gemma4_text` or `gemma4` transformers config."""
  return Gemma4(from_hf_config(hf_config, dtype=dtype, param_dtype=param_dtype, remat=remat))
