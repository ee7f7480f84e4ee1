"""Data pipeline: records in (JSONL, Parquet, `datasets`), packed batches and eval sets out.

Typical use::

    from oftjax import data
    tok = data.load_tokenizer(model_dir)
    train = data.load_dataset("train.jsonl", tok, seq_len=64)  # or .parquet, a folder, a hub id
    stream = data.PackedBatches(train.examples, batch_size=16, seq_len=64, seed=0)
    batch = next(stream)      # inputs, targets, loss_mask, segment_ids, positions: [16, 64]
    state = stream.state      # {"epoch": 0, "row": 16}: resume with PackedBatches(..., state=state)
    items = data.load_eval_set("eval.jsonl", tok)
    for prompts, mask, expected in data.eval_batches(items, 64): ...
"""

from oftjax.data.batching import (
  BATCH_KEYS,
  PackedBatches,
  make_batch,
  pack_rows,
  padding_fraction,
  sequential_batches,
)
from oftjax.data.chat import ChatSpan, control_tokens, encode_chat, render_chat
from oftjax.data.evaluation import (
  EvalExample,
  chat_prompt_ids,
  decode_completion,
  default_stop_ids,
  eval_batches,
  exact_match_accuracy,
  load_eval_set,
  make_eval_example,
  make_eval_set,
  pad_prompts,
  text_prompt_ids,
)
from oftjax.data.jsonl import (
  FORMATS,
  MESSAGES,
  PROMPT_COMPLETION,
  TEXT,
  Record,
  read_jsonl,
  validate_record,
)
from oftjax.data.prompts import Prompt, prompt_batches, read_prompts, text_prompt
from oftjax.data.sources import looks_like_hub_id, read_records
from oftjax.data.tokenize import (
  Dataset,
  Example,
  load_dataset,
  load_tokenizer,
  split_example,
  tokenize_record,
  tokenize_records,
)

__all__ = [
  "BATCH_KEYS",
  "ChatSpan",
  "Dataset",
  "EvalExample",
  "Example",
  "FORMATS",
  "MESSAGES",
  "PROMPT_COMPLETION",
  "PackedBatches",
  "Prompt",
  "Record",
  "TEXT",
  "chat_prompt_ids",
  "control_tokens",
  "decode_completion",
  "default_stop_ids",
  "encode_chat",
  "eval_batches",
  "exact_match_accuracy",
  "load_dataset",
  "load_eval_set",
  "load_tokenizer",
  "looks_like_hub_id",
  "make_batch",
  "make_eval_example",
  "make_eval_set",
  "pack_rows",
  "pad_prompts",
  "padding_fraction",
  "prompt_batches",
  "read_jsonl",
  "read_prompts",
  "read_records",
  "render_chat",
  "sequential_batches",
  "split_example",
  "text_prompt",
  "text_prompt_ids",
  "tokenize_record",
  "tokenize_records",
  "validate_record",
]
