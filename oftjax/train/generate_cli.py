"""The generation command (`experiments/generate.py`): prompts in, completions out.

It runs a base model, a finetuned adapter on it, or a merged folder; completions stream to
stdout as they are decoded (one prompt per batch), or are written as JSONL.

Generation is `oftjax.models.gemma.generate`, the function the finetuning job's evaluator
calls, over prompts tokenized as the job tokenizes them (`oftjax.data.prompts`) and cut at the
same stop tokens (`oftjax.data.default_stop_ids`), so greedy completions here are the ones the
job's exact-match accuracy scores. Every user mistake is one line naming the flag, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, TextIO

from oftjax.train.config import UsageError, UsageParser, reword, shipped_asset

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
# Library parameter -> flag field, for the sampling checks' messages.
_SAMPLING_FLAGS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p"}


def build_parser() -> argparse.ArgumentParser:
  """The `generate.py` argument parser; every flag shows its default."""
  p = UsageParser(
    description="Generate with a Gemma model, a finetuned adapter on it, or a merged folder.",
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  p.add_argument(
    "--model",
    default=shipped_asset("tiny-gemma3"),
    help="base model: a local Hugging Face folder or a hub id (its tokenizer is used)",
  )
  which = p.add_mutually_exclusive_group()
  which.add_argument(
    "--adapter",
    default="",
    help="a PEFT OFT/LoRA adapter folder for --model, or a finetuning run folder "
    "(--output-dir of finetune_gemma.py; its peft_adapter/ is used)",
  )
  which.add_argument(
    "--merged",
    default="",
    help="a merged Hugging Face folder (finetune_gemma.py --export-merged) to run "
    "instead of --model",
  )
  p.add_argument(
    "--unmerged",
    action="store_true",
    help="with --adapter: apply the adapter at every step instead of folding it into the "
    "kernels once",
  )
  p.add_argument("--prompt", action="append", default=[], help="a prompt text (repeat for several)")
  p.add_argument(
    "--prompts",
    default="",
    help='JSONL of {"prompt"} or {"messages"} records (the job\'s eval files work)',
  )
  p.add_argument(
    "--chat", action="store_true", help="put plain prompts in the chat template as a user turn"
  )
  p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt")
  p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sampling")
  p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
  p.add_argument("--top-p", type=float, default=None, help="sample within the top-p nucleus")
  p.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same output)")
  p.add_argument(
    "--batch-size",
    type=int,
    default=1,
    help="prompts per batch (left-padded); streaming to stdout needs 1",
  )
  p.add_argument(
    "--output",
    default="",
    help="also write one JSON object per prompt to this file ('-': JSONL to stdout instead "
    "of text)",
  )
  p.add_argument(
    "--no-stream", action="store_true", help="print each completion when it is finished"
  )
  p.add_argument(
    "--dtype",
    default="auto",
    choices=("auto", "float32", "bfloat16"),
    help="compute dtype: auto (float32 on CPU, bfloat16 on GPU/TPU)",
  )
  return p


def _is_model_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "config.json"))


def _looks_local(path: str) -> bool:
  """A path rather than a hub id (`org/name`)."""
  return os.path.isabs(path) or path.startswith(".") or path.count("/") != 1 or os.path.exists(path)


def adapter_folder(path: str) -> str:
  """The PEFT folder `--adapter` names: itself, or a run folder's `peft_adapter/`.

  Raises:
    UsageError: the folder is missing or holds neither.
  """
  if not os.path.isdir(path):
    raise UsageError(f"--adapter {path}: no such folder")
  if os.path.isfile(os.path.join(path, "adapter_config.json")):
    return path
  inner = os.path.join(path, "peft_adapter")
  if os.path.isfile(os.path.join(inner, "adapter_config.json")):
    return inner
  if os.path.isfile(os.path.join(path, "summary.json")):
    raise UsageError(
      f"--adapter {path}: this run wrote no peft_adapter/ (see its summary.json); "
      "generate from its --export-merged folder with --merged"
    )
  raise UsageError(
    f"--adapter {path}: holds neither adapter_config.json (a PEFT adapter folder) nor "
    "peft_adapter/ (a finetuning run folder)"
  )


def validate(args: argparse.Namespace) -> None:
  """Checks flags that need no model; raises `UsageError` with one line."""
  if args.prompt and args.prompts:
    raise UsageError("--prompt and --prompts contradict each other; pick one")
  if not args.prompt and not args.prompts:
    raise UsageError("no prompt: pass --prompt TEXT or --prompts FILE.jsonl")
  if args.unmerged and not args.adapter:
    raise UsageError("--unmerged needs --adapter")
  for name in ("max_new_tokens", "batch_size"):
    if getattr(args, name) < 1:
      raise UsageError(f"--{name.replace('_', '-')} must be a positive integer")
  from oftjax.models.gemma import sampling  # jax, only once the flags parse

  try:
    sampling.check_settings(args.temperature, args.top_k, args.top_p)
  except ValueError as e:
    raise UsageError(reword(str(e), _SAMPLING_FLAGS)) from None
  if args.merged and not _is_model_dir(args.merged):
    state = "no such folder" if not os.path.isdir(args.merged) else "no config.json in it"
    raise UsageError(f"--merged {args.merged}: {state} (a Hugging Face model folder)")
  if not args.merged:
    if not args.model:
      raise UsageError("--model is required: there is no shipped default; pass --model PATH")
    if _looks_local(args.model) and not _is_model_dir(args.model):
      state = "no such folder" if not os.path.isdir(args.model) else "no config.json in it"
      raise UsageError(f"--model {args.model}: {state} (a Hugging Face model folder)")
  if args.adapter:
    adapter_folder(args.adapter)
  if args.prompts and not os.path.isfile(args.prompts):
    raise UsageError(f"--prompts {args.prompts}: no such file")
  if args.output and args.output != "-":
    parent = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(parent) or os.path.isdir(args.output):
      raise UsageError(f"--output {args.output}: cannot write a file there")


def parse_args(argv=None) -> argparse.Namespace:
  """Parses and validates `argv`."""
  args = build_parser().parse_args(argv)
  validate(args)
  return args


def _tokenizer(args):
  """The tokenizer of the folder the weights come from, else of `--model`."""
  from oftjax import data

  folder, flag = (args.merged, "--merged") if args.merged else (args.model, "--model")
  if args.merged and not any(os.path.exists(os.path.join(folder, f)) for f in _TOKENIZER_FILES):
    folder, flag = args.model, "--model"
  try:
    return data.load_tokenizer(folder)
  except ValueError as e:
    raise UsageError(f"{flag} {folder}: {str(e).splitlines()[0]}") from None


def _prompts(args, tokenizer) -> list:
  from oftjax import data

  if args.chat and not getattr(tokenizer, "chat_template", None):
    raise UsageError("--chat: the tokenizer has no chat template; drop --chat")
  try:
    if args.prompts:
      return data.read_prompts(args.prompts, tokenizer, args.chat)
    return [data.text_prompt(tokenizer, text, args.chat) for text in args.prompt]
  except ValueError as e:
    flag = "--prompts" if args.prompts else "--prompt"
    raise UsageError(f"{flag}: {str(e).splitlines()[0].lstrip(': ')}") from None


def load_model(args) -> tuple[Any, Any]:
  """`(module, params)` to generate with: the base (adapter folded in), or the merged folder.

  Raises:
    UsageError: a folder that does not load, or an adapter that does not fit the model.
  """
  import jax
  import jax.numpy as jnp

  import oftjax
  from oftjax import peft_io
  from oftjax.models import gemma
  from oftjax.train.finish import peft_naming
  from oftjax.train.run import compute_dtype

  folder, flag = (args.merged, "--merged") if args.merged else (args.model, "--model")
  try:
    model, params = gemma.load(folder, dtype=compute_dtype(args.dtype))
  except (ValueError, FileNotFoundError, KeyError, OSError) as e:
    raise UsageError(f"{flag} {folder}: {str(e).splitlines()[0]}") from None
  if not args.adapter:
    return model, params
  where = adapter_folder(args.adapter)
  try:
    tree, config = peft_io.import_peft(where, naming=peft_naming(model))
    adapted = oftjax.adapt(model, config, jnp.zeros((1, 8), jnp.int32))
  except (ValueError, FileNotFoundError, OSError) as e:
    raise UsageError(f"--adapter {where}: {str(e).splitlines()[0]}") from None
  expected = jax.eval_shape(adapted.init, jax.random.key(0))
  shapes = jax.tree_util.tree_map(lambda x: tuple(x.shape), tree)
  if shapes != jax.tree_util.tree_map(lambda x: tuple(x.shape), expected):
    raise UsageError(
      f"--adapter {where}: its layers or shapes differ from {flag} {folder}'s; "
      "pass the base model it was trained on"
    )
  tree = jax.tree_util.tree_map(lambda x, e: jnp.asarray(x, e.dtype), tree, expected)
  merged = oftjax.merge_params(params, tree)
  if args.unmerged:
    return adapted.module, merged
  return model, adapted.fold(merged)


class TokenStreamer:
  """Writes a one-row generation's text as its tokens arrive (an `on_tokens` callback).

  Text is decoded from all tokens so far and only a stable extension of what was written
  is written (a token that ends inside a multi-byte character waits for the next one).
  """

  def __init__(self, tokenizer, stop_ids, out: TextIO):
    self.tokenizer, self.stop_ids, self.out = tokenizer, set(stop_ids), out
    self.start()

  def start(self) -> None:
    """Resets for a new prompt."""
    self.ids, self.shown, self.stopped = [], "", False

  def _show(self, text: str) -> None:
    if text.startswith(self.shown) and len(text) > len(self.shown):
      self.out.write(text[len(self.shown) :])
      self.out.flush()
      self.shown = text

  def __call__(self, step, tokens, finished) -> None:
    del step
    token = int(tokens[0])
    if self.stopped or bool(finished[0]) or token in self.stop_ids:
      self.stopped = True
      return
    self.ids.append(token)
    text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
    if not text.endswith("\ufffd"):
      self._show(text)

  def finish(self, text: str) -> None:
    """Writes what is left of the final `text` and ends the line."""
    self._show(text)
    self.out.write("\n")
    self.out.flush()


def _record(prompt, row, text: str, stop_ids) -> dict:
  """The JSONL record of one prompt's completion."""
  tokens = []
  for token in row.tolist():
    tokens.append(token)
    if token in stop_ids:
      break
  record = {
    "prompt": prompt.source,
    "completion": text,
    "tokens": tokens,
    "finish_reason": "stop" if tokens and tokens[-1] in stop_ids else "length",
  }
  if prompt.expected is not None:
    record["expected"] = prompt.expected
  if prompt.line is not None:
    record["line"] = prompt.line
  return record


def generate_all(args, module, params, tokenizer, prompts, out: TextIO) -> list[dict]:
  """Generates every prompt's completion in batches; writes text to `out` unless JSONL goes there.

  Returns:
    One record per prompt (see the README's generation section).
  """
  import jax
  import numpy as np

  from oftjax import data, distributed
  from oftjax.models import gemma

  stop = data.default_stop_ids(tokenizer)
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  text_out = args.output != "-"
  streamer = None
  if text_out and args.batch_size == 1 and not args.no_stream:
    streamer = TokenStreamer(tokenizer, stop, out)
  key, records, done = jax.random.key(args.seed), [], 0
  for index, (tokens, mask, rows) in enumerate(data.prompt_batches(prompts, args.batch_size, pad)):
    if streamer is not None:
      streamer.start()
    new = gemma.generate(
      module,
      params,
      tokens,
      mask,
      max_new_tokens=args.max_new_tokens,
      temperature=args.temperature,
      top_k=args.top_k,
      top_p=args.top_p,
      rng=jax.random.fold_in(key, index),
      eos_token_id=stop,
      pad_token_id=pad,
      on_tokens=streamer,
    )
    for prompt, row in zip(prompts[done : done + rows], np.asarray(distributed.to_host(new))):
      text = data.decode_completion(tokenizer, row, stop)
      records.append(_record(prompt, row, text, stop))
      if streamer is not None:
        streamer.finish(text)
      elif text_out:
        out.write(text + "\n")
        out.flush()
    done += rows
  return records


def write_jsonl(records: list[dict], path: str, out: TextIO) -> None:
  """Writes the records to `path` atomically, or to `out` when `path` is '-'."""
  from oftjax import atomic

  lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
  if path == "-":
    out.write(lines)
    out.flush()
  else:
    atomic.write_text(path, lines)


def main(argv=None, out: TextIO | None = None) -> int:
  """Runs the command; 0 on success, 2 on a user mistake (one line on stderr)."""
  out = sys.stdout if out is None else out
  try:
    args = parse_args(argv)
    tokenizer = _tokenizer(args)
    prompts = _prompts(args, tokenizer)
    module, params = load_model(args)
    records = generate_all(args, module, params, tokenizer, prompts, out)
    if args.output:
      write_jsonl(records, args.output, out)
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0
