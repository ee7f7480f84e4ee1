"""The training loop of the finetuning job: compiled step, logging, checkpoints, clean stops."""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from oftjax import distributed, sharding
from oftjax.train.config import UsageError


ORTHOGONALITY_TOLERANCE = 1e-2  # max|RᵀR−I| beyond which R visibly stops being a rotation


@dataclasses.dataclass
class LoopResult:
  trainable: object
  opt_state: object
  step: int
  times: list
  tokens_seen: int
  compile_s: float
  final_loss: float
  stopped: bool
  skipped_steps: int = 0


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def train_loop(c, step_fn, trainable, opt_state, frozen, stream, mesh, ckpt, metrics, start,
               checkpoint_meta, stopper, health_fn=None, resumed=None) -> LoopResult:
  """Runs optimizer steps ``start+1 … c.steps``; checkpoints every ``c.save_every`` steps.

  Every process runs this; each feeds only its rows of the (identical) global batch.
  ``health_fn(trainable)`` (OFT only, :func:`oftjax.params.adapter_health`) adds its
  summaries (``per_layer=False``: ``max_q_norm``, ``mean_q_norm``,
  ``orthogonality_error``, ``mean_orthogonality_error``, with COFT ``max_coft_ratio``)
  to each logged line, with a warning the first time the error exceeds
  ``ORTHOGONALITY_TOLERANCE`` (the error is ‖Q‖^10 at the default n=6: ‖Q‖ ≈ 0.63; 2‖Q‖^4 at
  n=5: ‖Q‖ ≈ 0.27; see notebooks/neumann_terms.ipynb).

  Non-finite numbers: a step whose loss or gradient is not finite leaves the weights
  unchanged (``make_train_step``); ``c.on_nonfinite`` ``'skip'`` counts it (``skipped_steps``
  in every logged line and the checkpoint) and goes on, ``'stop'`` raises a one-line
  :class:`UsageError` before anything of that step is saved. Weights are checked finite
  before training and before every save, so no checkpoint or adapter holds NaN/Inf.
  """
  warned = False
  on_nonfinite = c.on_nonfinite
  restored = resumed or {}  # the JSON item of the checkpoint resumed from
  skipped_total = int(restored.get("skipped_steps", 0))
  last_finite = restored.get("loss", float("nan"))
  if not bool(_all_finite(trainable)):
    raise UsageError("the trainable weights hold NaN or Inf before training (check "
                     "--init-adapter); nothing was trained or saved")
  lead = 1 if c.grad_accum > 1 else 0
  batch_sharding = sharding.batch_sharding(mesh, 2 + lead, lead)

  def next_batch():
    rows = [next(stream) for _ in range(c.grad_accum)]
    host = {k: np.stack([r[k] for r in rows]) if lead else rows[0][k] for k in rows[0]}
    return (distributed.global_batch(host, batch_sharding, lead),
            int(sum((r["segment_ids"] > 0).sum() for r in rows)))

  batch, ntok = next_batch()
  t0 = time.time()
  compiled = step_fn.lower(trainable, opt_state, frozen, batch).compile()
  compile_s = time.time() - t0
  times, tokens_seen, loss, step = [], 0, float("nan"), start
  last_saved = start or None
  if start >= c.steps:  # resumed after the last step (killed while writing outputs): time one
    copies = jax.tree_util.tree_map(  # discarded step on copies, so the summary has a speed
        lambda x: jax.device_put(x, x.sharding, may_alias=False), (trainable, opt_state))
    t0 = time.time()
    jax.block_until_ready(compiled(*copies, frozen, batch))
    times.append(time.time() - t0)
    tokens_seen += ntok
  bar = tqdm(total=c.steps, initial=start, desc=c.method, unit="step", dynamic_ncols=True,
             disable=not distributed.is_main())
  while step < c.steps:
    t0 = time.time()
    trainable, opt_state, loss_arr, aux = compiled(trainable, opt_state, frozen, batch)
    loss = distributed.scalar(loss_arr)
    times.append(time.time() - t0)
    tokens_seen += ntok
    step += 1
    skipped = int(distributed.scalar(aux["skipped"]))
    if skipped:
      skipped_total += 1
      if on_nonfinite == "stop":
        bar.close()
        raise UsageError(
            f"step {step}: the loss or gradient is not finite (loss {loss}); stopped "
            f"(--on-nonfinite stop) without saving it; last checkpoint: "
            f"{'step ' + str(last_saved) if last_saved else 'none'}; lower --lr or check the "
            "data")
      if skipped_total == 1 and distributed.is_main():
        tqdm.write(f"warning: step {step}: the loss or gradient is not finite; step skipped "
                   "(weights unchanged), counted as skipped_steps in metrics.jsonl")
    else:
      last_finite = loss
    if step % c.log_every == 0 or step == c.steps:
      row = {"step": step, "loss": loss, "token_accuracy": distributed.scalar(aux["token_accuracy"]),
             "grad_norm": distributed.scalar(aux["grad_norm"]), "skipped": skipped,
             "skipped_steps": skipped_total}
      if health_fn is not None:
        row.update({k: distributed.scalar(v) for k, v in health_fn(trainable).items()})
        if row.get("orthogonality_error", 0.0) > ORTHOGONALITY_TOLERANCE and not warned \
            and distributed.is_main():
          warned = True
          tqdm.write(f"warning: orthogonality error {row['orthogonality_error']:.2g} > "
                     f"{ORTHOGONALITY_TOLERANCE} at step {step} (max ‖Q‖ = "
                     f"{row['max_q_norm']:.3f}): the Cayley-Neumann series with "
                     f"{c.neumann_terms} terms no longer approximates a rotation; lower --lr, "
                     "use more (even) --neumann-terms or --parameterization cayley")
      if metrics is not None:
        metrics.append(row)
    if step % c.save_every == 0 or step == c.steps or stopper.stop:
      if not bool(_all_finite(trainable)):
        bar.close()
        raise UsageError(f"step {step}: the trainable weights became NaN or Inf; nothing "
                         f"non-finite was saved (last checkpoint: "
                         f"{'step ' + str(last_saved) if last_saved else 'none'}); lower --lr")
      ckpt.save(step, {"trainable": trainable, "opt_state": opt_state},
                {**checkpoint_meta, "step": step, "data_state": stream.state,
                 "skipped_steps": skipped_total, "loss": last_finite}, force=True)
      last_saved = step
    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{ntok / np.median(times[-20:]):.0f}")
    bar.update(1)
    if stopper.stop:
      break
    if step < c.steps:
      batch, ntok = next_batch()
  bar.close()
  return LoopResult(trainable, opt_state, step, times, tokens_seen, compile_s, last_finite,
                    stopped=stopper.stop and step < c.steps, skipped_steps=skipped_total)
