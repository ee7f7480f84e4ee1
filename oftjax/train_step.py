"""A jitted training step that differentiates only the trainable (adapter) leaves.

The frozen tree is a plain argument: ``jax.value_and_grad`` is taken with respect to
the trainable tree alone, so XLA never computes a gradient of a frozen weight (the
backward still flows *through* frozen kernels to reach earlier adapters).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from oftjax import params as P

LossFn = Callable[[Any, Any], Any]  # (full params, batch) -> (scalar loss, aux dict)


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    has_aux: bool = False, donate: bool = True, accum_steps: int = 1,
                    state_shardings: tuple[Any, Any] | None = None):
  """Builds ``step(trainable, opt_state, frozen, batch) -> (trainable, opt_state, loss, aux)``.

  Args:
    loss_fn: loss of the merged tree ``merge_params(frozen, trainable)`` on a batch.
    optimizer: applied to the trainable tree only.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    donate: donate the trainable tree and optimizer state buffers to the update.
    accum_steps: if > 1, every batch leaf has a leading axis of this many micro-batches;
      their gradients are averaged (one micro-batch's activations live at a time).
    state_shardings: ``(trainable, opt_state)`` shardings to keep on the outputs, so that
      a sharded step's results feed the next step unchanged (e.g. replicated adapters).

  Returns:
    The jitted step. ``aux`` is ``None`` without ``has_aux`` (micro-batch mean otherwise).
    ``loss`` is the micro-batch mean; a step whose loss or gradient is not finite
    leaves the trainable tree and optimizer state unchanged (``aux['skipped'] = 1``
    when ``has_aux``).
  """

  def grads_of(trainable, frozen, batch):
    def objective(t):
      out = loss_fn(P.merge_params(frozen, t), batch)
      return out if has_aux else (out, {})

    return jax.value_and_grad(objective, has_aux=True)(trainable)

  def step(trainable, opt_state, frozen, batch):
    if accum_steps == 1:
      (loss, aux), grads = grads_of(trainable, frozen, batch)
    else:
      def micro(acc, mb):
        (l, a), g = grads_of(trainable, frozen, mb)
        return jax.tree_util.tree_map(jnp.add, acc, g), (l, a)

      zeros = jax.tree_util.tree_map(jnp.zeros_like, trainable)
      grads, (losses, auxes) = jax.lax.scan(micro, zeros, batch)
      grads = jax.tree_util.tree_map(lambda g: g / accum_steps, grads)
      loss = jnp.mean(losses)
      aux = jax.tree_util.tree_map(lambda a: jnp.mean(a, axis=0), auxes)
    updates, new_state = optimizer.update(grads, opt_state, trainable)
    new_trainable = optax.apply_updates(trainable, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(grads))
    keep = lambda new, old: jax.tree_util.tree_map(  # noqa: E731
        lambda n, o: jnp.where(finite, n, o), new, old)
    new_trainable, new_state = keep(new_trainable, trainable), keep(new_state, opt_state)
    if has_aux:
      aux = {**aux, "grad_norm": optax.global_norm(grads),
             "skipped": (~finite).astype(jnp.int32)}
    return new_trainable, new_state, loss, (aux if has_aux else None)

  out = None if state_shardings is None else (*state_shardings, None, None)
  return jax.jit(step, donate_argnums=(0, 1) if donate else (), out_shardings=out)
