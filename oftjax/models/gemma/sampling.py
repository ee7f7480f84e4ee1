"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p.

The filters follow Hugging Face's logits warpers in meaning and order (temperature, then top-k,
then top-p); each keeps the tokens tied with its last kept one. Every setting is a traced value,
so one compiled decode loop serves greedy decoding and any sampling setting.

References:
  Holtzman et al. "The Curious Case of Neural Text Degeneration" (nucleus / top-p sampling),
  arXiv:1904.09751; transformers' `TopKLogitsWarper` and `TopPLogitsWarper`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def top_k_filter(logits: jax.Array, top_k) -> jax.Array:
  """Keeps the `top_k` largest logits of the last axis, sets the others to `-inf`.

  Args:
    logits: `[..., vocab]`.
    top_k: an int (may be traced); `top_k <= 0` or `>= vocab` keeps every token.

  Returns:
    `logits` with the tokens below the `top_k`-th largest set to `-inf` (ties kept).
  """
  vocab = logits.shape[-1]
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
  kth = jnp.take_along_axis(
    jnp.sort(logits, axis=-1), jnp.broadcast_to(vocab - k, logits.shape[:-1] + (1,)), axis=-1
  )
  return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, top_p) -> jax.Array:
  """Keeps the nucleus: the fewest most likely tokens whose probabilities sum to `top_p`.

  A token is kept when the tokens ranked strictly above it hold less than `top_p` of the
  probability (`softmax(logits)`), so the most likely token is always kept.

  Args:
    logits: `[..., vocab]` (already divided by the temperature, `-inf` allowed).
    top_p: a float in (0, 1] (may be traced); `top_p >= 1` keeps every token.

  Returns:
    `logits` with the tokens outside the nucleus set to `-inf` (ties with its last kept).
  """
  ranked = -jnp.sort(-logits, axis=-1)  # descending
  probs = jax.nn.softmax(ranked, axis=-1)
  above = jnp.cumsum(probs, axis=-1) - probs  # probability of the better-ranked tokens
  count = jnp.sum(above < top_p, axis=-1, keepdims=True)
  last_kept = jnp.take_along_axis(ranked, jnp.maximum(count, 1) - 1, axis=-1)
  return jnp.where((top_p < 1) & (logits < last_kept), -jnp.inf, logits)


def next_token(logits: jax.Array, rng: jax.Array, temperature, top_k, top_p) -> jax.Array:
  """The next token of each row: greedy when `temperature == 0`, else a filtered sample.

  Args:
    logits: `[batch, vocab]` logits of the next position.
    rng: a `jax.random` key (unused when greedy).
    temperature: float (may be traced); 0 selects the argmax.
    top_k: int (may be traced); sample among the `top_k` most likely (`<= 0`: all).
    top_p: float (may be traced); sample within the `top_p` nucleus (`>= 1`: all).

  Returns:
    `[batch]` int32 token ids.
  """

  def greedy(_):
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def sample(_):  # the vocabulary sorts run only when sampling
    scaled = top_p_filter(top_k_filter(logits / temperature, top_k), top_p)
    return jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)

  return jax.lax.cond(temperature > 0, sample, greedy, None)


def check_settings(temperature: float, top_k: int | None, top_p: float | None) -> None:
  """Raises `ValueError` (one line) for a sampling setting outside its range."""
  if not temperature >= 0 or temperature == float("inf"):
    raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
  if top_k is not None and top_k < 1:
    raise ValueError(f"top_k must be >= 1, got {top_k}")
  if top_p is not None and not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
