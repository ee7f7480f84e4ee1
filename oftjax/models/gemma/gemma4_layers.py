"""Gemma 4 building blocks in Flax Linen: RMSNorm, attention, MLP and the decoder layer.

Names follow Hugging Face (`self_attn/q_proj`, `mlp/down_proj`, `input_layernorm`,
`per_layer_input_gate`, `layer_scalar`, and, with the MoE block, `router/proj`,
`experts/...` directly in the layer) so that regex targets written for PyTorch carry over.
What differs from Gemma 1-3 (transformers 5.24, eager):

- every RMSNorm is `x / rms(x) * w` (weight initialised to ones), not `(1 + w)`; values
  get a scale-free RMSNorm too; attention scores are not scaled (the q/k norms do it);
- a layer's attention geometry (head width, key/value heads, rope) is its type's;
  full layers with `attention_k_eq_v` take their values from the raw key projection;
- a KV-shared layer has no key/value projections: it attends with the keys and values of
  the last earlier layer of its type (passed in), and writes no cache;
- after the MLP, a per-layer-embedding (PLE) block adds `norm(proj(act(gate(x)) * ple))`,
  and the layer's output (residual included) is multiplied by `layer_scalar`.

References:
  transformers `models/gemma4/modeling_gemma4.py` (`Gemma4TextAttention`,
  `Gemma4TextDecoderLayer`), 5.24.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from oftjax.models.gemma.gemma4_config import Gemma4Config
from oftjax.models.gemma.gemma4_schedule import LayerKind
from oftjax.models.gemma.layers import MLP, apply_rope, gelu, write_cache

Array = Any


class Gemma4RMSNorm(nn.Module):
  """Gemma 4 RMSNorm: `x / rms(x) * scale` in fp32, cast back to the input dtype.

  Attributes:
    eps: epsilon added to the mean square.
    param_dtype: dtype of `scale` (ones at init).
    with_scale: False for the scale-free norm of values (no parameter).
  """

  eps: float = 1e-6
  param_dtype: Any = jnp.float32
  with_scale: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
    if self.with_scale:
      scale = self.param("scale", nn.initializers.ones_init(), (x.shape[-1],), self.param_dtype)
      normed = normed * scale.astype(jnp.float32)
    return normed.astype(x.dtype)


def attend(q: Array, k: Array, v: Array, mask: Array) -> Array:
  """Unscaled grouped-query attention with an fp32 softmax.

  Args:
    q: `[batch, time, heads, head_dim]` queries.
    k: `[batch, kv_len, kv_heads, head_dim]` keys.
    v: `[batch, kv_len, kv_heads, head_dim]` values.
    mask: `[batch, time, kv_len]` boolean; True where a query may see a key.

  Returns:
    `[batch, time, heads, head_dim]`; query head `h` uses key/value head
    `h // (heads // kv_heads)`, as transformers' `repeat_kv`.
  """
  batch, time, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(batch, time, kv_heads, heads // kv_heads, head_dim)
  scores = jnp.einsum("btkgh,bskh->bkgts", q, k).astype(jnp.float32)
  scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
  return out.reshape(batch, time, heads, head_dim)


class Gemma4Attention(nn.Module):
  """Self-attention of one Gemma 4 layer (its geometry is its kind's).

  Attributes:
    config: the model config.
    kind: the layer's kind (attention type, KV-shared or not).
  """

  config: Gemma4Config
  kind: LayerKind

  @nn.compact
  def __call__(self, x, cos, sin, mask, shared_kv=None, cache=None, cache_index=None):
    """Attends over the sequence, or over a key/value cache when one is given.

    Args:
      x: `[batch, time, hidden]` normalised inputs.
      cos: `[batch, time, head_dim]` rope table of this layer type.
      sin: `[batch, time, head_dim]` rope table of this layer type.
      mask: `[batch, time, kv_len]` boolean.
      shared_kv: for a KV-shared layer, the `(k, v)` it attends with (`[batch, kv_len,
        kv_heads, head_dim]`, rope and norms applied); else None.
      cache: None, or `(k, v)` each `[batch, max_len, kv_heads, head_dim]` (not for
        KV-shared layers).
      cache_index: scalar slot where these tokens' keys/values are written.

    Returns:
      `(y, (k, v), new_cache)`: `y` `[batch, time, hidden]`; the keys/values attended with
      (the whole cache when there is one), for later KV-shared layers; the updated cache,
      or None.
    """
    cfg, kind = self.config, self.kind
    geom = cfg.geometry(kind.sliding)
    dense = dict(use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype)

    def norm(name, with_scale=True):
      return Gemma4RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, with_scale, name=name)

    q = nn.DenseGeneral((cfg.num_heads, geom.head_dim), name="q_proj", **dense)(x)
    q = apply_rope(norm("q_norm")(q), cos, sin)
    new_cache = None
    if kind.kv_shared:
      k, v = shared_kv
    else:
      kv_features = (geom.num_kv_heads, geom.head_dim)
      k = nn.DenseGeneral(kv_features, name="k_proj", **dense)(x)
      v = k if geom.k_eq_v else nn.DenseGeneral(kv_features, name="v_proj", **dense)(x)
      k = apply_rope(norm("k_norm")(k), cos, sin)
      v = norm("v_norm", with_scale=False)(v)
      if cache is not None:
        k, v = new_cache = write_cache(cache, k, v, cache_index)
    out = attend(q, k.astype(q.dtype), v.astype(q.dtype), mask)
    y = nn.DenseGeneral(cfg.hidden_size, axis=(-2, -1), name="o_proj", **dense)(out)
    return y, (k, v), new_cache


def mlp_width(config: Gemma4Config, kind: LayerKind) -> int:
  """The dense MLP width of a layer of `kind` (doubled on KV-shared double-wide layers)."""
  double = config.use_double_wide_mlp and kind.kv_shared
  return config.intermediate_size * (2 if double else 1)


def moe_module():
  """The module of the MoE branch (`gemma4_moe`: its Linen block and its tensor table).

  Raises:
    ValueError: this installation lacks it.
  """
  try:
    from oftjax.models.gemma import gemma4_moe
  except ImportError:  # the MoE branch lives in its own module, added separately
    raise ValueError(
      "enable_moe_block=True needs oftjax.models.gemma.gemma4_moe, which this installation lacks"
    ) from None
  return gemma4_moe


def _moe_block(config: Gemma4Config):
  """The MoE branch (router, experts and their norms) of a layer, or None without MoE."""
  if not config.enable_moe_block:
    return None
  return moe_module().Gemma4MoE(
    hidden_size=config.hidden_size,
    num_experts=config.num_experts,
    top_k=config.top_k_experts,
    moe_intermediate_size=config.moe_intermediate_size,
    activation=config.activation,
    eps=config.rms_norm_eps,
    implementation=config.moe_implementation,
    dtype=config.dtype,
    param_dtype=config.param_dtype,
  )


class Gemma4DecoderLayer(nn.Module):
  """One Gemma 4 decoder layer.

  `x + post_norm(attn(norm(x)))`, then `x + post_ff_norm(mlp(pre_ff_norm(x)))` (with MoE:
  `post_ff_norm(post_ff_norm_1(mlp(...)) + moe(x))`), then the PLE block, then
  `* layer_scalar`. The MoE branch shares this layer's scope, so its parameters sit
  beside `mlp` as in Hugging Face (`router/proj`, `experts/gate_up_proj`, ...).

  Attributes:
    config: the model config.
    kind: the layer's kind.
  """

  config: Gemma4Config
  kind: LayerKind

  def setup(self):
    moe = _moe_block(self.config)
    if moe is not None:
      self.moe = moe
      nn.share_scope(self, self.moe)

  @nn.compact
  def __call__(self, x, per_layer_input, context, shared_kv=None, cache=None):
    """Applies the layer.

    Args:
      x: `[batch, time, hidden]` residual stream.
      per_layer_input: `[batch, time, per_layer_input_size]` this layer's PLE input, or
        None without PLE.
      context: `{'sliding' | 'full': (cos, sin, mask), 'cache_index': slot or None}`.
      shared_kv: `(k, v)` for a KV-shared layer (see `Gemma4Attention`), else None.
      cache: None or this layer's `(k, v)` cache.

    Returns:
      `(x, (k, v), new_cache)`.
    """
    cfg, kind = self.config, self.kind
    cos, sin, mask = context["sliding" if kind.sliding else "full"]

    def norm(name):
      return Gemma4RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, name=name)

    h = norm("input_layernorm")(x)
    h, kv, new_cache = Gemma4Attention(cfg, kind, name="self_attn")(
      h, cos, sin, mask, shared_kv, cache, context["cache_index"]
    )
    x = x + norm("post_attention_layernorm")(h)
    h = MLP(cfg, mlp_width(cfg, kind), name="mlp")(norm("pre_feedforward_layernorm")(x))
    if cfg.enable_moe_block:
      h = norm("post_feedforward_layernorm_1")(h) + self.moe(x)
    x = x + norm("post_feedforward_layernorm")(h)
    if cfg.per_layer_input_size:
      dense = dict(use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
      h = nn.Dense(cfg.per_layer_input_size, name="per_layer_input_gate", **dense)(x)
      h = gelu(h, cfg.activation) * per_layer_input
      h = nn.Dense(cfg.hidden_size, name="per_layer_projection", **dense)(h)
      x = x + norm("post_per_layer_input_norm")(h)
    scalar = self.param("layer_scalar", nn.initializers.ones_init(), (1,), cfg.param_dtype)
    return x * scalar.astype(x.dtype), kv, new_cache
