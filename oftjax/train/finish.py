"""The end of a run: PEFT adapter, optional merged HF export, loss plot, summary.json.

An adapter PEFT cannot represent (Cayley–Neumann with n < 4) is not exported; the reason is
announced when the run starts and recorded as `peft_export_skipped` (the orbax checkpoint
still holds it), so a finished run never ends in a crash.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import numpy as np

from oftjax import atomic, peft_io, quant
from oftjax import params as P
from oftjax.models import gemma
from oftjax.train import outputs
from oftjax.train.loop import LoopStats
from oftjax.train.phases import PhaseClock, peak_rss_bytes
from oftjax.train.state import RunState


def peft_naming(model) -> peft_io.ModuleNaming:
  """How the base folder's PyTorch model names its modules (text-only or multimodal)."""
  folder = model.config.source_dir
  hf_config = gemma.read_hf_config(folder) if folder else model.config.hf_config
  return peft_io.ModuleNaming.from_layout(gemma.module_layout(hf_config))


@dataclasses.dataclass(frozen=True)
class RunRecord:
  """What a finished run measured besides its state (`summary.json`, the loss plot).

  Attributes:
    eval_before: the evaluator's result before training (`Evaluator.run`).
    eval_after: its result after training.
    rows: the `metrics.jsonl` rows (train and eval).
    loop: what the training loop measured (`oftjax.train.loop.LoopStats`).
    train: the training `Dataset` (its record, example, target-token, truncation and
      split counts are reported).
    t_start: `time.time()` when the run started.
    clock: the run's phase timings so far (`oftjax.train.phases.PhaseClock`); the
      exports are timed here.
    lora_export: the `--export-lora` summary (`oftjax.train.lora_export.export_lora`),
      or `None`.
    unroll_layers: whether the decoder's layer scan ran unrolled (`--unroll-layers`).
  """

  eval_before: dict
  eval_after: dict
  rows: list
  loop: LoopStats
  train: Any
  t_start: float
  clock: PhaseClock
  lora_export: dict | None = None
  unroll_layers: bool = False


def write_outputs(c, job, state: RunState, merged, record: RunRecord) -> dict:
  """Writes every output of a finished run; `summary.json` last (atomically).

  Args:
    c: the run's `RunConfig`.
    job: the run's model (`oftjax.train.run_model`): base module, frozen tree,
      adapter config.
    state: the final state, its `trainable` a host (numpy) tree.
    merged: the merged tree, only needed with `--export-merged` (else `None`): host
      arrays, or on one process the arrays where they are (saved tensor by tensor).
    record: what the run measured.

  Returns:
    The summary written.
  """
  out = c.output_dir
  acfg, frozen, trainable = job.adapter_config, job.frozen, state.trainable
  eval_before, eval_after = record.eval_before, record.eval_after
  adapter_dir = None
  skipped_export = peft_io.unexportable_reason(acfg) if acfg is not None else None
  if acfg is not None and not skipped_export:
    adapter_dir = os.path.join(out, "peft_adapter")
    peft_io.export_peft(
      adapter_dir, trainable, acfg, base_model=c.model, naming=peft_naming(job.model)
    )
  record.clock.mark("export_peft")
  if c.export_merged:
    gemma.save(c.export_merged, job.model, merged, tokenizer_dir=c.model, overwrite=c.overwrite)
    record.clock.mark("export_merged")
  outputs.plot_loss(
    record.rows,
    os.path.join(out, "loss.png"),
    f"{c.method} on {os.path.basename(os.path.normpath(c.data))}",
  )
  record.clock.mark("plot")
  times = record.loop.times
  steady = times[1:] if len(times) > 1 else times
  tokens_per_step = record.loop.tokens / max(len(times), 1)
  retention = {}
  if "retention_accuracy" in eval_before:
    retention = {
      "retention_before": eval_before["retention_accuracy"],
      "retention_after": eval_after["retention_accuracy"],
    }
  strip = lambda e: {k: v for k, v in e.items() if k != "samples"}
  summary = {
    "model": c.model,
    "method": c.method,
    "steps": c.steps,
    "config": vars(c),
    "trainable_params": P.count_params(trainable),
    "total_params": quant.logical_count(frozen) + P.count_params(trainable),
    "eval_before": strip(eval_before),
    "eval_after": strip(eval_after),
    **retention,
    "samples_after": eval_after.get("samples", []),
    "train_tokens_per_s": tokens_per_step / float(np.median(steady)) if steady else None,
    "step_time_s": float(np.median(steady)) if steady else None,
    "compile_s": record.loop.compile_s,
    "remat": record.loop.remat,
    "unroll_layers": record.unroll_layers,
    "train_step_temp_bytes": record.loop.temp_bytes,
    "train_steps_s": float(sum(times)),
    "phases": record.clock.phases,
    "peak_rss_bytes": peak_rss_bytes(),
    "wall_s": time.time() - record.t_start,
    "final_loss": state.loss,
    "processes": jax.process_count(),
    "devices": jax.device_count(),
    "frozen_weight_bytes": P.tree_bytes(frozen),
    "adapter_bytes": P.tree_bytes(trainable),
    "skipped_steps": state.skipped_steps,
    "train_records": record.train.num_records,
    "train_examples": len(record.train.examples),
    "train_target_tokens": record.train.num_target_tokens,
    "truncated_examples": record.train.num_truncated,
    "split_documents": record.train.num_split,
    "split_chunks": record.train.num_split_chunks,
    "peft_adapter": adapter_dir,
    "peft_export_skipped": skipped_export,
    "export_merged": c.export_merged or None,
    "lora_export": record.lora_export,
  }
  atomic.write_json(os.path.join(out, "summary.json"), summary, indent=2, sort_keys=True)
  return summary
