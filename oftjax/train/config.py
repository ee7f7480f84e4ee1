"""Command-line configuration of a finetuning run, with one-line validation errors."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
from typing import Mapping

ASSETS = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "assets")
_ASSETS = os.path.normpath(ASSETS)
METHODS = ("oft", "oftv1", "lora", "full")
DEFAULT_TARGETS = r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


class UsageError(ValueError):
  """A user mistake: reported as one line, exit code 2, no traceback."""


def flag_of(field: str) -> str:
  """The command-line flag of a :class:`RunConfig` field: ``seq_len`` -> ``--seq-len``."""
  return "--" + field.replace("_", "-")


def reword(message: str, fields: Mapping[str, str]) -> str:
  """A library error message in the job's words: its parameter names become flags.

  Args:
    message: a library error's message, naming the library's parameters.
    fields: ``{library parameter: RunConfig field}`` of the call that raised it.

  Returns:
    ``message`` with every whole-word parameter of ``fields`` replaced by its flag, except
    a ``name=value`` (a value shown) and anything inside single quotes (the user's input).
  """
  if not fields:
    return message
  name = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, fields)) + r")\b(?!=)")
  parts = re.split(r"('[^']*')", message)
  return "".join(part if i % 2 else name.sub(lambda m: flag_of(fields[m.group(1)]), part)
                 for i, part in enumerate(parts))


@dataclasses.dataclass
class RunConfig:
  """Every knob of a run; field docs double as ``--help`` text (see ``_HELP``)."""

  model: str = os.path.join(_ASSETS, "tiny-gemma3")
  data: str = os.path.join(_ASSETS, "task", "train.jsonl")
  eval_data: str = os.path.join(_ASSETS, "task", "eval.jsonl")
  retention_data: str = os.path.join(_ASSETS, "task", "retention.jsonl")
  method: str = "oft"
  block_size: int = 16
  neumann_terms: int = 6
  parameterization: str = "cayley_neumann"
  adapter_precision: str = "highest"
  lora_rank: int = 16
  lora_alpha: float = 16.0
  targets: str = DEFAULT_TARGETS
  steps: int = 150
  batch_size: int = 16
  grad_accum: int = 1
  seq_len: int = 64
  lr: float = 5e-3
  warmup_steps: int = -1
  weight_decay: float = 0.0
  clip_norm: float = 1.0
  on_nonfinite: str = "skip"
  dtype: str = "auto"
  seed: int = 0
  mesh: str = ""
  coordinator_address: str = ""
  num_processes: int = 1
  process_id: int = 0
  log_every: int = 10
  save_every: int = 50
  keep_checkpoints: int = 2
  eval_limit: int = 64
  output_dir: str = "runs/finetune"
  resume: bool = False
  overwrite: bool = False
  export_merged: str = ""
  init_adapter: str = ""
  truncate: bool = False
  quantize: str = "none"

  def fingerprint(self) -> dict:
    """Fields that must match for ``--resume`` to continue the same run."""
    keep = ("model", "data", "method", "block_size", "neumann_terms", "parameterization",
            "adapter_precision", "lora_rank", "lora_alpha", "targets", "steps", "batch_size", "grad_accum",
            "seq_len", "lr", "warmup_steps", "weight_decay", "clip_norm", "dtype", "seed",
            "init_adapter", "truncate", "quantize")
    return {k: getattr(self, k) for k in keep}


_HELP = {
    "model": "base model: a local Hugging Face folder or a hub id",
    "data": "training JSONL: {prompt,completion}, {messages} or {text} records",
    "eval_data": "held-out JSONL of the task (loss and exact-match accuracy)",
    "retention_data": "held-out JSONL of what the base already does (forgetting); '' to skip",
    "method": "oft (OFTv2, input-centric), oftv1 (original weight-centric OFT), lora, full",
    "block_size": "OFT block size b; must divide every targeted input width",
    "neumann_terms": "Cayley-Neumann terms n (even n is more orthogonal, docs/DESIGN.md §1)",
    "parameterization": "cayley_neumann (OFTv2) or cayley (exact inverse)",
    "adapter_precision": "matmul precision of the adapter's own math (Neumann powers, "
                         "rotation, LoRA products, merge): highest is true float32 on every "
                         "backend, as PEFT's; default (TF32 on NVIDIA GPUs, one bf16 pass on "
                         "TPU) and high trade exactness for speed",
    "lora_rank": "LoRA rank", "lora_alpha": "LoRA alpha (scale = alpha / rank)",
    "targets": "regex full-matched against linear-layer paths, e.g. layers/self_attn/q_proj",
    "steps": "optimizer steps", "batch_size": "packed rows per micro-batch",
    "grad_accum": "micro-batches per optimizer step", "seq_len": "tokens per packed row",
    "lr": "peak learning rate (AdamW, linear warmup then cosine decay)",
    "warmup_steps": "linear warmup steps (-1: min(10, steps // 10))", "weight_decay": "AdamW weight decay",
    "clip_norm": "global gradient-norm clip (0 disables)",
    "on_nonfinite": "a step with a non-finite loss or gradient: skip it (weights unchanged, "
                    "counted in metrics.jsonl as skipped_steps) or stop the run (exit 2)",
    "dtype": "compute dtype: auto (float32 on CPU, bfloat16 on GPU/TPU), float32, bfloat16",
    "seed": "seed of adapter init and data order",
    "mesh": "device mesh over all processes' devices, e.g. data=2,fsdp=4 (default: all on data)",
    "coordinator_address": "several hosts: HOST:PORT of process 0 (jax.distributed)",
    "num_processes": "several hosts: number of processes (0: let JAX detect a TPU pod / SLURM)",
    "process_id": "this process's index",
    "log_every": "steps between metrics.jsonl lines", "save_every": "steps between checkpoints",
    "keep_checkpoints": "checkpoints kept", "eval_limit": "max examples per eval set",
    "output_dir": "where summary.json, metrics.jsonl, checkpoints and peft_adapter/ go",
    "resume": "continue from the latest checkpoint in --output-dir",
    "overwrite": "replace an existing run in --output-dir",
    "export_merged": "also write a Hugging Face folder with the adapter folded in",
    "init_adapter": "start from a PEFT OFT/LoRA adapter folder",
    "truncate": "truncate over-long examples (counted and reported) instead of failing",
    "quantize": "store the targeted frozen kernels as nf4 (QLoRA NormalFloat4, blocks of 64, "
                "double-quantized scales) or int8 (per output channel); adapters stay float32",
}


class _Parser(argparse.ArgumentParser):
  """Reports a bad flag as a one-line :class:`UsageError` instead of usage text + exit."""

  def error(self, message):
    raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
  """The ``finetune_gemma.py`` argument parser; every flag shows its default."""
  parser = _Parser(
      description="Finetune a Gemma model with OFTv2 (or a baseline) in JAX.",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  for field in dataclasses.fields(RunConfig):
    flag = flag_of(field.name)
    if field.type in ("bool", bool):
      parser.add_argument(flag, action="store_true", help=_HELP[field.name])
    else:
      kind = {"int": int, "float": float}.get(str(field.type), str)
      choices = {"method": METHODS, "parameterization": ("cayley_neumann", "cayley"),
                 "adapter_precision": ("default", "high", "highest"),
                 "dtype": ("auto", "float32", "bfloat16"),
                 "on_nonfinite": ("skip", "stop"),
                 "quantize": ("none", "int8", "nf4")}.get(field.name)
      parser.add_argument(flag, type=kind, default=field.default, choices=choices,
                          help=_HELP[field.name])
  return parser


def parse_args(argv=None) -> RunConfig:
  """Parses and validates ``argv`` into a :class:`RunConfig`."""
  return finalize(RunConfig(**vars(build_parser().parse_args(argv))))


def finalize(config: RunConfig) -> RunConfig:
  """Resolves derived defaults (``warmup_steps=-1``) and validates ``config``, in place."""
  if config.warmup_steps == -1:
    config.warmup_steps = min(10, max(config.steps, 0) // 10)
  validate(config)
  return config


# AdapterConfig field -> the RunConfig field whose flag sets it (for AdapterConfig's errors;
# method and parameterization are argparse choices, refused before AdapterConfig sees them).
_ADAPTER_FIELDS = {"targets": "targets", "block_size": "block_size",
                   "num_terms": "neumann_terms", "lora_rank": "lora_rank"}


def adapter_config(c: RunConfig):
  """The run's :class:`oftjax.AdapterConfig`; with ``--method full`` one of method ``oft``
  (no adapter is made, but the adapter flags are checked all the same).

  Raises:
    UsageError: a value AdapterConfig refuses, worded with its flag.
  """
  from oftjax import adapters  # heavy (jax): only once argparse has accepted the flags

  method = c.method if c.method in adapters.METHODS else "oft"
  try:
    return adapters.AdapterConfig(
        method=method, targets=c.targets, block_size=c.block_size, num_terms=c.neumann_terms,
        parameterization=c.parameterization, lora_rank=c.lora_rank, lora_alpha=c.lora_alpha,
        precision=c.adapter_precision)
  except ValueError as e:
    raise UsageError(reword(str(e), _ADAPTER_FIELDS)) from None


def validate(c: RunConfig) -> None:
  """Checks values that need no files; raises :class:`UsageError` with one line."""
  for name in ("steps", "batch_size", "grad_accum", "seq_len", "log_every", "save_every",
               "keep_checkpoints", "eval_limit"):
    if getattr(c, name) < 1:
      raise UsageError(f"{flag_of(name)} must be a positive integer "
                       f"(got {getattr(c, name)})")
  for name in ("lr", "weight_decay", "clip_norm", "lora_alpha"):
    value = getattr(c, name)
    if not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
      raise UsageError(f"{flag_of(name)} must be a finite "
                       f"{'positive' if name == 'lr' else 'non-negative'} number (got {value})")
  if c.warmup_steps < 0 or c.warmup_steps >= c.steps:
    raise UsageError(f"--warmup-steps must be in [0, --steps) (got {c.warmup_steps})")
  adapter_config(c)  # AdapterConfig checks the adapter flags (for every --method)
  if c.num_processes < 0:
    raise UsageError(f"--num-processes must be >= 0 (got {c.num_processes})")
  if not c.output_dir.strip():
    raise UsageError("--output-dir must not be empty")
  if os.path.exists(c.output_dir) and not os.path.isdir(c.output_dir):
    raise UsageError(f"--output-dir {c.output_dir} is a file, not a folder")
  if c.export_merged and (c.overwrite or not os.path.exists(c.export_merged)):
    export, out = os.path.realpath(c.export_merged), os.path.realpath(c.output_dir)
    if out == export or out.startswith(export + os.sep):  # the export would replace the run
      raise UsageError(f"--export-merged {c.export_merged} would hold --output-dir "
                       f"{c.output_dir}; choose a folder outside it")
  if c.resume and c.overwrite:
    raise UsageError("--resume and --overwrite contradict each other; pick one")
  if c.quantize != "none" and c.method == "full":
    raise UsageError("--quantize needs --method oft, oftv1 or lora (full finetuning updates the "
                     "kernels)")
  if c.init_adapter and c.method not in ("oft", "oftv1", "lora"):
    raise UsageError("--init-adapter needs --method oft, oftv1 or lora")
