"""The training loop of the finetuning job: compiled step, logging, checkpoints, clean stops."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
from tqdm import tqdm

from oftjax import distributed, sharding


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


def train_loop(c, step_fn, trainable, opt_state, frozen, stream, mesh, ckpt, metrics, start,
               checkpoint_meta, stopper, health_fn=None) -> LoopResult:
  """Runs optimizer steps ``start+1 … c.steps``; checkpoints every ``c.save_every`` steps.

  Every process runs this; each feeds only its rows of the (identical) global batch.
  ``health_fn(trainable)`` (OFT only) adds ``max_q_norm`` and ``orthogonality_error`` to
  each logged line, with a warning the first time ``‖Q‖ >= 1`` under Cayley–Neumann.
  """
  warned = False
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
  bar = tqdm(total=c.steps, initial=start, desc=c.method, unit="step", dynamic_ncols=True,
             disable=not distributed.is_main())
  while step < c.steps:
    t0 = time.time()
    trainable, opt_state, loss_arr, aux = compiled(trainable, opt_state, frozen, batch)
    loss = distributed.scalar(loss_arr)
    times.append(time.time() - t0)
    tokens_seen += ntok
    step += 1
    if step % c.log_every == 0 or step == c.steps:
      row = {"step": step, "loss": loss, "token_accuracy": distributed.scalar(aux["token_accuracy"]),
             "grad_norm": distributed.scalar(aux["grad_norm"]),
             "skipped": int(distributed.scalar(aux["skipped"]))}
      if health_fn is not None:
        row.update({k: distributed.scalar(v) for k, v in health_fn(trainable).items()})
        if row.get("max_q_norm", 0.0) >= 1.0 and c.parameterization == "cayley_neumann" \
            and not warned and distributed.is_main():
          warned = True
          tqdm.write(f"warning: max ‖Q‖ = {row['max_q_norm']:.3f} >= 1 at step {step}: the "
                     "Cayley-Neumann series no longer approximates a rotation; lower --lr or "
                     "use --parameterization cayley")
      if metrics is not None:
        metrics.append(row)
    if step % c.save_every == 0 or step == c.steps or stopper.stop:
      ckpt.save(step, {"trainable": trainable, "opt_state": opt_state},
                {**checkpoint_meta, "step": step, "data_state": stream.state}, force=True)
    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{ntok / np.median(times[1:] or times):.0f}")
    bar.update(1)
    if stopper.stop:
      break
    if step < c.steps:
      batch, ntok = next_batch()
  bar.close()
  return LoopResult(trainable, opt_state, step, times, tokens_seen, compile_s, loss,
                    stopped=stopper.stop and step < c.steps)
