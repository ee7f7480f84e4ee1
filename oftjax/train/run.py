"""One finetuning run end to end: load, evaluate, train, checkpoint, export, summarise.

Everything a user can get wrong is checked before the output directory is touched, and
`summary.json` is written last, so a directory without it never looks complete.
"""

from __future__ import annotations

from collections.abc import Callable
import contextlib
import dataclasses
import os
import shutil
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp

from oftjax import checkpoint, data, distributed, peft_io, quant, sharding
from oftjax import params as P
from oftjax.adapted_model import adapt
from oftjax.models import gemma
from oftjax.train import lora_export, remat_choice, sinks
from oftjax.train.config import (
  RunConfig,
  UsageError,
  adapter_config,
  remat_policy,
  reword,
  unrolls_layers,
)
from oftjax.train.evaluate import Evaluator
from oftjax.train.finish import RunRecord, peft_naming, write_outputs
from oftjax.train.loop import LoopIO, TrainStep, eval_row, train_loop
from oftjax.train.objective import make_optimizer
from oftjax.train.phases import PhaseClock
from oftjax.train.run_model import build_run_model
from oftjax.train.state import RunState
from oftjax.train_step import make_train_step


def _user_errors(fn, *args, flags: dict[str, str] | None = None, **kwargs):
  """Calls `fn`; turns input problems (bad files, values) into `UsageError`.

  `flags` maps `fn`'s parameters to the `RunConfig` fields that set them, so
  that the message names the flag to change (see `oftjax.train.config.reword`).
  """
  try:
    return fn(*args, **kwargs)
  except (ValueError, FileNotFoundError, KeyError, OSError) as e:
    line = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise UsageError(reword(line, flags or {})) from None


@contextlib.contextmanager
def _checkpoint_errors():
  """Turns an unusable checkpoint into a one-line `UsageError`.

  A library `checkpoint.CheckpointError` becomes a line that says which flag starts
  over.
  """
  try:
    yield
  except checkpoint.NoUsableStepError as e:
    raise UsageError(f"{e.problem}; start again with --overwrite") from None
  except checkpoint.CheckpointError as e:
    raise UsageError(str(e)) from None


_DISTRIBUTED_FLAGS = {
  "coordinator_address": "coordinator_address",
  "num_processes": "num_processes",
  "process_id": "process_id",
}


def _check_resumable(c: RunConfig) -> None:
  """`--resume` needs a checkpoint made with the same fingerprint (checked before any write)."""
  directory = os.path.join(c.output_dir, "checkpoints")
  step = None
  if os.path.isdir(directory):
    ckpt = checkpoint.RunCheckpoints(directory, c.keep_checkpoints, c.save_every)
    with _checkpoint_errors():
      step = ckpt.latest_step()
      meta = ckpt.read_meta(step) if step is not None else None
    ckpt.close()
  if step is None:
    raise UsageError(
      f"--resume: no checkpoint in {c.output_dir}; start the run again with --overwrite"
    )
  saved, now, defaults = meta["fingerprint"], c.fingerprint(), RunConfig().fingerprint()
  diff = [k for k in now if saved.get(k, defaults[k]) != now[k]]
  if diff:
    raise UsageError(
      f"--resume: the checkpoint was made with different {', '.join(diff)}; "
      "rerun with the original flags"
    )


def _prepare_output_dir(c: RunConfig) -> None:
  if c.export_merged and os.path.exists(c.export_merged) and not c.overwrite:
    raise UsageError(
      f"--export-merged {c.export_merged} already exists; choose a new folder or pass --overwrite"
    )
  stale_events = _stale_event_files(c)
  has_run = os.path.isdir(c.output_dir) and bool(os.listdir(c.output_dir))
  if c.resume:
    _check_resumable(c)
  elif has_run and not c.overwrite:
    raise UsageError(
      f"{c.output_dir} already holds a run; pass --resume to continue it or "
      "--overwrite to replace it"
    )
  elif has_run:
    shutil.rmtree(c.output_dir)
  os.makedirs(c.output_dir, exist_ok=True)
  for path in stale_events:
    if os.path.exists(path):  # not when it was inside the --output-dir just replaced
      os.remove(path)
  for stale in ("summary.json",):  # a resumed run is not complete until it finishes
    if os.path.exists(os.path.join(c.output_dir, stale)):
      os.remove(os.path.join(c.output_dir, stale))


def _stale_event_files(c: RunConfig) -> list[str]:
  """Event files a fresh run's `--tensorboard` folder holds (`--overwrite` removes them).

  A resumed run continues its own (its sink hides the events past the checkpoint).

  Raises:
    UsageError: a fresh run without `--overwrite` on a folder holding event files.
  """
  if not c.tensorboard or c.resume:
    return []
  old = [os.path.join(c.tensorboard, f) for f in sinks.event_files(c.tensorboard)]
  if old and not c.overwrite:
    raise UsageError(
      f"--tensorboard {c.tensorboard} already holds event files; choose a new folder, "
      "pass --resume to continue that run or --overwrite to replace them"
    )
  return old


def compute_dtype(name: str):
  """The dtype a `--dtype` choice names: auto is float32 on CPU, bfloat16 on GPU/TPU."""
  if name == "auto":
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


class _StopFlag:
  """SIGINT/SIGTERM: finish the current step, checkpoint, exit cleanly (handlers restored)."""

  def __enter__(self):
    self.stop = False
    self.previous = {
      sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    return self

  def __exit__(self, *exc):
    for sig, handler in self.previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame):
    del frame
    self.stop = True
    print(f"\nreceived {signal.Signals(signum).name}: saving after this step", flush=True)


def _init_adapters(c, model, acfg, example):
  """The adapted model (its layers found by one trace) and its adapter tree."""
  naming = peft_naming(model)
  if c.quantize != "none":  # the adapters see each layer first, the dequantizer runs it
    model = quant.Dequantized(model)
  adapted = _user_errors(adapt, model, acfg, example, flags={"targets": "targets"})
  adapter = _user_errors(adapted.init, jax.random.key(c.seed))
  if c.init_adapter:
    try:
      imported, icfg = peft_io.import_peft(c.init_adapter, targets=acfg.targets, naming=naming)
    except (ValueError, FileNotFoundError, OSError) as e:
      raise UsageError(f"--init-adapter {c.init_adapter}: {str(e).splitlines()[0]}") from None
    want = jax.tree_util.tree_map(lambda x: x.shape, adapter)
    got = jax.tree_util.tree_map(lambda x: x.shape, imported)
    if icfg.leaf_name != acfg.leaf_name:
      problem = f"it is a {icfg.method} adapter but --method is {acfg.method}"
    elif icfg.method != "lora" and icfg.block_size != acfg.block_size:
      problem = f"its block size is {icfg.block_size}, not --block-size {acfg.block_size}"
    elif icfg.method == "lora" and icfg.lora_rank != acfg.lora_rank:
      problem = f"its rank is {icfg.lora_rank}, not --lora-rank {acfg.lora_rank}"
    else:
      problem = None if want == got else "its layers or shapes differ from this model's targets"
    if problem:
      raise UsageError(f"--init-adapter {c.init_adapter} does not fit: {problem}")
    adapter = jax.tree_util.tree_map(jnp.asarray, imported)
    # run choices, not the file's: matmul precision and (training-only) block dropout
    icfg = dataclasses.replace(icfg, precision=acfg.precision, block_dropout=acfg.block_dropout)
    adapted = _user_errors(adapted.with_config, icfg)
  return adapted, adapter


def _load_data(c: RunConfig, tokenizer) -> tuple:
  """The training set, the held-out loss set and the exact-match sets, or a one-line error.

  Returns:
    `(train, held_out, sets)`: two `oftjax.data.Dataset`, and ``{'eval': items,
    'retention': items}` of exact-match items (no `'eval'` for a `{"text"}`` eval set,
    which is evaluated by its loss alone; no `'retention'` without `--retention-data`).
  """

  def records(flag: str, split_flag: str):
    source, split = getattr(c, flag), getattr(c, split_flag)
    return _user_errors(data.read_records, source, split, flags={"split": split_flag})

  train = _user_errors(
    data.tokenize_records,
    records("data", "data_split"),
    tokenizer,
    c.seq_len,
    truncate=c.truncate,
    path=c.data,
    flags={"seq_len": "seq_len"},
  )
  eval_records = records("eval_data", "eval_split")
  held_out = _user_errors(
    data.tokenize_records,
    eval_records,
    tokenizer,
    c.seq_len,
    path=c.eval_data,
    flags={"seq_len": "seq_len"},
  )
  sets = {}
  if held_out.format != data.TEXT:
    sets["eval"] = _user_errors(
      data.make_eval_set, eval_records[: c.eval_limit], tokenizer, c.eval_data
    )
  if c.retention_data:
    retained = records("retention_data", "eval_split")[: c.eval_limit]
    sets["retention"] = _user_errors(data.make_eval_set, retained, tokenizer, c.retention_data)
  for name, dataset in (("--data", train), ("--eval-data", held_out)):
    if dataset.num_split:
      _say(
        distributed.is_main(),
        f"{name}: {dataset.num_split} of {dataset.num_records} documents are longer than "
        f"--seq-len {c.seq_len}: split into {dataset.num_split_chunks} chunks (no token lost)",
      )
  return train, held_out, sets


def describe_eval(result: dict) -> str:
  """One line of an `Evaluator.run` result: loss, perplexity and the accuracies it has."""
  parts = [f"eval loss {result['loss']:.4f}"]
  if "perplexity" in result:  # absent from the eval_before of a run made before it existed
    parts.append(f"perplexity {result['perplexity']:.3f}")
  parts += [f"accuracy {result['accuracy']:.3f}"] if "accuracy" in result else []
  if "retention_accuracy" in result:
    parts.append(f"retention {result['retention_accuracy']:.3f}")
  return " ".join(parts)


def job_model(c: RunConfig, dtype, param_dtype):
  """The base Gemma module run `c` trains (no weights), as the job builds it.

  With its `--remat` start policy and its `--unroll-layers` choice on this backend.

  Raises:
    UsageError: `--model` is no Gemma folder or hub id this can build.
  """
  model = _user_errors(
    gemma.load_model, c.model, dtype=dtype, param_dtype=param_dtype, remat=remat_policy(c)
  )
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
  unroll = unrolls_layers(c, jax.default_backend(), P.tree_bytes(shapes["params"]))
  return model.clone(config=model.config.replace(unroll_layers=unroll))


def load_weights(c: RunConfig, model, dtype, say=print, clock: PhaseClock | None = None):
  """The adapted model and the trainable and frozen host trees of run `c`.

  Adapters are built first: their geometries say which kernels `--quantize` stores
  quantized (each as soon as the loader completes it, so at most one parameter is ever
  held in full precision).

  Args:
    c: the run's configuration.
    model: the base Gemma module (`gemma.load_model`).
    dtype: the compute dtype.
    say: prints a note (e.g. why no PEFT adapter will be written).
    clock: the run's phase clock, if any: the adapters' set-up is its `adapters` phase.

  Returns:
    `(adapted, trainable, frozen)`; `adapted` is `None` and `frozen` `{}` for
    `--method full`.
  """
  param_dtype = model.config.param_dtype  # as `_run` loaded the model: fp32 for --method full
  adapted, geoms = None, {}
  if c.method != "full":
    adapted, trainable = _init_adapters(c, model, adapter_config(c), jnp.zeros((1, 8), jnp.int32))
    geoms = adapted.geometries
    lora_export.check_exportable(c, adapted)
    if reason := peft_io.unexportable_reason(adapted.config):
      say(f"note: no peft_adapter/ will be written: {reason}")
  on_param = quant.quantize_on_load(geoms, c.quantize) if c.quantize != "none" else None
  if clock is not None:
    clock.mark("adapters")
  _, base = _user_errors(
    gemma.load,
    model.config.source_dir,
    dtype=dtype,
    param_dtype=param_dtype,
    on_param=on_param,
    on_host=jax.default_backend() != "cpu" or jax.process_count() > 1,
  )
  return (adapted, base, {}) if c.method == "full" else (adapted, trainable, base)


@dataclasses.dataclass(frozen=True)
class Training:
  """What `build_training` returns: the run model, placed trees and the jitted step."""

  job: Any
  frozen: Any
  state: RunState
  step: Callable
  step_with_remat: Callable[[str], Callable]


def build_training(c: RunConfig, model, adapted, trainable, frozen, mesh, dtype) -> Training:
  """Places the trees on `mesh` and builds the job's train step (the one the loop runs).

  Host arrays go straight into their shards: no device holds the whole FSDP-sharded model.
  Also used by `experiments/benchmark.py --job`, so that the benchmark times this step.
  """
  frozen = jax.device_put(frozen, sharding.param_shardings(frozen, mesh))
  job = build_run_model(model, frozen, adapted, quantized=c.quantize != "none", dtype=dtype)
  optimizer = make_optimizer(c.lr, c.steps, c.warmup_steps, c.weight_decay, c.clip_norm)
  trainable = distributed.to_host(trainable)
  shardings = sharding.train_state_shardings(
    optimizer.init, trainable, mesh, shard=job.shards_trainable
  )
  trainable = jax.device_put(trainable, shardings[0])
  state = RunState(trainable, jax.jit(optimizer.init, out_shardings=shardings[1])(trainable))

  def step_of(run_model):
    return make_train_step(
      run_model.loss,
      optimizer,
      has_aux=True,
      accum_steps=c.grad_accum,
      weight_key="tokens",
      project=job.project,
      state_shardings=shardings,
      with_rng=job.uses_rng,
    )

  return Training(job, frozen, state, step_of(job), lambda p: step_of(job.with_remat(p)))


def _remat_auto(c: RunConfig, training: Training, frozen) -> tuple | None:
  """`TrainStep.remat_auto` of run `c`: with `--remat auto`, the step builder and budget.

  The budget is set by the weights this process's devices hold (frozen and trained); with
  several processes it is the smallest of theirs, so that all compile the same policy.
  """
  if c.remat != "auto":
    return None
  leaves = jax.tree_util.tree_leaves((frozen, training.state.trainable))
  held = sum(s.data.nbytes for x in leaves for s in x.addressable_shards)
  budget = remat_choice.budget_bytes(held)
  if jax.process_count() > 1:  # every process must compile the same policy
    unknown = 1 << 62
    budget = distributed.smallest(unknown if budget is None else budget)
    budget = None if budget == unknown else budget
  return training.step_with_remat, budget


def run(c: RunConfig) -> dict:
  """Executes the run described by `c` and returns the summary it wrote."""
  with _StopFlag() as stopper:
    return _run(c, stopper)


def _run(c: RunConfig, stopper: _StopFlag) -> dict:
  t_start = time.time()
  clock = PhaseClock(t_start)
  _user_errors(
    distributed.initialize,
    c.coordinator_address,
    c.num_processes,
    c.process_id,
    flags=_DISTRIBUTED_FLAGS,
  )
  main = distributed.is_main()
  dtype = compute_dtype(c.dtype)
  mesh = _user_errors(sharding.make_mesh, c.mesh, flags={"mesh": "mesh"})
  _user_errors(distributed.local_rows, c.batch_size, flags={"global_rows": "batch_size"})
  tokenizer = _user_errors(data.load_tokenizer, c.model)
  # Frozen weights are stored in the compute dtype; weights that full finetuning trains keep an
  # fp32 master copy (bf16 storage would round away updates below its 8-bit mantissa).
  param_dtype = jnp.float32 if c.method == "full" else dtype
  model = job_model(c, dtype, param_dtype)
  train, held_out, sets = _load_data(c, tokenizer)
  max_new = 2 + max(
    (len(tokenizer.encode(x.expected, add_special_tokens=False)) for s in sets.values() for x in s),
    default=0,
  )
  clock.mark("setup")
  adapted, trainable, frozen = load_weights(
    c, model, dtype, say=lambda t: _say(main, t), clock=clock
  )
  clock.mark("load")
  if main:
    _prepare_output_dir(c)
  distributed.barrier("output directory ready")
  training = build_training(c, model, adapted, trainable, frozen, mesh, dtype)
  job, frozen, state, step_fn = training.job, training.frozen, training.state, training.step

  evaluator = Evaluator(
    job.eval_module, tokenizer, held_out.examples, sets, c.seq_len, c.batch_size, max_new
  )
  ckpt = checkpoint.RunCheckpoints(
    os.path.join(c.output_dir, "checkpoints"), c.keep_checkpoints, c.save_every
  )
  clock.mark("place")
  eval_before = None
  if c.resume:
    with _checkpoint_errors():
      state, saved = state.restore(ckpt, ckpt.latest_step())
    eval_before = saved["eval_before"]
    _say(main, f"resumed from step {state.step}")
  if eval_before is None:
    eval_before = evaluator.run(job.evaluated(state.trainable))
  clock.mark("eval_before")
  _say(main, f"before: {describe_eval(eval_before)}")

  stream = data.PackedBatches(
    train.examples,
    batch_size=c.batch_size,
    seq_len=c.seq_len,
    seed=c.seed,
    state=state.data_state,
    pad_id=evaluator.pad_id,
  )
  metrics, sink = sinks.open_sinks(c, state.step if c.resume else None) if main else (None, None)
  if sink is not None and c.eval_every is not None and not c.resume:
    sink.write(eval_row(0, eval_before))
  meta = {"fingerprint": c.fingerprint(), "eval_before": eval_before}
  try:
    state, stats = train_loop(
      c,
      state,
      TrainStep(
        step_fn,
        frozen,
        mesh,
        job.health,
        seed=c.seed if job.uses_rng else None,
        remat=remat_policy(c),
        remat_auto=_remat_auto(c, training, frozen),
      ),
      LoopIO(stream, ckpt, sink, meta, stopper, lambda t: evaluator.run(job.evaluated(t))),
    )
  finally:
    if sink is not None:
      sink.close()
  ckpt.close()
  clock.mark("train")
  if stats.stopped:
    _say(main, f"stopped at step {state.step}; rerun with --resume to continue")
    return {"stopped_at": state.step}
  lora_summary = None
  if c.export_lora:  # before the fold below, which consumes the frozen base it reads
    lora_summary = lora_export.export_lora(
      c, job, state.trainable, held_out.examples, evaluator.pad_id, peft_naming(model)
    )
    _say(
      main,
      f"LoRA export at rank {c.export_lora}: relative update error "
      f"{lora_summary['relative_error']:.3g}, max logit error "
      f"{lora_summary['logits']['max_abs_logit_error']:.3g} "
      f"(details in {os.path.join(c.output_dir, 'lora_export.json')})",
    )
    clock.mark("export_lora")
  final = job.final(state.trainable)  # the frozen base is consumed: folded in place
  jax.block_until_ready(final)
  clock.mark("fold")
  eval_after = stats.last_eval or evaluator.run(final)
  clock.mark("eval_after")
  host_state = state.replace(trainable=distributed.to_host(state.trainable), opt_state=None)
  host_merged = None
  if c.export_merged:
    merged = job.exported(state.trainable, final)
    # One process: the save converts tensor by tensor; gathering to the host first would hold
    # a second full copy of the model there.
    host_merged = merged if jax.process_count() == 1 else distributed.to_host(merged)
  del final
  if not main:
    return {"stopped_at": None, "process": jax.process_index()}
  return write_outputs(
    c,
    job,
    host_state,
    host_merged,
    RunRecord(
      eval_before,
      eval_after,
      metrics.rows,
      stats,
      train,
      t_start,
      clock,
      lora_summary,
      unroll_layers=model.config.unroll_layers,
    ),
  )


def _say(main: bool, text: str) -> None:
  if main:
    print(text, flush=True)
