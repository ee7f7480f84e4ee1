"""Autoregressive generation with a key/value cache: greedy, or sampling (temperature, top-k, top-p).

The whole loop (prefill + `jax.lax.while_loop` of one-token decode steps) is one jitted
function per (model, prompt shape, max_new_tokens, number of EOS ids, token callback); the
sampling settings (`sampling.next_token`) and the EOS/pad ids are traced, so switching between
greedy and sampling does not recompile. A token callback streams each step's tokens to the
host while the compiled loop runs (`jax.experimental.io_callback`, ordered).

`model` may also be an `oftjax.Adapted` Gemma: generation then runs with unmerged
adapters, over whatever kernels `params` holds (quantized ones included, as in QOFT, under
`Adapted(quant.Dequantized(model), config)`), with no merged or dequantized copy of the model.
"""

from __future__ import annotations

import functools

import jax
from jax.experimental import io_callback
import jax.numpy as jnp
import numpy as np

from oftjax.models.gemma import gemma4_model, sampling
from oftjax.models.gemma.gemma4_config import Gemma4Config
from oftjax.models.gemma.model import Gemma, decoder_of, default_positions
from oftjax.models.gemma.model import init_cache as _gemma_init_cache

_DECODERS = (Gemma, gemma4_model.Gemma4)


def init_cache(config, batch: int, max_len: int, dtype=None):
  """Zero key/value cache for the `decode` of a `Gemma` or `Gemma4` with this config."""
  if isinstance(config, Gemma4Config):
    return gemma4_model.init_cache(config, batch, max_len, dtype)
  return _gemma_init_cache(config, batch, max_len, dtype)


def _decode(model, params, *args):
  """One `decode` call; through the wrapper's interceptor when adapters are attached."""
  if isinstance(model, _DECODERS):
    return model.apply({"params": params}, *args, method=type(model).decode)
  return model.apply({"params": params}, *args, method=lambda m, *a: m.call_method("decode", *a))


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "on_tokens"))
def _generate(
  params,
  tokens,
  mask,
  temperature,
  top_k,
  top_p,
  rng,
  eos_ids,
  pad,
  *,
  model,
  max_new_tokens,
  on_tokens,
):
  batch, prompt_len = tokens.shape
  total = prompt_len + max_new_tokens
  cache = init_cache(decoder_of(model).config, batch, total)
  kv_mask = jnp.zeros((batch, total), jnp.int32).at[:, :prompt_len].set(mask)
  positions = default_positions(mask, from_mask_only=True)
  logits, cache = _decode(model, params, tokens, positions, cache, 0, kv_mask)
  rng, sub = jax.random.split(rng)
  first = sampling.next_token(logits[:, -1], sub, temperature, top_k, top_p)
  out = jnp.full((batch, max_new_tokens), pad, jnp.int32)
  done = jnp.zeros((batch,), bool)

  def cond(state):
    step, _, _, _, _, _, done, _ = state
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(state):
    step, tok, pos, cache, kv_mask, out, done, rng = state
    emitted = jnp.where(done, pad, tok)
    out = out.at[:, step].set(emitted)
    if on_tokens is not None:
      io_callback(on_tokens, None, step, emitted, done, ordered=True)
    done = done | jnp.isin(tok, eos_ids)
    slot = prompt_len + step
    kv_mask = kv_mask.at[:, slot].set(1)
    pos = pos + 1
    logits, cache = _decode(model, params, tok[:, None], pos[:, None], cache, slot, kv_mask)
    rng, sub = jax.random.split(rng)
    tok = sampling.next_token(logits[:, -1], sub, temperature, top_k, top_p)
    return step + 1, tok, pos, cache, kv_mask, out, done, rng

  state = (jnp.int32(0), first, positions[:, -1], cache, kv_mask, out, done, rng)
  return jax.lax.while_loop(cond, body, state)[5]


def generate(
  model,
  params,
  prompt_tokens,
  prompt_mask=None,
  max_new_tokens: int = 32,
  temperature: float = 0.0,
  top_k: int | None = None,
  top_p: float | None = None,
  rng=None,
  eos_token_id=None,
  pad_token_id: int | None = None,
  on_tokens=None,
):
  """Generates continuations of a batch of prompts.

  Args:
    model: a `Gemma` or `Gemma4` module, or an `oftjax.Adapted` wrapping one (adapters
      unmerged).
    params: its parameters (with adapter leaves for a wrapped model).
    prompt_tokens: `[batch, prompt_len]` token ids; prompts of different lengths are padded
      (left or right; right-padded rows are moved to the left).
    prompt_mask: `[batch, prompt_len]`, 1 for real prompt tokens; default all ones.
    max_new_tokens: number of tokens to generate.
    temperature: 0 for greedy decoding, else the sampling temperature.
    top_k: sample among the `top_k` most likely tokens only (None: all).
    top_p: sample within the nucleus of probability `top_p` only (None: all); applied after
      the temperature and `top_k`, as in transformers.
    rng: `jax.random` key for sampling (default `jax.random.key(0)`).
    eos_token_id: an id or list of ids; a row stops after emitting one, and is padded after.
    pad_token_id: filler after EOS; defaults to `model.config.pad_token_id`.
    on_tokens: `on_tokens(step, tokens, finished)`, called on the host once per generated
      position, in order, while the loop runs (to stream): `tokens` is the `[batch]` column
      `step` of the result, `finished[i]` whether row `i` had already emitted an EOS (its
      token is then `pad_token_id`). The loop is compiled per callback object: pass the
      same one to calls that should share a compilation.

  Returns:
    `[batch, max_new_tokens]` int32 new tokens.

  Raises:
    ValueError: prompts that are not 2-D, or a sampling setting out of range.
  """
  tokens = jnp.asarray(prompt_tokens, jnp.int32)
  if tokens.ndim != 2:
    raise ValueError(f"prompt_tokens must be [batch, time], got shape {tokens.shape}")
  mask = (
    jnp.ones_like(tokens)
    if prompt_mask is None
    else (jnp.asarray(prompt_mask) != 0).astype(jnp.int32)
  )
  order = jnp.argsort(mask, axis=1, stable=True)  # padding first, real tokens keep their order
  tokens = jnp.take_along_axis(tokens, order, axis=1)
  mask = jnp.take_along_axis(mask, order, axis=1)
  if eos_token_id is None:
    eos = [-1]
  elif isinstance(eos_token_id, (int, np.integer)):
    eos = [int(eos_token_id)]
  else:
    eos = [int(e) for e in eos_token_id] or [-1]
  sampling.check_settings(temperature, top_k, top_p)
  pad = decoder_of(model).config.pad_token_id if pad_token_id is None else pad_token_id
  return _generate(
    params,
    tokens,
    mask,
    jnp.float32(temperature),
    jnp.int32(0 if top_k is None else top_k),
    jnp.float32(1.0 if top_p is None else top_p),
    jax.random.key(0) if rng is None else rng,
    jnp.asarray(eos, jnp.int32),
    jnp.int32(pad),
    model=model,
    max_new_tokens=int(max_new_tokens),
    on_tokens=on_tokens,
  )
