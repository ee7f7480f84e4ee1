"""Optimizer schedule and the masked next-token loss used by the finetuning job.

One loss for training, evaluation and the asset builder: `next_token_loss`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def lr_schedule(lr: float, steps: int, warmup_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `lr` then cosine decay to 10% of `lr` at `steps`.

  The update after `k` applied updates uses `schedule(k)` (optax counts from 0).
  """
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0, peak_value=lr, warmup_steps=warmup_steps, decay_steps=steps, end_value=lr * 0.1
  )


def make_optimizer(
  lr: float, steps: int, warmup_steps: int, weight_decay: float, clip_norm: float
) -> optax.GradientTransformation:
  """AdamW on `lr_schedule`, after global-norm clipping."""
  schedule = lr_schedule(lr, steps, warmup_steps)
  parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm > 0 else []
  return optax.chain(*parts, optax.adamw(schedule, weight_decay=weight_decay))


def masked_xent(logits: jax.Array, batch: dict) -> tuple[jax.Array, dict]:
  """Mean cross-entropy over `loss_mask` positions, plus token accuracy and count.

  Args:
    logits: `[batch, time, vocab]` predictions for `batch['inputs']`.
    batch: `targets` (int) and `loss_mask` (float) aligned with the inputs.
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
  mask = batch["loss_mask"].astype(jnp.float32)
  count = jnp.maximum(mask.sum(), 1.0)
  correct = (jnp.argmax(logits, axis=-1) == batch["targets"]) * mask
  return (nll * mask).sum() / count, {"token_accuracy": correct.sum() / count, "tokens": mask.sum()}


def next_token_loss(module, params, batch: dict, rng=None) -> tuple[jax.Array, dict]:
  """`masked_xent` of `module`'s logits on a packed batch (`oftjax.data.batching`).

  Args:
    module: a Linen language model called as `module.apply({'params': params}, inputs,
      positions=..., segment_ids=...)` (a Gemma model or an `Adapted` one).
    params: its parameter tree.
    batch: `inputs`, `positions`, `segment_ids`, `targets` and `loss_mask`.
    rng: the `'dropout'` key of a stochastic module (OFT block dropout), or `None`.

  Returns:
    `(loss, {'token_accuracy', 'tokens'})` as `masked_xent`.
  """
  logits = module.apply(
    {"params": params},
    batch["inputs"],
    positions=batch["positions"],
    segment_ids=batch["segment_ids"],
    rngs=None if rng is None else {"dropout": rng},
  )
  return masked_xent(logits, batch)
