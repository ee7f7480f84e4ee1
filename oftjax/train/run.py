"""One finetuning run end to end: load, evaluate, train, checkpoint, export, summarise.

Everything a user can get wrong is checked before the output directory is touched, and
``summary.json`` is written last, so a directory without it never looks complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import time

import jax
import jax.numpy as jnp

from oftjax import checkpoint, data, distributed, peft_io, quant, sharding
from oftjax.adapted_model import adapt
from oftjax.models import gemma
from oftjax.train import outputs
from oftjax.train.config import RunConfig, UsageError, adapter_config, reword
from oftjax.train.evaluate import Evaluator
from oftjax.train.finish import RunRecord, peft_naming, write_outputs
from oftjax.train.loop import LoopIO, TrainStep, train_loop
from oftjax.train.objective import make_optimizer
from oftjax.train.phases import PhaseClock
from oftjax.train.run_model import build_run_model
from oftjax.train.state import RunState
from oftjax.train_step import make_train_step


def _user_errors(fn, *args, flags: dict[str, str] | None = None, **kwargs):
  """Calls ``fn``; turns input problems (bad files, values) into :class:`UsageError`.

  ``flags`` maps ``fn``'s parameters to the :class:`RunConfig` fields that set them, so
  that the message names the flag to change (see :func:`~oftjax.train.config.reword`).
  """
  try:
    return fn(*args, **kwargs)
  except (ValueError, FileNotFoundError, KeyError, OSError) as e:
    line = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise UsageError(reword(line, flags or {})) from None


@contextlib.contextmanager
def _checkpoint_errors():
  """Turns an unusable checkpoint into a one-line :class:`UsageError`.

  A library :class:`checkpoint.CheckpointError` becomes a line that says which flag starts
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
  """``--resume`` needs a checkpoint made with the same fingerprint (checked before any write)."""
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
  for stale in ("summary.json",):  # a resumed run is not complete until it finishes
    if os.path.exists(os.path.join(c.output_dir, stale)):
      os.remove(os.path.join(c.output_dir, stale))


def _compute_dtype(c: RunConfig):
  if c.dtype == "auto":
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[c.dtype]


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
    icfg = dataclasses.replace(icfg, precision=acfg.precision)  # a run choice, not the file's
    adapted = _user_errors(adapted.with_config, icfg)
  return adapted, adapter


def run(c: RunConfig) -> dict:
  """Executes the run described by ``c`` and returns the summary it wrote."""
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
  dtype = _compute_dtype(c)
  mesh = _user_errors(sharding.make_mesh, c.mesh, flags={"mesh": "mesh"})
  _user_errors(distributed.local_rows, c.batch_size, flags={"global_rows": "batch_size"})
  tokenizer = _user_errors(data.load_tokenizer, c.model)
  # Frozen weights are stored in the compute dtype; weights that full finetuning trains keep an
  # fp32 master copy (bf16 storage would round away updates below its 8-bit mantissa).
  param_dtype = jnp.float32 if c.method == "full" else dtype
  model = _user_errors(gemma.load_model, c.model, dtype=dtype, param_dtype=param_dtype)
  train = _user_errors(
    data.load_dataset,
    c.data,
    tokenizer,
    c.seq_len,
    truncate=c.truncate,
    flags={"seq_len": "seq_len"},
  )
  held_out = _user_errors(
    data.load_dataset, c.eval_data, tokenizer, c.seq_len, flags={"seq_len": "seq_len"}
  )
  sets = {"eval": _user_errors(data.load_eval_set, c.eval_data, tokenizer, c.eval_limit)}
  if c.retention_data:
    sets["retention"] = _user_errors(data.load_eval_set, c.retention_data, tokenizer, c.eval_limit)
  max_new = (
    max(
      len(tokenizer.encode(x.expected, add_special_tokens=False)) for s in sets.values() for x in s
    )
    + 2
  )
  clock.mark("setup")
  adapted, geoms = None, {}
  if c.method != "full":  # adapters first: their geometries say which kernels to quantize
    adapted, trainable = _init_adapters(c, model, adapter_config(c), jnp.zeros((1, 8), jnp.int32))
    geoms = adapted.geometries
    if reason := peft_io.unexportable_reason(adapted.config):
      _say(main, f"note: no peft_adapter/ will be written: {reason}")
  # QOFT / QLoRA: each targeted kernel is quantized as soon as the loader completes it, so
  # at most one parameter (one projection, all layers) is ever held in full precision.
  on_param = quant.quantize_on_load(geoms, c.quantize) if c.quantize != "none" else None
  clock.mark("adapters")
  _, base = _user_errors(
    gemma.load,
    model.config.source_dir,
    dtype=dtype,
    param_dtype=param_dtype,
    on_param=on_param,
    on_host=jax.default_backend() != "cpu" or jax.process_count() > 1,
  )
  trainable, frozen = (base, {}) if c.method == "full" else (trainable, base)
  del base  # host arrays (GPU/TPU): once on the device, no host copy may stay alive
  clock.mark("load")
  if main:
    _prepare_output_dir(c)
  distributed.barrier("output directory ready")

  # Host arrays go straight into their shards: no device holds the whole FSDP-sharded model.
  frozen = jax.device_put(frozen, sharding.param_shardings(frozen, mesh))
  job = build_run_model(model, frozen, adapted, quantized=c.quantize != "none", dtype=dtype)
  optimizer = make_optimizer(c.lr, c.steps, c.warmup_steps, c.weight_decay, c.clip_norm)
  trainable = distributed.to_host(trainable)
  shardings = sharding.train_state_shardings(
    optimizer.init, trainable, mesh, shard=job.shards_trainable
  )
  trainable = jax.device_put(trainable, shardings[0])
  state = RunState(trainable, jax.jit(optimizer.init, out_shardings=shardings[1])(trainable))
  step_fn = make_train_step(
    job.loss,
    optimizer,
    has_aux=True,
    accum_steps=c.grad_accum,
    weight_key="tokens",
    project=job.project,
    state_shardings=shardings,
  )

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
  _say(
    main,
    f"before: eval loss {eval_before['loss']:.4f} accuracy {eval_before['accuracy']:.3f}"
    + (f" retention {eval_before['retention_accuracy']:.3f}" if c.retention_data else ""),
  )

  stream = data.PackedBatches(
    train.examples,
    batch_size=c.batch_size,
    seq_len=c.seq_len,
    seed=c.seed,
    state=state.data_state,
    pad_id=evaluator.pad_id,
  )
  metrics = (
    outputs.MetricsLog(
      os.path.join(c.output_dir, "metrics.jsonl"), resume_step=state.step if c.resume else None
    )
    if main
    else None
  )
  meta = {"fingerprint": c.fingerprint(), "eval_before": eval_before}
  state, stats = train_loop(
    c,
    state,
    TrainStep(step_fn, frozen, mesh, job.health),
    LoopIO(stream, ckpt, metrics, meta, stopper),
  )
  ckpt.close()
  clock.mark("train")
  if stats.stopped:
    _say(main, f"stopped at step {state.step}; rerun with --resume to continue")
    return {"stopped_at": state.step}
  final = job.final(state.trainable)  # the frozen base is consumed: folded in place
  jax.block_until_ready(final)
  clock.mark("fold")
  eval_after = evaluator.run(final)
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
    RunRecord(eval_before, eval_after, metrics.rows, stats, train, t_start, clock),
  )


def _say(main: bool, text: str) -> None:
  if main:
    print(text, flush=True)
