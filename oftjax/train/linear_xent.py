"""Cross-entropy through the output head, a chunk of tokens at a time: never all the logits.

At real vocabularies the logits dominate a train step's memory: Gemma's 262144 entries
make them 1 MiB per token in fp32, and the plain loss keeps about three such tensors (the
logits, their log-softmax, their gradient) for the whole batch. Here the head matmul, the
soft-cap, the log-sum-exp and the gradient are computed per chunk of `chunk_tokens(vocab)`
tokens inside one scan; the forward pass of the differentiated loss also computes the
gradient with respect to the hidden states (and, when asked, the head weight), which is
exact because the loss is the scalar end of the graph: the backward pass only scales it.
So no chunk's logits outlive their chunk, and no matmul is recomputed.

The same idea as Liger-Kernel's fused linear cross-entropy and MaxText's vocabulary
tiling; the values equal `masked_xent` of the full logits to fp32 rounding
(`tests/test_linear_xent.py`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

CHUNK_ELEMENTS = 1 << 25  # fp32 logits of one chunk: 128 MiB


def chunk_tokens(vocab: int) -> int:
  """Tokens per chunk: `CHUNK_ELEMENTS` logits (at least one token)."""
  return max(1, CHUNK_ELEMENTS // vocab)


def _chunk_logits(h, w, transposed: bool, cap):
  """fp32 (soft-capped) logits of `h [n, d]` by `w` (`[vocab, d]`, or `[d, vocab]` if transposed)."""
  raw = (h @ w if transposed else h @ w.T).astype(jnp.float32)
  return raw if cap is None else jnp.tanh(raw / cap) * cap


def _chunk(h, w, targets, weights, transposed, cap, grads: bool, w_grad: bool):
  """One chunk: `(nll sum, correct count)`, with `grads` also `(dh, dw or None)`."""
  logits = _chunk_logits(h, w, transposed, cap)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
  nll = jnp.sum((lse - target_logit) * weights)
  correct = jnp.sum((jnp.argmax(logits, axis=-1) == targets) * weights)
  if not grads:
    return nll, correct, None, None
  probs = jnp.exp(logits - lse[:, None])
  d_logits = probs - jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32)
  d_logits = d_logits * weights[:, None]
  if cap is not None:  # d(cap * tanh(z / cap)) / dz = 1 - tanh^2
    d_logits = d_logits * (1.0 - (logits / cap) ** 2)
  d_logits = d_logits.astype(h.dtype)
  dh = d_logits @ w.T if transposed else d_logits @ w
  dw = None
  if w_grad:
    dw = (h.T @ d_logits if transposed else d_logits.T @ h).astype(jnp.float32)
  return nll, correct, dh, dw


def _scan(h, w, targets, weights, transposed, cap, grads, w_grad):
  """`_chunk` over the chunks of the flattened tokens: sums, and the gradients if `grads`."""
  n, d = h.shape
  size = min(chunk_tokens(w.shape[1] if transposed else w.shape[0]), n)
  pad = -n % size
  split = lambda x: jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape(-1, size, *x.shape[1:])
  chunks = (split(h), split(targets), split(weights))

  def body(carry, chunk):
    nll, correct, dw = carry
    c_nll, c_correct, dh, c_dw = _chunk(*chunk[:1], w, *chunk[1:], transposed, cap, grads, w_grad)
    dw = dw + c_dw if w_grad else dw
    return (nll + c_nll, correct + c_correct, dw), dh

  zero = jnp.zeros((), jnp.float32)
  dw0 = jnp.zeros(w.shape, jnp.float32) if w_grad else None
  (nll, correct, dw), dh = jax.lax.scan(body, (zero, zero, dw0), chunks)
  if grads:
    dh = dh.reshape(-1, d)[:n]
  return nll, correct, dh, dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _linear_xent(h, w, targets, weights, transposed, cap, w_grad):
  return _scan(h, w, targets, weights, transposed, cap, False, False)[:2]


def _fwd(h, w, targets, weights, transposed, cap, w_grad):
  nll, correct, dh, dw = _scan(h, w, targets, weights, transposed, cap, True, w_grad)
  return (nll, correct), (dh, dw, w)


def _bwd(transposed, cap, w_grad, residuals, cotangents):
  dh, dw, w = residuals
  g = cotangents[0]
  dw = (g * dw).astype(w.dtype) if w_grad else jnp.zeros_like(w)
  return (g * dh).astype(dh.dtype), dw, None, None


_linear_xent.defvjp(_fwd, _bwd)


def linear_xent(
  hidden: jax.Array,
  head: jax.Array,
  targets: jax.Array,
  weights: jax.Array,
  *,
  transposed: bool = False,
  softcap: float | None = None,
  head_grad: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Weighted cross-entropy sum and correct-argmax count of `softcap(hidden @ head)`.

  Args:
    hidden: `[..., d]` normed final hidden states (`TextDecoder.features`).
    head: the output head: `[vocab, d]` (a tied embedding), or `[d, vocab]` (an
      `lm_head` kernel) with `transposed`.
    targets: `[...]` int target ids.
    weights: `[...]` float loss weights (the loss mask).
    transposed: `head` is `[d, vocab]`.
    softcap: the final logit soft-cap (`tanh(z / cap) * cap`), or `None`.
    head_grad: also give the head weight its gradient (it is trained); otherwise its
      cotangent is zero and never computed.

  Returns:
    `(sum of weights * nll, sum of weights * [argmax == target])`, fp32 scalars;
    differentiable in `hidden` (and `head` with `head_grad`).
  """
  d = hidden.shape[-1]
  return _linear_xent(
    hidden.reshape(-1, d),
    head.astype(hidden.dtype),  # once, outside the chunk scan: as the head module computes
    targets.reshape(-1).astype(jnp.int32),
    weights.reshape(-1).astype(jnp.float32),
    transposed,
    softcap,
    head_grad,
  )
