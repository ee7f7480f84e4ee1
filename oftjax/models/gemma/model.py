"""The Gemma text decoder as a Flax Linen module, with layers under one `nn.scan`.

Parameters of the decoder layers are stacked along a leading layer axis under `layers/`
(e.g. `layers/self_attn/q_proj/kernel` is `[num_layers, hidden, heads, head_dim]`). The
local/global attention pattern of Gemma 2/3 is a per-layer boolean scanned alongside the
parameters, so compile time does not grow with depth.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from oftjax.models import remat
from oftjax.models.gemma.config import GemmaConfig
from oftjax.models.gemma.layers import DecoderLayer, RMSNorm, rope_tables, softcap

Array = Any


def default_positions(segment_ids: Array, from_mask_only: bool) -> Array:
  """Positions of tokens: a running count of real tokens within each segment, from 0.

  Args:
    segment_ids: `[batch, time]` integers, 0 for padding.
    from_mask_only: True when `segment_ids` is just a padding mask; positions are then
      `cumsum(mask) - 1` (as transformers' `generate` computes them), clipped at 0.

  Returns:
    `[batch, time]` int32 positions.
  """
  segment_ids = segment_ids.astype(jnp.int32)
  if from_mask_only:
    real = (segment_ids != 0).astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(real, axis=-1) - 1, 0)
  time = segment_ids.shape[-1]
  idx = jnp.broadcast_to(jnp.arange(time, dtype=jnp.int32), segment_ids.shape)
  prev = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
  start = jnp.where(segment_ids != prev, idx, 0)
  return idx - jax.lax.cummax(start, axis=1)


def attention_masks(q_idx, kv_idx, q_seg, kv_seg, sliding_window):
  """Causal (+ segment, + padding) masks for global and sliding-window layers.

  Args:
    q_idx: `[batch, time]` sequence index of each query.
    kv_idx: `[batch, kv_len]` sequence index of each key.
    q_seg: `[batch, time]` segment of each query.
    kv_seg: `[batch, kv_len]` segment of each key; 0 marks padding (never attended).
    sliding_window: window of local layers (`q - k < window`), or None.

  Returns:
    `(global_mask, local_mask)`, each `[batch, time, kv_len]` boolean.
  """
  q_i, k_i = q_idx[:, :, None], kv_idx[:, None, :]
  mask = (k_i <= q_i) & (q_seg[:, :, None] == kv_seg[:, None, :]) & (kv_seg[:, None, :] != 0)
  local = mask & (k_i > q_i - sliding_window) if sliding_window else mask
  return mask, local


def segments(tokens, segment_ids, attention_mask):
  """Segment ids `[batch, time]` (0: padding), and whether they are a mere padding mask."""
  if segment_ids is None and attention_mask is None:
    return jnp.ones(tokens.shape, jnp.int32), True
  if segment_ids is None:
    return (jnp.asarray(attention_mask) != 0).astype(jnp.int32), True
  seg = jnp.asarray(segment_ids, jnp.int32)
  if attention_mask is not None:
    seg = jnp.where(jnp.asarray(attention_mask) != 0, seg, 0)
  return seg, False


def sequence_masks(tokens, positions, segment_ids, attention_mask, sliding_window):
  """Rope positions and attention masks of a full-sequence forward (see `Gemma.__call__`).

  Returns:
    `(positions, (global_mask, local_mask))`; `positions` defaults to a running count of
    real tokens within each segment.
  """
  batch, time = tokens.shape
  seg, mask_only = segments(tokens, segment_ids, attention_mask)
  if positions is None:
    positions = default_positions(seg, from_mask_only=mask_only)
  idx = jnp.broadcast_to(jnp.arange(time, dtype=jnp.int32), (batch, time))
  return positions, attention_masks(idx, idx, seg, seg, sliding_window)


def decode_masks(time, cache_index, kv_mask, sliding_window):
  """Attention masks of `time` new tokens in cache slots `cache_index ...` (see `Gemma.decode`).

  Returns:
    `(global_mask, local_mask)`, each `[batch, time, max_len]` (`kv_mask`: `[batch, max_len]`).
  """
  batch, max_len = kv_mask.shape
  q_idx = jnp.broadcast_to(cache_index + jnp.arange(time, dtype=jnp.int32), (batch, time))
  kv_idx = jnp.broadcast_to(jnp.arange(max_len, dtype=jnp.int32), (batch, max_len))
  q_seg = jnp.ones((batch, time), jnp.int32)
  return attention_masks(q_idx, kv_idx, q_seg, kv_mask.astype(jnp.int32), sliding_window)


def init_cache(config: GemmaConfig, batch: int, max_len: int, dtype=None):
  """Zero key/value cache for `Gemma.decode`.

  Args:
    config: the model config.
    batch: batch size.
    max_len: number of slots (prompt length + tokens to generate).
    dtype: cache dtype; defaults to the compute dtype.

  Returns:
    `(k, v)`, each `[num_layers, batch, max_len, kv_heads, head_dim]`.
  """
  shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
  dtype = dtype or config.dtype
  return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


def token_embedding(config) -> nn.Embed:
  """The token embedding `embed_tokens` of a Gemma 1-4 config (normal(0.02) init)."""
  return nn.Embed(
    config.vocab_size,
    config.hidden_size,
    dtype=config.dtype,
    param_dtype=config.param_dtype,
    embedding_init=nn.initializers.normal(0.02),
  )


def output_head(config) -> nn.Dense | None:
  """The untied output projection `lm_head` of a Gemma 1-4 config (None when tied)."""
  if config.tie_word_embeddings:
    return None
  return nn.Dense(
    config.vocab_size, use_bias=False, dtype=config.dtype, param_dtype=config.param_dtype
  )


class TextDecoder(nn.Module):
  """What every Gemma text decoder shares: its two calls, the embedding scale and the head.

  A subclass builds `embed_tokens` (`token_embedding`), `norm` and `lm_head`
  (`output_head`) in `setup`, and runs its layers in `_run(tokens, positions, masks, cache,
  cache_index) -> (hidden, new_cache)`, embedding with `_embed`; the calls end with
  `_logits` (the final norm, then `_head`: the output head and soft-cap).
  The training job, the evaluator and `generate` use any subclass the same way.

  Attributes:
    config: the architecture (`GemmaConfig` or `Gemma4Config`).
  """

  config: Any

  def _embed(self, tokens):
    x = self.embed_tokens(tokens)
    return x * jnp.asarray(self.config.hidden_size**0.5, x.dtype)

  def _head(self, h):
    """fp32 soft-capped logits of normed hidden states `h` (the output head)."""
    logits = self.embed_tokens.attend(h) if self.lm_head is None else self.lm_head(h)
    return softcap(logits.astype(jnp.float32), self.config.final_logit_softcapping)

  def _logits(self, x):
    return self._head(self.norm(x))

  def features(self, tokens, positions=None, segment_ids=None, attention_mask=None):
    """The normed final hidden states `[batch, time, hidden]` (arguments as `__call__`).

    `__call__`'s logits are these through the output head (`lm_head`, or the tied
    `embed_tokens`), cast to fp32 and soft-capped by `config.final_logit_softcapping`: a
    loss can apply the head itself, a chunk of tokens at a time
    (`oftjax.train.linear_xent`), and never hold all the logits.
    """
    positions, masks = sequence_masks(
      tokens, positions, segment_ids, attention_mask, self.config.sliding_window
    )
    return self.norm(self._run(tokens, positions, masks)[0])

  def __call__(self, tokens, positions=None, segment_ids=None, attention_mask=None):
    """Computes logits for every position.

    Args:
      tokens: `[batch, time]` token ids.
      positions: `[batch, time]` rope positions; by default a running count of real tokens
        within each segment, starting at 0.
      segment_ids: `[batch, time]` packed-sequence ids; tokens attend only within their
        segment; 0 marks padding.
      attention_mask: `[batch, time]`, 1 for real tokens and 0 for padding (left or right).

    Returns:
      `[batch, time, vocab]` fp32 logits (padding positions hold meaningless values).
    """
    return self._head(self.features(tokens, positions, segment_ids, attention_mask))

  def decode(self, tokens, positions, cache, cache_index, kv_mask):
    """Runs new tokens against a key/value cache (prefill or one decode step).

    Slots are sequence indices: the tokens occupy slots `cache_index .. cache_index + time - 1`,
    and a query in slot `i` sees filled slots `j <= i` (and `i - j < window` on local layers).

    Args:
      tokens: `[batch, time]` new token ids.
      positions: `[batch, time]` their rope positions.
      cache: from the model's `init_cache` or a previous `decode`.
      cache_index: scalar int, the first slot written.
      kv_mask: `[batch, max_len]`, 1 for slots holding real tokens (including these ones).

    Returns:
      `(logits, cache)`: `[batch, time, vocab]` fp32 logits and the updated cache.
    """
    masks = decode_masks(tokens.shape[1], cache_index, kv_mask, self.config.sliding_window)
    x, cache = self._run(tokens, positions, masks, cache, cache_index)
    return self._logits(x), cache


def decoder_of(module) -> TextDecoder | None:
  """The Gemma decoder under any wrappers (each exposes its `wrapped`), or `None` for another model."""
  while not isinstance(module, TextDecoder):
    if not hasattr(module, "wrapped"):
      return None
    module = module.wrapped
  return module


class Gemma(TextDecoder):
  """Gemma 1/2/3 text decoder returning fp32 next-token logits, its layers under one scan.

  Attributes:
    config: the architecture (see `GemmaConfig`); `decode` takes the cache of `init_cache`.
  """

  config: GemmaConfig

  def setup(self):
    cfg = self.config
    self.embed_tokens = token_embedding(cfg)
    layer = remat.checkpointed(DecoderLayer, cfg.remat)
    self.layers = nn.scan(
      layer,
      variable_axes={"params": 0},
      split_rngs={"params": True, "dropout": True},
      in_axes=(0, nn.broadcast),
      length=cfg.num_layers,
      unroll=cfg.num_layers if cfg.unroll_layers else 1,
    )(cfg)
    self.norm = RMSNorm(cfg.rms_norm_eps, cfg.param_dtype)
    self.lm_head = output_head(cfg)

  def _run(self, tokens, positions, masks, cache=None, cache_index=None):
    cfg = self.config
    ropes = [
      rope_tables(positions, r, cfg.head_dim, cfg.dtype) for r in (cfg.rope_global, cfg.rope_local)
    ]
    is_sliding = jnp.asarray(cfg.layer_is_sliding, dtype=bool)
    shared = (ropes[0], ropes[1], masks[0], masks[1], cache_index)
    return self.layers(self._embed(tokens), (is_sliding, cache), shared)


def from_hf_config_model(
  hf_config, dtype=jnp.float32, param_dtype=None, remat: bool | str = False
) -> Gemma:
  """Builds a `Gemma` module from a Hugging Face config object (no weights).

  Args:
    hf_config: a transformers Gemma/Gemma2/Gemma3Text (or multimodal Gemma3) config.
    dtype: compute dtype.
    param_dtype: parameter dtype; defaults to `dtype`.
    remat: the decoder layers' rematerialisation policy, as in `oftjax.models.gemma.config.from_hf_config`.

  Returns:
    The Linen module; `model.config.hf_config` holds the text config.
  """
  from oftjax.models.gemma.config import from_hf_config

  return Gemma(from_hf_config(hf_config, dtype=dtype, param_dtype=param_dtype, remat=remat))


def init_params(model: Gemma, rng, batch: int = 1, time: int = 1):
  """Random parameters for `model` (norm scales zero, as in transformers).

  Args:
    model: a `Gemma` module.
    rng: a `jax.random` key.
    batch: batch size of the dummy input used for shape inference.
    time: length of the dummy input.

  Returns:
    The `params` tree.
  """
  tokens = jnp.zeros((batch, time), jnp.int32)
  return jax.jit(model.init)(rng, tokens)["params"]
