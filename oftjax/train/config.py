"""Command-line configuration of a finetuning run, with one-line validation errors.

Each `RunConfig` field is declared once, with its `--help` text, its `choices`
and whether `--resume` needs it unchanged (`resume`) in the field's metadata; the
parser (`build_parser`) and `RunConfig.fingerprint` read them from there.

The shipped tiny model and task are not part of the package: their folder comes from
`$OFTJAX_ASSETS` (`experiments/finetune_gemma.py` points it at its own `assets/`
folder). Without it `--model`, `--data` and `--eval-data` have no default.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
import dataclasses
import importlib.util
import math
import os
import re

ASSETS_ENV = "OFTJAX_ASSETS"
METHODS = ("oft", "oftv1", "lora", "full")
DEFAULT_TARGETS = r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
# `auto` and `oftjax.models.remat.POLICIES` (not imported: it needs jax; a test keeps them equal).
REMAT_CHOICES = ("auto", "none", "full", "dots", "dots_no_batch")


class UsageError(ValueError):
  """A user mistake: reported as one line, exit code 2, no traceback."""


def flag_of(field: str) -> str:
  """The command-line flag of a `RunConfig` field: `seq_len` -> `--seq-len`."""
  return "--" + field.replace("_", "-")


def reword(message: str, fields: Mapping[str, str]) -> str:
  """A library error message in the job's words: its parameter names become flags.

  Args:
    message: a library error's message, naming the library's parameters.
    fields: `{library parameter: RunConfig field}` of the call that raised it.

  Returns:
    `message` with every whole-word parameter of `fields` replaced by its flag, except
    a `name=value` (a value shown) and anything inside single quotes (the user's input).
  """
  if not fields:
    return message
  name = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, fields)) + r")\b(?!=)")
  parts = re.split(r"('[^']*')", message)
  return "".join(
    part if i % 2 else name.sub(lambda m: flag_of(fields[m.group(1)]), part)
    for i, part in enumerate(parts)
  )


def shipped_asset(*parts: str) -> str:
  """Path of a shipped asset under `$OFTJAX_ASSETS`, or `''` when that is not set."""
  root = os.environ.get(ASSETS_ENV, "")
  return os.path.join(root, *parts) if root else ""


def _field(default, help: str, *, choices: tuple | None = None, resume: bool = False):
  """One `RunConfig` field: its default, `--help` text, choices, resume relevance."""
  return dataclasses.field(
    default=default, metadata={"help": help, "choices": choices, "resume": resume}
  )


@dataclasses.dataclass
class RunConfig:
  """Every knob of a run; each field's metadata holds its `--help` text."""

  model: str = _field(
    shipped_asset("tiny-gemma3"), "base model: a local Hugging Face folder or a hub id", resume=True
  )
  data: str = _field(
    shipped_asset("task", "train.jsonl"),
    "training data of {prompt,completion}, {messages} or {text} records: a JSONL or Parquet "
    "file, a datasets save_to_disk folder or a hub dataset id",
    resume=True,
  )
  data_split: str = _field(
    "train", "split of --data when it holds several (a DatasetDict folder, a hub id)", resume=True
  )
  eval_data: str = _field(
    shipped_asset("task", "eval.jsonl"),
    "held-out set of the task, same kinds as --data: loss, perplexity and exact-match "
    "accuracy ({text} records: loss and perplexity only)",
  )
  eval_split: str = _field(
    "test", "split of --eval-data and --retention-data when they hold several"
  )
  retention_data: str = _field(
    shipped_asset("task", "retention.jsonl"),
    "held-out prompt/completion or {messages} set of what the base already does (forgetting, "
    "exact-match accuracy); same kinds as --data; '' to skip",
  )
  method: str = _field(
    "oft",
    "oft (OFTv2, input-centric), oftv1 (original weight-centric OFT), lora, full",
    choices=METHODS,
    resume=True,
  )
  block_size: int = _field(
    16, "OFT block size b; must divide every targeted input width", resume=True
  )
  neumann_terms: int = _field(
    6, "Cayley-Neumann terms n (even n is more orthogonal, docs/DESIGN.md §1)", resume=True
  )
  parameterization: str = _field(
    "cayley_neumann",
    "cayley_neumann (OFTv2) or cayley (exact inverse)",
    choices=("cayley_neumann", "cayley"),
    resume=True,
  )
  adapter_precision: str = _field(
    "highest",
    "matmul precision of the adapter's own math (Neumann powers, rotation, LoRA products, "
    "merge): highest is true float32 on every backend, as PEFT's; default (TF32 on NVIDIA "
    "GPUs, one bf16 pass on TPU) and high trade exactness for speed",
    choices=("default", "high", "highest"),
    resume=True,
  )
  oft_dropout: float = _field(
    0.0,
    "OFT multiplicative dropout (Qiu et al. 2023): while training, each block is replaced "
    "by the identity with this probability; evaluation and exports use every block",
    resume=True,
  )
  lora_rank: int = _field(16, "LoRA rank", resume=True)
  lora_alpha: float = _field(16.0, "LoRA alpha (scale = alpha / rank)", resume=True)
  targets: str = _field(
    DEFAULT_TARGETS,
    "regex full-matched against linear-layer paths, e.g. layers/self_attn/q_proj",
    resume=True,
  )
  steps: int = _field(150, "optimizer steps", resume=True)
  batch_size: int = _field(16, "packed rows per micro-batch", resume=True)
  grad_accum: int = _field(1, "micro-batches per optimizer step", resume=True)
  seq_len: int = _field(64, "tokens per packed row", resume=True)
  lr: float = _field(
    5e-3, "peak learning rate (AdamW, linear warmup then cosine decay)", resume=True
  )
  warmup_steps: int = _field(-1, "linear warmup steps (-1: min(10, steps // 10))", resume=True)
  weight_decay: float = _field(0.0, "AdamW weight decay", resume=True)
  clip_norm: float = _field(1.0, "global gradient-norm clip (0 disables)", resume=True)
  on_nonfinite: str = _field(
    "skip",
    "a step with a non-finite loss or gradient: skip it (weights unchanged, counted in "
    "metrics.jsonl as skipped_steps) or stop the run (exit 2)",
    choices=("skip", "stop"),
  )
  remat: str = _field(
    "auto",
    "rematerialisation of each decoder layer in the backward pass: none, full (keep only "
    "its input), dots (keep matmul outputs), dots_no_batch (keep weight-matmul outputs); "
    "auto: the first of none, dots_no_batch, full whose compiled step fits the memory "
    "budget (README: Memory)",
    choices=REMAT_CHOICES,
  )
  unroll_layers: str = _field(
    "auto",
    "trace the decoder's layer scan unrolled (same math; no per-step copies of each layer's "
    "weights and saved activations out of and into stacked arrays, but a longer compile and "
    "one more copy of the weights in memory): on, off, auto (on for the CPU backend when the "
    "decoder's weights are at most 1 GiB; off on GPU/TPU and for larger models)",
    choices=("auto", "on", "off"),
  )
  dtype: str = _field(
    "auto",
    "compute dtype: auto (float32 on CPU, bfloat16 on GPU/TPU), float32, bfloat16",
    choices=("auto", "float32", "bfloat16"),
    resume=True,
  )
  seed: int = _field(0, "seed of adapter init and data order", resume=True)
  mesh: str = _field(
    "", "device mesh over all processes' devices, e.g. data=2,fsdp=4 (default: all on data)"
  )
  coordinator_address: str = _field("", "several hosts: HOST:PORT of process 0 (jax.distributed)")
  num_processes: int = _field(
    1, "several hosts: number of processes (0: let JAX detect a TPU pod / SLURM)"
  )
  process_id: int = _field(0, "this process's index")
  log_every: int = _field(10, "steps between metrics.jsonl lines")
  eval_every: int | None = _field(
    None,
    "also evaluate every N steps during training (eval loss; accuracy where the eval set has "
    "answers), logged as kind 'eval' rows of metrics.jsonl; None: only before and after",
  )
  tensorboard: str = _field(
    "", "also write the logged scalars as TensorBoard event files into this folder"
  )
  wandb: bool = _field(False, "also log the scalars to Weights & Biases (pip install wandb)")
  save_every: int = _field(50, "steps between checkpoints")
  keep_checkpoints: int = _field(2, "checkpoints kept")
  eval_limit: int = _field(64, "max examples per eval set")
  output_dir: str = _field(
    "runs/finetune", "where summary.json, metrics.jsonl, checkpoints and peft_adapter/ go"
  )
  resume: bool = _field(False, "continue from the latest checkpoint in --output-dir")
  overwrite: bool = _field(False, "replace an existing run in --output-dir")
  export_merged: str = _field("", "also write a Hugging Face folder with the adapter folded in")
  export_lora: int = _field(
    0,
    "also write the OFT adapter as a PEFT LoRA adapter of this rank (lora_adapter/, for "
    "servers without OFT such as vLLM/SGLang) and lora_export.json (truncation and logit "
    "errors, error vs rank); 0: off",
  )
  init_adapter: str = _field("", "start from a PEFT OFT/LoRA adapter folder", resume=True)
  truncate: bool = _field(
    False,
    "truncate over-long prompt/completion and {messages} examples (counted and reported) "
    "instead of failing; {text} documents longer than --seq-len are always split across rows",
    resume=True,
  )
  quantize: str = _field(
    "none",
    "store the targeted frozen kernels as nf4 (QLoRA NormalFloat4, blocks of 64, "
    "double-quantized scales) or int8 (per output channel); adapters stay float32",
    choices=("none", "int8", "nf4"),
    resume=True,
  )

  def fingerprint(self) -> dict:
    """Fields that must match for `--resume` to continue the same run (`resume=True`)."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata["resume"]}


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(RunConfig)}


class UsageParser(argparse.ArgumentParser):
  """Reports a bad flag as a one-line `UsageError` instead of usage text + exit."""

  def error(self, message):
    raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
  """The `finetune_gemma.py` argument parser; every flag shows its default."""
  parser = UsageParser(
    description="Finetune a Gemma model with OFTv2 (or a baseline) in JAX.",
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  for field in dataclasses.fields(RunConfig):
    flag = flag_of(field.name)
    help_text = field.metadata["help"]
    if field.type in ("bool", bool):
      parser.add_argument(flag, action="store_true", help=help_text)
    else:
      kind = {"int": int, "int | None": int, "float": float}.get(str(field.type), str)
      parser.add_argument(
        flag, type=kind, default=field.default, choices=field.metadata["choices"], help=help_text
      )
  return parser


def parse_args(argv=None) -> RunConfig:
  """Parses and validates `argv` into a `RunConfig`."""
  return finalize(RunConfig(**vars(build_parser().parse_args(argv))))


def finalize(config: RunConfig) -> RunConfig:
  """Resolves derived defaults (`warmup_steps=-1`) and validates `config`, in place."""
  if config.warmup_steps == -1:
    config.warmup_steps = min(10, max(config.steps, 0) // 10)
  check_assets(config)
  validate(config)
  return config


# AdapterConfig field -> the RunConfig field whose flag sets it (for AdapterConfig's errors;
# method and parameterization are argparse choices, refused before AdapterConfig sees them).
_ADAPTER_FIELDS = {
  "targets": "targets",
  "block_size": "block_size",
  "num_terms": "neumann_terms",
  "lora_rank": "lora_rank",
  "block_dropout": "oft_dropout",
}


def adapter_config(c: RunConfig):
  """The run's `oftjax.AdapterConfig`.

  With `--method full` one of method `oft` (no adapter is made, but the adapter flags
  are checked all the same).

  Raises:
    UsageError: a value AdapterConfig refuses, worded with its flag.
  """
  from oftjax import adapters  # heavy (jax): only once argparse has accepted the flags

  method = c.method if c.method in adapters.METHODS else "oft"
  try:
    return adapters.AdapterConfig(
      method=method,
      targets=c.targets,
      block_size=c.block_size,
      num_terms=c.neumann_terms,
      parameterization=c.parameterization,
      lora_rank=c.lora_rank,
      lora_alpha=c.lora_alpha,
      block_dropout=c.oft_dropout if method != "lora" else 0.0,
      precision=c.adapter_precision,
    )
  except ValueError as e:
    raise UsageError(reword(str(e), _ADAPTER_FIELDS)) from None


def remat_policy(c: RunConfig) -> str:
  """The `--remat` policy the model is built with: `auto` starts at `none`.

  With `auto` the loop then compiles the step with less and less kept until its
  temporaries fit the memory budget (`oftjax.train.remat_choice`).
  """
  return "none" if c.remat == "auto" else c.remat


# `--unroll-layers auto` unrolls only decoders whose weights are at most this many bytes.
# Unrolled, XLA CPU materialises every layer's weight slices as copies that live at once (a
# static slice is a copy too), about one more copy of the weights in the step's temporaries:
# cheap for a small model, while a real-shaped gemma-3-1b compiled ten times longer, needed
# `--remat full` to fit and ran slower than its scan (BENCHMARKS: "Real-shaped runs").
UNROLL_MAX_BYTES = 1 << 30


def unrolls_layers(c: RunConfig, backend: str, weight_bytes: int) -> bool:
  """Whether run `c` traces the layer scan unrolled.

  Args:
    c: the run's configuration.
    backend: `jax.default_backend()`.
    weight_bytes: the decoder's parameter bytes as stored.
  """
  if c.unroll_layers != "auto":
    return c.unroll_layers == "on"
  return backend == "cpu" and weight_bytes <= UNROLL_MAX_BYTES


def check_assets(c: RunConfig) -> None:
  """Paths left at their shipped default must exist; one line naming the flag otherwise.

  Raises:
    UsageError: `--model`, `--data` or `--eval-data` is empty (no shipped default:
      `$OFTJAX_ASSETS` unset, e.g. in an installed wheel), or a shipped default is missing.
  """
  root = shipped_asset()
  for name in ("model", "data", "eval_data", "retention_data"):
    value, default = getattr(c, name), _DEFAULTS[name]
    if not value and name != "retention_data":
      raise UsageError(
        f"{flag_of(name)} is required: there is no shipped default "
        f"(${ASSETS_ENV} is not set); pass {flag_of(name)} PATH"
      )
    if value and value == default and not os.path.exists(value):
      raise UsageError(
        f"{flag_of(name)}: the shipped default {value} is missing (${ASSETS_ENV} "
        f"is {root}); pass {flag_of(name)} PATH"
      )


def validate(c: RunConfig) -> None:
  """Checks values that need no files; raises `UsageError` with one line."""
  for name in (
    "steps",
    "batch_size",
    "grad_accum",
    "seq_len",
    "log_every",
    "save_every",
    "keep_checkpoints",
    "eval_limit",
  ):
    if getattr(c, name) < 1:
      raise UsageError(f"{flag_of(name)} must be a positive integer (got {getattr(c, name)})")
  if c.eval_every is not None and c.eval_every < 1:
    raise UsageError(
      f"--eval-every must be a positive integer (got {c.eval_every}); leave it out to "
      "evaluate only before and after training"
    )
  for flag, package, wanted in (
    ("--wandb", "wandb", c.wandb),
    ("--tensorboard", "tensorboardX", c.tensorboard),
  ):
    if wanted and importlib.util.find_spec(package) is None:
      raise UsageError(
        f"{flag} needs the {package} package, which is not installed: pip install {package}"
      )
  if c.tensorboard and os.path.exists(c.tensorboard) and not os.path.isdir(c.tensorboard):
    raise UsageError(f"--tensorboard {c.tensorboard} is a file, not a folder")
  for name in ("lr", "weight_decay", "clip_norm", "lora_alpha"):
    value = getattr(c, name)
    if not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
      raise UsageError(
        f"{flag_of(name)} must be a finite "
        f"{'positive' if name == 'lr' else 'non-negative'} number (got {value})"
      )
  if c.warmup_steps < 0 or c.warmup_steps >= c.steps:
    raise UsageError(f"--warmup-steps must be in [0, --steps) (got {c.warmup_steps})")
  if c.oft_dropout and c.method not in ("oft", "oftv1"):
    raise UsageError(f"--oft-dropout needs --method oft or oftv1 (got --method {c.method})")
  if c.export_lora < 0:
    raise UsageError(f"--export-lora must be a rank >= 1, or 0 for none (got {c.export_lora})")
  if c.export_lora and c.method not in ("oft", "oftv1"):
    raise UsageError(
      f"--export-lora converts an OFT adapter; it needs --method oft or oftv1 (got {c.method})"
    )
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
      raise UsageError(
        f"--export-merged {c.export_merged} would hold --output-dir "
        f"{c.output_dir}; choose a folder outside it"
      )
  if c.resume and c.overwrite:
    raise UsageError("--resume and --overwrite contradict each other; pick one")
  if c.quantize != "none" and c.method == "full":
    raise UsageError(
      "--quantize needs --method oft, oftv1 or lora (full finetuning updates the kernels)"
    )
  if c.init_adapter and c.method not in ("oft", "oftv1", "lora"):
    raise UsageError("--init-adapter needs --method oft, oftv1 or lora")
