"""Gemma building blocks in Flax Linen: RMSNorm, rotary embeddings, attention, MLP, decoder layer.

Module and parameter names follow Hugging Face (`self_attn/q_proj`, `mlp/down_proj`,
`input_layernorm`, ...) so that regex targets written for PyTorch models carry over.
Numerics follow `transformers`' eager implementation (RMSNorm in fp32 with `(1 + w)`,
softmax in fp32, rope tables in fp32 cast to the compute dtype).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from oftjax.models.gemma.config import GemmaConfig, RopeConfig

Array = Any


class RMSNorm(nn.Module):
  """Gemma RMSNorm: `x / rms(x) * (1 + scale)`, computed in fp32, cast back to the input dtype.

  Attributes:
    eps: epsilon added to the mean square.
    param_dtype: dtype of `scale` (zeros at init, so the norm starts as the identity scale).
  """

  eps: float = 1e-6
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1],), self.param_dtype)
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
    return (normed * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> np.ndarray:
  """Inverse frequencies of a rope table, in fp32 as transformers computes them.

  Args:
    rope: base and linear scaling factor.
    head_dim: width of a head (rotated in two halves).

  Returns:
    `[head_dim // 2]` float32 inverse frequencies (divided by the linear factor).
  """
  exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
  inv = np.float32(1.0) / (np.float32(rope.theta) ** exponents)
  return (inv / np.float32(rope.factor)).astype(np.float32)


def rope_tables(positions: Array, rope: RopeConfig, head_dim: int, dtype) -> tuple[Array, Array]:
  """Cos and sin tables for given positions.

  Args:
    positions: `[batch, time]` integer positions.
    rope: rope parameters.
    head_dim: head width.
    dtype: compute dtype the tables are cast to.

  Returns:
    `(cos, sin)`, each `[batch, time, head_dim]`.
  """
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(rope, head_dim))
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """Rotates `x` `[batch, time, heads, head_dim]` by rope tables `[batch, time, head_dim]`."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def softcap(x: Array, cap: float | None) -> Array:
  """`tanh(x / cap) * cap` (Gemma 2's logit soft-capping); `x` itself without a cap."""
  if cap is None:
    return x
  return jnp.tanh(x / cap) * cap


def write_cache(cache, k: Array, v: Array, cache_index) -> tuple[Array, Array]:
  """Writes new keys/values into a key/value cache from slot `cache_index` on.

  Args:
    cache: `(k_cache, v_cache)`, each `[batch, max_len, kv_heads, head_dim]`.
    k: `[batch, time, kv_heads, head_dim]` keys of the new tokens.
    v: their values, shaped as `k`.
    cache_index: scalar slot of the first new token.

  Returns:
    The updated `(k_cache, v_cache)`, in the cache's dtype.
  """
  return tuple(
    jax.lax.dynamic_update_slice_in_dim(c, x.astype(c.dtype), cache_index, axis=1)
    for c, x in zip(cache, (k, v))
  )


class Attention(nn.Module):
  """Multi-head attention with GQA/MQA, optional QK-norm and logit soft-capping.

  Attributes:
    config: the model config.
  """

  config: GemmaConfig

  @nn.compact
  def __call__(self, x: Array, cos: Array, sin: Array, mask: Array, cache=None, cache_index=None):
    """Attends over the sequence (training path) or over a key/value cache (decode path).

    Args:
      x: `[batch, time, hidden]` normalised inputs.
      cos: `[batch, time, head_dim]` rope table for these tokens.
      sin: `[batch, time, head_dim]` rope table for these tokens.
      mask: `[batch, time, kv_len]` boolean; True where a query may see a key.
      cache: None, or `(k, v)` each `[batch, max_len, kv_heads, head_dim]`.
      cache_index: scalar slot where these tokens' keys/values are written (with a cache).

    Returns:
      `(y, new_cache)`: `y` is `[batch, time, hidden]`; `new_cache` is None without a cache.
    """
    cfg = self.config
    dense = dict(use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    q = nn.DenseGeneral(features=(cfg.num_heads, cfg.head_dim), name="q_proj", **dense)(x)
    k = nn.DenseGeneral(features=(cfg.num_kv_heads, cfg.head_dim), name="k_proj", **dense)(x)
    v = nn.DenseGeneral(features=(cfg.num_kv_heads, cfg.head_dim), name="v_proj", **dense)(x)
    if cfg.has_qk_norm:
      q = RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, name="q_norm")(q)
      k = RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, name="k_norm")(k)
    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)

    new_cache = None
    if cache is not None:
      new_cache = write_cache(cache, k, v, cache_index)
      k, v = (c.astype(q.dtype) for c in new_cache)

    batch, time = q.shape[:2]
    groups = cfg.num_heads // cfg.num_kv_heads
    q = q.reshape(batch, time, cfg.num_kv_heads, groups, cfg.head_dim)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k) * jnp.asarray(
      cfg.query_pre_attn_scalar**-0.5, q.dtype
    )
    scores = softcap(scores, cfg.attn_logit_softcapping)
    scores = scores.astype(jnp.float32)
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(
      batch, time, cfg.num_heads, cfg.head_dim
    )
    y = nn.DenseGeneral(features=cfg.hidden_size, axis=(-2, -1), name="o_proj", **dense)(out)
    return y, new_cache


def gelu(x: Array, activation: str) -> Array:
  """The GeLU a Hugging Face activation name stands for (tanh approximation but 'gelu')."""
  return jax.nn.gelu(x, approximate=activation != "gelu")


class MLP(nn.Module):
  """Gated GeLU MLP: `down_proj(act(gate_proj(x)) * up_proj(x))`.

  Attributes:
    config: the model config (a `GemmaConfig` or `Gemma4Config`: its `hidden_size`,
      `intermediate_size`, `activation`, `dtype` and `param_dtype` are read).
    width: the intermediate width; `config.intermediate_size` when None.
  """

  config: GemmaConfig
  width: int | None = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    width = self.width or cfg.intermediate_size
    dense = dict(use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    gate = nn.Dense(width, name="gate_proj", **dense)(x)
    up = nn.Dense(width, name="up_proj", **dense)(x)
    return nn.Dense(cfg.hidden_size, name="down_proj", **dense)(gelu(gate, cfg.activation) * up)


class DecoderLayer(nn.Module):
  """One Gemma decoder layer, written to be scanned over the layer axis.

  Gemma 1: `x + attn(norm(x))`, then `x + mlp(norm(x))` (the pre-MLP norm is HF's
  `post_attention_layernorm`). Gemma 2/3 add post-attention and post-MLP norms.

  Attributes:
    config: the model config.
  """

  config: GemmaConfig

  @nn.compact
  def __call__(self, x: Array, layer_xs, shared):
    """Applies the layer.

    Args:
      x: `[batch, time, hidden]` residual stream (the scan carry).
      layer_xs: `(is_sliding, cache)` for this layer: a boolean scalar and None or `(k, v)`.
      shared: `(rope_global, rope_local, mask_global, mask_local, cache_index)` broadcast to all
        layers; each rope entry is a `(cos, sin)` pair.

    Returns:
      `(x, new_cache)`.
    """
    cfg = self.config
    is_sliding, cache = layer_xs
    (cos_g, sin_g), (cos_l, sin_l), mask_g, mask_l, cache_index = shared
    if any(cfg.layer_is_sliding):
      cos = jnp.where(is_sliding, cos_l, cos_g)
      sin = jnp.where(is_sliding, sin_l, sin_g)
      mask = jnp.where(is_sliding, mask_l, mask_g)
    else:
      cos, sin, mask = cos_g, sin_g, mask_g

    def norm(name):
      return RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, name=name)

    h = norm("input_layernorm")(x)
    h, new_cache = Attention(cfg, name="self_attn")(h, cos, sin, mask, cache, cache_index)
    if cfg.has_post_norms:
      h = norm("post_attention_layernorm")(h)
      x = x + h
      h = norm("pre_feedforward_layernorm")(x)
      h = MLP(cfg, name="mlp")(h)
      h = norm("post_feedforward_layernorm")(h)
    else:
      x = x + h
      h = norm("post_attention_layernorm")(x)
      h = MLP(cfg, name="mlp")(h)
    return x + h, new_cache
