"""The finetuning job's training loop: compiled step, logging, evaluation, checkpoints, stops."""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import numbers
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from oftjax import distributed, sharding
from oftjax.train import remat_choice
from oftjax.train.config import UsageError
from oftjax.train.objective import lr_schedule
from oftjax.train.state import RunState

ORTHOGONALITY_TOLERANCE = 1e-2  # max|RᵀR−I| beyond which R visibly stops being a rotation


@dataclasses.dataclass(frozen=True)
class TrainStep:
  """The compiled step the loop runs and what it reads besides the run state.

  Attributes:
    fn: `fn(trainable, opt_state, frozen, batch) -> (trainable, opt_state, loss, aux)`,
      jitted (`oftjax.make_train_step`).
    frozen: the frozen tree passed to every step.
    mesh: the device mesh the batches are split over.
    health: `health(trainable)` (OFT only, `oftjax.params.adapter_health`), or `None`.
    seed: with a stochastic loss (`fn` built `with_rng`: OFT block dropout), the seed
      of its keys: step `s` gets `fold_in(key(seed), s)`, so a resumed run draws the
      same masks as an uninterrupted one. `None`: `fn` takes no key.
    remat: the rematerialisation policy `fn` was built with.
    remat_auto: with `--remat auto`, `(build, budget)`: `build(policy)` is the step of
      any policy and `budget` the temp bytes allowed (`oftjax.train.remat_choice`);
      `None`: `fn` is run as given.
  """

  fn: Callable
  frozen: Any
  mesh: Any
  health: Callable | None = None
  seed: int | None = None
  remat: str = "none"
  remat_auto: tuple | None = None

  def compile(self, *args) -> remat_choice.Choice:
    """The step compiled on `args`: `fn`, or with `remat_auto` the policy that fits."""
    if self.remat_auto is not None:
      build, budget = self.remat_auto
      return remat_choice.compile_within_budget(build, args, budget)
    compiled = self.fn.lower(*args).compile()
    return remat_choice.Choice(self.remat, compiled, remat_choice.temp_bytes(compiled), "")

  def args(self, batch, step: int) -> tuple:
    """The arguments after the state: `(frozen, batch)`, and the key of step `step`."""
    if self.seed is None:
      return (self.frozen, batch)
    key = jax.random.fold_in(jax.random.key(self.seed), step)
    return (self.frozen, batch, np.asarray(jax.random.key_data(key)))


@dataclasses.dataclass(frozen=True)
class LoopIO:
  """Where the loop reads its batches and writes its records.

  Attributes:
    stream: the training batches (`next()` gives a host batch; `.state` its position).
    checkpoints: a `RunCheckpoints` (`save(step, arrays, meta, force=...)`).
    metrics: a `sinks.MetricsSink` (`write(row)`), or `None` on processes that write
      nothing.
    checkpoint_meta: JSON saved with every checkpoint besides the state's counters.
    stopper: its `stop` turns true on SIGINT/SIGTERM.
    evaluate: `evaluate(trainable) -> metrics dict` (the evaluator's `run` on the
      evaluated tree), called every `c.eval_every` steps; `None` without evaluation.
  """

  stream: Any
  checkpoints: Any
  metrics: Any
  checkpoint_meta: dict
  stopper: Any
  evaluate: Callable | None = None


@dataclasses.dataclass(frozen=True)
class LoopStats:
  """What one session of the loop measured (not checkpointed).

  Attributes:
    times: seconds of each timed step (compile excluded).
    tokens: training tokens of the timed steps.
    compile_s: seconds to compile the step.
    stopped: whether a signal stopped the run before its last step.
    temp_bytes: the compiled step's temporary (activation) memory per device, from XLA's
      `memory_analysis()`, or `None` where the backend does not report it.
    remat: the rematerialisation policy of the step run (`--remat auto` resolved).
    last_eval: the evaluation at the last step (`--eval-every`), when this session ran
      it, else `None`.
  """

  times: list
  tokens: int
  compile_s: float
  stopped: bool
  temp_bytes: int | None = None
  last_eval: dict | None = None
  remat: str = "none"


def eval_row(step: int, result: dict) -> dict:
  """The `'eval'` metrics row of an evaluator `result` at `step` (its numbers only)."""
  values = {
    k: v for k, v in result.items() if isinstance(v, numbers.Real) and not isinstance(v, bool)
  }
  return {"kind": "eval", "step": step, **values}


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [
    jnp.all(jnp.isfinite(x))
    for x in jax.tree_util.tree_leaves(tree)
    if jnp.issubdtype(x.dtype, jnp.inexact)
  ]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def batch_reader(stream, grad_accum: int, mesh) -> Callable[[], tuple[dict, int]]:
  """The loop's batches: `read() -> (global batch, real tokens in it)`.

  Each call takes `grad_accum` host batches from `stream` (stacked on a leading
  micro-batch axis when `grad_accum > 1`) and places this process's rows on `mesh`.
  """
  lead = 1 if grad_accum > 1 else 0
  batch_sharding = sharding.batch_sharding(mesh, 2 + lead, lead)

  def read():
    rows = [next(stream) for _ in range(grad_accum)]
    host = {k: np.stack([r[k] for r in rows]) if lead else rows[0][k] for k in rows[0]}
    return (
      distributed.global_batch(host, batch_sharding, lead),
      int(sum((r["segment_ids"] > 0).sum() for r in rows)),
    )

  return read


def train_loop(c, state: RunState, step: TrainStep, io: LoopIO) -> tuple[RunState, LoopStats]:
  """Runs optimizer steps `state.step+1 … c.steps`; checkpoints every `c.save_every` steps.

  Every process runs this; each feeds only its rows of the (identical) global batch.
  Every `c.log_every` steps (and at the last) it writes a `'train'` row (loss, token
  accuracy, gradient norm, the step's learning rate, skip counts) and a `'speed'` row
  (tokens/s since the previous one) to `io.metrics`. Every `c.eval_every` steps (and at
  the last) it writes an `'eval'` row of `io.evaluate`, before that step's checkpoint:
  a run resumed from a checkpoint has the eval rows up to it and reruns the later ones.
  `step.health(trainable)` adds its summaries (`max_q_norm`, `mean_q_norm`,
  `orthogonality_error`, `mean_orthogonality_error`, with COFT `max_coft_ratio`; not
  the per-layer figures) to each logged line, with a warning the first time the error
  exceeds `ORTHOGONALITY_TOLERANCE` (the error is ‖Q‖^10 at the default n=6: ‖Q‖ ≈ 0.63;
  2‖Q‖^4 at n=5: ‖Q‖ ≈ 0.27; see notebooks/neumann_terms.ipynb).

  Non-finite numbers: a step whose loss or gradient is not finite leaves the weights
  unchanged (`make_train_step`); `c.on_nonfinite` `'skip'` counts it (`skipped_steps`
  in every logged line and the checkpoint) and goes on, `'stop'` raises a one-line
  `UsageError` before anything of that step is saved. Weights are checked finite
  before training and before every save, so no checkpoint or adapter holds NaN/Inf.

  Returns:
    The state after the last step run, and what this session measured.
  """
  warned = False
  on_nonfinite = c.on_nonfinite
  if not bool(_all_finite(state.trainable)):
    raise UsageError(
      "the trainable weights hold NaN or Inf before training (check "
      "--init-adapter); nothing was trained or saved"
    )
  next_batch = batch_reader(io.stream, c.grad_accum, step.mesh)
  batch, ntok = next_batch()
  t0 = time.time()
  choice = step.compile(state.trainable, state.opt_state, *step.args(batch, 0))
  compiled, compile_s = choice.compiled, time.time() - t0
  if choice.note and distributed.is_main():
    print(choice.note, flush=True)
  schedule = lr_schedule(c.lr, c.steps, c.warmup_steps)
  times, tokens_seen, loss = [], 0, float("nan")
  since_log = [0, 0.0]  # training tokens and seconds since the last speed row
  last_eval = None
  last_saved = state.step or None
  if state.step >= c.steps:  # resumed after the last step (killed while writing outputs):
    copies = jax.tree_util.tree_map(  # time one discarded step on copies, for the speed
      lambda x: jax.device_put(x, x.sharding, may_alias=False), (state.trainable, state.opt_state)
    )
    t0 = time.time()
    jax.block_until_ready(compiled(*copies, *step.args(batch, state.step)))
    times.append(time.time() - t0)
    tokens_seen += ntok
  bar = tqdm(
    total=c.steps,
    initial=state.step,
    desc=c.method,
    unit="step",
    dynamic_ncols=True,
    disable=not distributed.is_main(),
  )
  while state.step < c.steps:
    t0 = time.time()
    trainable, opt_state, loss_arr, aux = compiled(
      state.trainable, state.opt_state, *step.args(batch, state.step)
    )
    # The step runs asynchronously: the host packs and places the next batch meanwhile
    # (the stream's position is taken first: it is this step's, what a checkpoint saves).
    data_state, ran = io.stream.state, ntok
    if state.step + 1 < c.steps and not io.stopper.stop:
      upcoming = next_batch()
    loss = distributed.scalar(loss_arr)
    times.append(time.time() - t0)
    tokens_seen += ran
    since_log = [since_log[0] + ran, since_log[1] + times[-1]]
    skipped = int(distributed.scalar(aux["skipped"]))
    state = state.replace(
      trainable=trainable,
      opt_state=opt_state,
      step=state.step + 1,
      data_state=data_state,
      skipped_steps=state.skipped_steps + skipped,
      loss=state.loss if skipped else loss,
    )
    if skipped:
      if on_nonfinite == "stop":
        bar.close()
        raise UsageError(
          f"step {state.step}: the loss or gradient is not finite (loss {loss}); stopped "
          f"(--on-nonfinite stop) without saving it; last checkpoint: "
          f"{'step ' + str(last_saved) if last_saved else 'none'}; lower --lr or check the "
          "data"
        )
      if state.skipped_steps == 1 and distributed.is_main():
        tqdm.write(
          f"warning: step {state.step}: the loss or gradient is not finite; step "
          "skipped (weights unchanged), counted as skipped_steps in metrics.jsonl"
        )
    if state.step % c.log_every == 0 or state.step == c.steps:
      applied_before = state.step - 1 - (state.skipped_steps - skipped)  # optax's update count
      row = {
        "kind": "train",
        "step": state.step,
        "loss": loss,
        "lr": float(schedule(applied_before)),
        "token_accuracy": distributed.scalar(aux["token_accuracy"]),
        "grad_norm": distributed.scalar(aux["grad_norm"]),
        "skipped": skipped,
        "skipped_steps": state.skipped_steps,
      }
      if step.health is not None:
        row.update(
          {
            k: distributed.scalar(v)
            for k, v in step.health(state.trainable).items()
            if k != "layers"
          }
        )
        if (
          row.get("orthogonality_error", 0.0) > ORTHOGONALITY_TOLERANCE
          and not warned
          and distributed.is_main()
        ):
          warned = True
          tqdm.write(
            f"warning: orthogonality error {row['orthogonality_error']:.2g} > "
            f"{ORTHOGONALITY_TOLERANCE} at step {state.step} (max ‖Q‖ = "
            f"{row['max_q_norm']:.3f}): the Cayley-Neumann series with "
            f"{c.neumann_terms} terms no longer approximates a rotation; lower --lr, "
            "use more (even) --neumann-terms or --parameterization cayley"
          )
      if io.metrics is not None:
        io.metrics.write(row)
        io.metrics.write(
          {"kind": "speed", "step": state.step, "tokens_per_s": since_log[0] / since_log[1]}
        )
      since_log = [0, 0.0]
    if c.eval_every is not None and (state.step % c.eval_every == 0 or state.step == c.steps):
      result = io.evaluate(state.trainable)
      last_eval = result if state.step == c.steps else None
      if io.metrics is not None:
        io.metrics.write(eval_row(state.step, result))
      if distributed.is_main():
        tqdm.write(
          f"step {state.step}: eval "
          + ", ".join(
            f"{k} {v:.4g}"
            for k, v in eval_row(state.step, result).items()
            if k not in ("kind", "step")
          )
        )
    if state.step % c.save_every == 0 or state.step == c.steps or io.stopper.stop:
      if not bool(_all_finite(state.trainable)):
        bar.close()
        raise UsageError(
          f"step {state.step}: the trainable weights became NaN or Inf; "
          f"nothing non-finite was saved (last checkpoint: "
          f"{'step ' + str(last_saved) if last_saved else 'none'}); lower --lr"
        )
      state.save(io.checkpoints, io.checkpoint_meta)
      last_saved = state.step
    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{ran / np.median(times[-20:]):.0f}")
    bar.update(1)
    if io.stopper.stop:
      break
    if state.step < c.steps:
      batch, ntok = upcoming
  bar.close()
  return state, LoopStats(
    times,
    tokens_seen,
    compile_s,
    stopped=io.stopper.stop and state.step < c.steps,
    temp_bytes=choice.temp_bytes,
    last_eval=last_eval,
    remat=choice.policy,
  )
