"""One finetuning run end to end: load, evaluate, train, checkpoint, export, summarise.

Everything a user can get wrong is checked before the output directory is touched, and
``summary.json`` is written last, so a directory without it never looks complete.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import time

import jax
import jax.numpy as jnp

from oftjax import adapters, checkpoint, data, distributed, params as P, peft_io, quant, sharding
from oftjax.intercept import Adapted, record_geometries
from oftjax.models import gemma
from oftjax.train import outputs
from oftjax.train.config import RunConfig, UsageError
from oftjax.train.evaluate import Evaluator
from oftjax.train.finish import write_outputs
from oftjax.train.loop import train_loop
from oftjax.train.objective import make_optimizer, masked_xent
from oftjax.train_step import make_train_step


def _user_errors(fn, *args, **kwargs):
  """Calls ``fn``; turns input problems (bad files, values) into :class:`UsageError`."""
  try:
    return fn(*args, **kwargs)
  except (ValueError, FileNotFoundError, KeyError, OSError) as e:
    raise UsageError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None


def _check_resumable(c: RunConfig) -> None:
  """``--resume`` needs a checkpoint made with the same fingerprint (checked before any write)."""
  directory = os.path.join(c.output_dir, "checkpoints")
  step = None
  if os.path.isdir(directory):
    ckpt = checkpoint.RunCheckpoints(directory, c.keep_checkpoints, c.save_every)
    step = ckpt.latest_step()
    meta = ckpt.read_meta(step) if step is not None else None
    ckpt.close()
  if step is None:
    raise UsageError(f"--resume: no checkpoint in {c.output_dir}; start the run again with "
                     "--overwrite")
  saved, now, defaults = meta["fingerprint"], c.fingerprint(), RunConfig().fingerprint()
  diff = [k for k in now if saved.get(k, defaults[k]) != now[k]]
  if diff:
    raise UsageError(f"--resume: the checkpoint was made with different {', '.join(diff)}; "
                     "rerun with the original flags")


def _prepare_output_dir(c: RunConfig) -> None:
  if c.export_merged and os.path.exists(c.export_merged) and not c.overwrite:
    raise UsageError(f"--export-merged {c.export_merged} already exists; choose a new folder "
                     "or pass --overwrite")
  has_run = os.path.isdir(c.output_dir) and bool(os.listdir(c.output_dir))
  if c.resume:
    _check_resumable(c)
  elif has_run and not c.overwrite:
    raise UsageError(f"{c.output_dir} already holds a run; pass --resume to continue it or "
                     "--overwrite to replace it")
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
    self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    return self

  def __exit__(self, *exc):
    for sig, handler in self.previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame):
    del frame
    self.stop = True
    print(f"\nreceived {signal.Signals(signum).name}: saving after this step", flush=True)


def _adapter_config(c: RunConfig) -> adapters.AdapterConfig:
  return adapters.AdapterConfig(
      method=c.method, targets=c.targets, block_size=c.block_size, num_terms=c.neumann_terms,
      parameterization=c.parameterization, lora_rank=c.lora_rank, lora_alpha=c.lora_alpha,
      precision=c.adapter_precision)


def _init_adapters(c, model, acfg, example):
  """Adapter tree (base init is dead code under jit), layer geometries, wrapped model."""
  wrapped = Adapted(model, acfg)
  with record_geometries() as geoms:
    init = jax.jit(lambda rng: P.split_params(wrapped.init(rng, example)["params"])[1])
    adapter = _user_errors(init, jax.random.key(c.seed))
  if c.init_adapter:
    imported, icfg = _user_errors(peft_io.import_peft, c.init_adapter, acfg.targets)
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
    acfg, wrapped = icfg, Adapted(model, icfg)
  return wrapped, acfg, adapter, dict(geoms)


def run(c: RunConfig) -> dict:
  """Executes the run described by ``c`` and returns the summary it wrote."""
  with _StopFlag() as stopper:
    return _run(c, stopper)


def _run(c: RunConfig, stopper: _StopFlag) -> dict:
  t_start = time.time()
  _user_errors(distributed.initialize, c.coordinator_address, c.num_processes, c.process_id)
  main = distributed.is_main()
  dtype = _compute_dtype(c)
  mesh = _user_errors(sharding.make_mesh, c.mesh)
  _user_errors(distributed.local_rows, c.batch_size)
  tokenizer = _user_errors(data.load_tokenizer, c.model)
  param_dtype = jnp.float32 if dtype == jnp.float32 else dtype
  model = _user_errors(gemma.load_model, c.model, dtype=dtype, param_dtype=param_dtype)
  train = _user_errors(data.load_dataset, c.data, tokenizer, c.seq_len, truncate=c.truncate)
  held_out = _user_errors(data.load_dataset, c.eval_data, tokenizer, c.seq_len)
  sets = {"eval": _user_errors(data.load_eval_set, c.eval_data, tokenizer, c.eval_limit)}
  if c.retention_data:
    sets["retention"] = _user_errors(data.load_eval_set, c.retention_data, tokenizer, c.eval_limit)
  max_new = max(len(tokenizer.encode(x.expected, add_special_tokens=False))
                for s in sets.values() for x in s) + 2
  wrapped, acfg, geoms = model, None, {}
  if c.method != "full":  # adapters first: their geometries say which kernels to quantize
    acfg = _user_errors(_adapter_config, c)
    wrapped, acfg, trainable, geoms = _init_adapters(c, model, acfg, jnp.zeros((1, 8), jnp.int32))
    if reason := peft_io.unexportable_reason(acfg):
      _say(main, f"note: no peft_adapter/ will be written: {reason}")
  # QOFT / QLoRA: each targeted kernel is quantized as soon as the loader completes it, so
  # at most one parameter (one projection, all layers) is ever held in full precision.
  on_param = quant.quantize_on_load(geoms, c.quantize) if c.quantize != "none" else None
  _, base = _user_errors(gemma.load, model.config.source_dir, dtype=dtype,
                         param_dtype=param_dtype, on_param=on_param,
                         on_host=jax.default_backend() != "cpu" or jax.process_count() > 1)
  trainable, frozen = (base, {}) if c.method == "full" else (trainable, base)
  if main:
    _prepare_output_dir(c)
  distributed.barrier("output directory ready")

  # Host arrays go straight into their shards: no device holds the whole FSDP-sharded model.
  trainable = distributed.to_host(trainable)
  frozen = jax.device_put(frozen, sharding.param_shardings(frozen, mesh))
  trainable = jax.device_put(trainable, sharding.param_shardings(trainable, mesh,
                                                                 shard=c.method == "full"))
  optimizer = make_optimizer(c.lr, c.steps, c.warmup_steps, c.weight_decay, c.clip_norm)
  opt_state = sharding.onto_mesh(jax.jit(optimizer.init)(trainable), mesh)

  def loss_fn(params, batch):
    logits = wrapped.apply({"params": params}, batch["inputs"], positions=batch["positions"],
                           segment_ids=batch["segment_ids"])
    return masked_xent(logits, batch)

  coft = acfg is not None and acfg.coft_eps is not None  # PEFT's write-back after each update
  step_fn = make_train_step(loss_fn, optimizer, has_aux=True, accum_steps=c.grad_accum,
                            weight_key="tokens",
                            project=(lambda t: P.project_adapters(t, acfg)) if coft else None,
                            state_shardings=jax.tree_util.tree_map(
                                lambda x: x.sharding, (trainable, opt_state)))

  quantized = c.quantize != "none"

  def merged_model(tr):
    """The trained function as one full-precision tree, adapters folded in (export)."""
    base_params = quant.dequantize_params(frozen, geoms, dtype) if quantized else frozen
    full = P.merge_params(base_params, tr)
    return full if c.method == "full" else P.fold_adapters(full, geoms, acfg)

  def evaluated(tr):
    """Params for the evaluator: merged, or quantized kernels + unmerged adapters (QOFT)."""
    return P.merge_params(frozen, tr) if quantized else merged_model(tr)

  evaluator = Evaluator(wrapped if quantized else model, tokenizer, held_out.examples, sets,
                        c.seq_len, c.batch_size, max_new)
  ckpt = checkpoint.RunCheckpoints(os.path.join(c.output_dir, "checkpoints"),
                                   c.keep_checkpoints, c.save_every)
  start, data_state, eval_before, resumed = 0, None, None, {}
  if c.resume:
    start = ckpt.latest_step()
    state, resumed = ckpt.restore(start, {"trainable": trainable, "opt_state": opt_state})
    trainable, opt_state = state["trainable"], state["opt_state"]
    data_state, eval_before = resumed["data_state"], resumed["eval_before"]
    _say(main, f"resumed from step {start}")
  if eval_before is None:
    eval_before = evaluator.run(evaluated(trainable))
  _say(main, f"before: eval loss {eval_before['loss']:.4f} accuracy {eval_before['accuracy']:.3f}"
       + (f" retention {eval_before['retention_accuracy']:.3f}" if c.retention_data else ""))

  stream = data.PackedBatches(train.examples, batch_size=c.batch_size, seq_len=c.seq_len,
                              seed=c.seed, state=data_state, pad_id=evaluator.pad_id)
  metrics = outputs.MetricsLog(os.path.join(c.output_dir, "metrics.jsonl"),
                               resume_step=start if c.resume else None) if main else None
  meta = {"fingerprint": c.fingerprint(), "eval_before": eval_before}
  health = (jax.jit(lambda t: P.adapter_health(t, acfg, per_layer=False))
            if c.method in ("oft", "oftv1") else None)
  result = train_loop(c, step_fn, trainable, opt_state, frozen, stream, mesh, ckpt, metrics,
                      start, meta, stopper, health, resumed)
  ckpt.close()
  if result.stopped:
    _say(main, f"stopped at step {result.step}; rerun with --resume to continue")
    return {"stopped_at": result.step}
  final = evaluated(result.trainable)
  eval_after = evaluator.run(final)
  host_trainable = distributed.to_host(result.trainable)
  host_merged = None
  if c.export_merged:  # the evaluated tree already is the merged one unless quantized
    host_merged = distributed.to_host(merged_model(result.trainable) if quantized else final)
  if not main:
    return {"stopped_at": None, "process": jax.process_index()}
  return write_outputs(c, model, host_merged, host_trainable, frozen, acfg,
                       metrics.rows, eval_before, eval_after, train, result, t_start)


def _say(main: bool, text: str) -> None:
  if main:
    print(text, flush=True)
