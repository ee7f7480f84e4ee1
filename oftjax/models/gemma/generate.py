"""Autoregressive sampling with a key/value cache: greedy, temperature and top-k.

The whole loop (prefill + `jax.lax.while_loop` of one-token decode steps) is one jitted
function per (model, max_new_tokens, top_k, eos, greedy) combination.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from oftjax.models.gemma.model import Gemma, init_cache


def _select(logits, rng, temperature, greedy: bool, top_k):
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "top_k", "eos", "pad", "greedy"))
def _generate(params, tokens, mask, temperature, rng, *, model, max_new_tokens, top_k, eos, pad, greedy):
    batch, prompt_len = tokens.shape
    total = prompt_len + max_new_tokens
    cache = init_cache(model.config, batch, total)
    kv_mask = jnp.zeros((batch, total), jnp.int32).at[:, :prompt_len].set(mask)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    logits, cache = model.apply(
        {"params": params}, tokens, positions, cache, 0, kv_mask, method=Gemma.decode
    )
    rng, sub = jax.random.split(rng)
    first = _select(logits[:, -1], sub, temperature, greedy, top_k)
    out = jnp.full((batch, max_new_tokens), pad, jnp.int32)
    done = jnp.zeros((batch,), bool)
    eos_ids = jnp.asarray(eos if eos else (-1,), jnp.int32)

    def cond(state):
        step, _, _, _, _, _, done, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, tok, pos, cache, kv_mask, out, done, rng = state
        out = out.at[:, step].set(jnp.where(done, pad, tok))
        done = done | jnp.isin(tok, eos_ids)
        slot = prompt_len + step
        kv_mask = kv_mask.at[:, slot].set(1)
        pos = pos + 1
        logits, cache = model.apply(
            {"params": params}, tok[:, None], pos[:, None], cache, slot, kv_mask, method=Gemma.decode
        )
        rng, sub = jax.random.split(rng)
        tok = _select(logits[:, -1], sub, temperature, greedy, top_k)
        return step + 1, tok, pos, cache, kv_mask, out, done, rng

    state = (jnp.int32(0), first, positions[:, -1], cache, kv_mask, out, done, rng)
    return jax.lax.while_loop(cond, body, state)[5]


def generate(
    model: Gemma,
    params,
    prompt_tokens,
    prompt_mask=None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    rng=None,
    eos_token_id=None,
    pad_token_id: int | None = None,
):
    """Generates continuations of a batch of prompts.

    Args:
      model: a `Gemma` module.
      params: its parameters.
      prompt_tokens: `[batch, prompt_len]` token ids; prompts of different lengths are padded
        (left or right; right-padded rows are moved to the left).
      prompt_mask: `[batch, prompt_len]`, 1 for real prompt tokens; default all ones.
      max_new_tokens: number of tokens to generate.
      temperature: 0 for greedy decoding, else the sampling temperature.
      top_k: sample among the `top_k` most likely tokens only (None: all).
      rng: `jax.random` key for sampling (default `jax.random.key(0)`).
      eos_token_id: an id or list of ids; a row stops after emitting one, and is padded after.
      pad_token_id: filler after EOS; defaults to `model.config.pad_token_id`.

    Returns:
      `[batch, max_new_tokens]` int32 new tokens.
    """
    tokens = jnp.asarray(prompt_tokens, jnp.int32)
    if tokens.ndim != 2:
        raise ValueError(f"prompt_tokens must be [batch, time], got shape {tokens.shape}")
    mask = jnp.ones_like(tokens) if prompt_mask is None else (jnp.asarray(prompt_mask) != 0).astype(jnp.int32)
    order = jnp.argsort(mask, axis=1, stable=True)  # padding first, real tokens keep their order
    tokens = jnp.take_along_axis(tokens, order, axis=1)
    mask = jnp.take_along_axis(mask, order, axis=1)
    if eos_token_id is None:
        eos = ()
    elif isinstance(eos_token_id, int):
        eos = (int(eos_token_id),)
    else:
        eos = tuple(int(e) for e in eos_token_id)
    greedy = temperature == 0.0
    return _generate(
        params,
        tokens,
        mask,
        jnp.float32(temperature if not greedy else 1.0),
        jax.random.key(0) if rng is None else rng,
        model=model,
        max_new_tokens=int(max_new_tokens),
        top_k=None if top_k is None else int(top_k),
        eos=eos,
        pad=int(model.config.pad_token_id if pad_token_id is None else pad_token_id),
        greedy=greedy,
    )
