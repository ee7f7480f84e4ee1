"""A jitted training step that differentiates only the trainable (adapter) leaves.

The frozen tree is a plain argument: `jax.value_and_grad` is taken with respect to
the trainable tree alone, so XLA never computes a gradient of a frozen weight (the
backward still flows *through* frozen kernels to reach earlier adapters).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from oftjax import params as P

LossFn = Callable[..., Any]  # (full params, batch[, rng]) -> (scalar loss, aux dict)


def make_train_step(
  loss_fn: LossFn,
  optimizer: optax.GradientTransformation,
  has_aux: bool = False,
  donate: bool = True,
  accum_steps: int = 1,
  state_shardings: tuple[Any, Any] | None = None,
  weight_key: str | None = None,
  project: Callable[[Any], Any] | None = None,
  with_rng: bool = False,
):
  """Builds `step(trainable, opt_state, frozen, batch) -> (trainable, opt_state, loss, aux)`.

  With `with_rng` the step takes a fifth argument, the raw data of a PRNG key
  (`jax.random.key_data(key)`, a `uint32` array, so that a host NumPy value serves
  every process), and calls `loss_fn(params, batch, key)`; micro-batch `i` of an
  accumulated step gets `fold_in(key, i)`. For stochastic regularisers such as OFT's
  block dropout.

  Gradient accumulation: with `accum_steps = k > 1` every batch leaf has a leading
  axis of `k` micro-batches, of which one's activations live at a time. A loss that
  is a mean over terms (tokens) is only equal to the `k`-times batch's loss if each
  micro-batch counts with its number of terms: with `weight_key`, micro-batch `i`
  with `n_i = aux[weight_key]` terms and mean loss `l_i` contributes
  `n_i / Σn` of the loss, of the gradient and of every other `aux` entry, so the
  step's loss is `Σ(per-term losses) / Σn` and its gradient that of the big batch
  (`aux[weight_key]` itself is summed). Without it the micro-batches count equally
  (right only when they hold equal numbers of terms).

  Args:
    loss_fn: loss of the merged tree `merge_params(frozen, trainable)` on a batch.
    optimizer: applied to the trainable tree only.
    has_aux: whether `loss_fn` returns `(loss, aux)`.
    donate: donate the trainable tree and optimizer state buffers to the update.
    accum_steps: micro-batches per step (see above).
    state_shardings: `(trainable, opt_state)` shardings to keep on the outputs, so that
      a sharded step's results feed the next step unchanged (e.g. replicated adapters).
    weight_key: with `has_aux`, the `aux` entry counting the terms a micro-batch's
      loss averages (e.g. `'tokens'`); used when `accum_steps > 1`.
    with_rng: the step takes a key for `loss_fn` (see above).
    project: maps the trainable tree onto its constraint set (e.g. COFT's
      `oftjax.params.project_adapters`). Applied to the incoming tree before the
      forward and to the updated tree after the optimizer, so the stored parameter
      always is the projected one, as PEFT's in-place write-back leaves it.

  Returns:
    The jitted step. `aux` is `None` without `has_aux`. `loss` (and `aux`) are
    the step's means as above; a step whose loss or gradient is not finite leaves the
    trainable tree and optimizer state unchanged (`aux['skipped'] = 1` when
    `has_aux`).

  Raises:
    ValueError: `weight_key` without `has_aux`.
  """
  if weight_key is not None and not has_aux:
    raise ValueError("weight_key names an aux entry, so it needs has_aux=True")
  constrain = project or (lambda tree: tree)

  def grads_of(trainable, frozen, batch, key):
    def objective(t):
      params = P.merge_params(frozen, t)
      out = loss_fn(params, batch, key) if with_rng else loss_fn(params, batch)
      return out if has_aux else (out, {})

    return jax.value_and_grad(objective, has_aux=True)(trainable)

  def accumulated(trainable, frozen, batch, key):
    """Loss, aux and gradient of `accum_steps` micro-batches as one batch."""

    def micro(acc, mb_and_index):
      mb, i = mb_and_index
      (loss, a), g = grads_of(
        trainable, frozen, mb, None if key is None else jax.random.fold_in(key, i)
      )
      n = jnp.asarray(1.0 if weight_key is None else a[weight_key], jnp.float32)
      return jax.tree_util.tree_map(lambda s, x: s + n * x, acc, g), (n, loss, a)

    zeros = jax.tree_util.tree_map(jnp.zeros_like, trainable)
    summed, (counts, losses, auxes) = jax.lax.scan(micro, zeros, (batch, jnp.arange(accum_steps)))
    total = counts.sum()
    total = jnp.where(total > 0, total, 1.0)  # no term in any micro-batch: all weights 0
    weights = counts / total
    mean = lambda x: jnp.tensordot(weights, x.astype(jnp.float32), axes=1)
    aux = {k: counts.sum() if k == weight_key else mean(v) for k, v in auxes.items()}
    grads = jax.tree_util.tree_map(lambda s: s / total, summed)
    return (mean(losses), aux), grads

  def step(trainable, opt_state, frozen, batch, key_data=None):
    key = None if key_data is None else jax.random.wrap_key_data(key_data)
    trainable = constrain(trainable)
    if accum_steps == 1:
      (loss, aux), grads = grads_of(trainable, frozen, batch, key)
    else:
      (loss, aux), grads = accumulated(trainable, frozen, batch, key)
    updates, new_state = optimizer.update(grads, opt_state, trainable)
    new_trainable = constrain(optax.apply_updates(trainable, updates))
    finite = jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(grads))
    keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_trainable, new_state = keep(new_trainable, trainable), keep(new_state, opt_state)
    if has_aux:
      aux = {**aux, "grad_norm": optax.global_norm(grads), "skipped": (~finite).astype(jnp.int32)}
    return new_trainable, new_state, loss, (aux if has_aux else None)

  out = None if state_shardings is None else (*state_shardings, None, None)
  if with_rng:
    run = lambda trainable, opt_state, frozen, batch, key_data: step(
      trainable, opt_state, frozen, batch, key_data
    )
  else:
    run = lambda trainable, opt_state, frozen, batch: step(trainable, opt_state, frozen, batch)
  return jax.jit(run, donate_argnums=(0, 1) if donate else (), out_shardings=out)
