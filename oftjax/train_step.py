"""A jitted training step that differentiates only the trainable (adapter) leaves.

The frozen tree is a plain argument: ``jax.value_and_grad`` is taken with respect to
the trainable tree alone, so XLA never computes a gradient of a frozen weight (the
backward still flows *through* frozen kernels to reach earlier adapters).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

from oftjax import params as P

LossFn = Callable[[Any, Any], Any]  # (full params, batch) -> scalar loss or (loss, aux)


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    has_aux: bool = False, donate: bool = True):
  """Builds ``step(trainable, opt_state, frozen, batch) -> (trainable, opt_state, loss, aux)``.

  Args:
    loss_fn: loss of the merged tree ``merge_params(frozen, trainable)`` on a batch.
    optimizer: applied to the trainable tree only.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    donate: donate the trainable tree and optimizer state buffers to the update.

  Returns:
    The jitted step. ``aux`` is ``None`` when ``has_aux`` is False.
  """

  def step(trainable, opt_state, frozen, batch):
    def objective(t):
      out = loss_fn(P.merge_params(frozen, t), batch)
      return out if has_aux else (out, None)

    (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss, aux

  return jax.jit(step, donate_argnums=(0, 1) if donate else ())
