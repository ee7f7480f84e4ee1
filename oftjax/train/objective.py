"""Optimizer schedule and the masked next-token loss used by the finetuning job.

One loss for training, evaluation and the asset builder: `next_token_loss`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from oftjax import layer
from oftjax.models.gemma.model import decoder_of
from oftjax.train import linear_xent


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


def _plain_head(params) -> tuple[jax.Array, bool] | None:
  """`(weight, transposed)` of the output head when it is a plain float matrix, else `None`.

  An adapted (adapter leaves beside the kernel) or quantized `lm_head` is not plain: only
  the module itself computes it right, so its loss goes through the full logits.
  """
  if "lm_head" in params:
    head = params["lm_head"]
    return (head["kernel"], True) if set(head) == {"kernel"} else None
  embed = params.get("embed_tokens", {})
  return (embed["embedding"], False) if set(embed) == {"embedding"} else None


def next_token_loss(
  module, params, batch: dict, rng=None, head_grad: bool = False
) -> tuple[jax.Array, dict]:
  """Masked next-token cross-entropy of `module` on a packed batch (`oftjax.data.batching`).

  On a Gemma decoder (wrapped or not) with a plain output head, the loss runs through the
  head a chunk of tokens at a time (`oftjax.train.linear_xent`: the same values, without
  holding the `[batch, time, vocab]` logits); any other model is `masked_xent` of its logits.

  Args:
    module: a Linen language model called as `module.apply({'params': params}, inputs,
      positions=..., segment_ids=...)` (a Gemma model or an `Adapted` one).
    params: its parameter tree.
    batch: `inputs`, `positions`, `segment_ids`, `targets` and `loss_mask`.
    rng: the `'dropout'` key of a stochastic module (OFT block dropout), or `None`.
    head_grad: the output head's weight is trained (full finetuning): give it a gradient.

  Returns:
    `(loss, {'token_accuracy', 'tokens'})` as `masked_xent`.
  """
  decoder, head = decoder_of(module), _plain_head(params)
  kwargs = dict(
    positions=batch["positions"],
    segment_ids=batch["segment_ids"],
    rngs=None if rng is None else {"dropout": rng},
  )
  if decoder is None or head is None:
    return masked_xent(module.apply({"params": params}, batch["inputs"], **kwargs), batch)
  hidden = module.apply(
    {"params": params},
    batch["inputs"],
    method=lambda m, *a, **k: layer.call_through(m, "features", *a, **k),
    **kwargs,
  )
  mask = batch["loss_mask"].astype(jnp.float32)
  nll, correct = linear_xent.linear_xent(
    hidden,
    head[0],
    batch["targets"],
    mask,
    transposed=head[1],
    softcap=decoder.config.final_logit_softcapping,
    head_grad=head_grad,
  )
  count = jnp.maximum(mask.sum(), 1.0)
  return nll / count, {"token_accuracy": correct / count, "tokens": mask.sum()}
