"""Pretrains the shipped tiny Gemma-3-architecture base model (seeded, reproducible, CPU).

    python experiments/make_assets.py          # tokenizer + corpus + task (once)
    python experiments/pretrain_tiny_gemma.py  # ~8 min on 2 CPU cores

A `transformers.Gemma3TextConfig` with small sizes (hidden 64, 4 layers alternating
sliding-window and global attention, 4 query / 2 key-value heads of width 16, MLP 256, tied
embeddings, 102-token character vocabulary) is trained from scratch with full-parameter AdamW
on `experiments/assets/pretrain/train.jsonl` (loss on completions), then written with
`gemma.save` to `experiments/assets/tiny-gemma3/` together with the tokenizer files, so it loads
through `oftjax.models.gemma.load` and `transformers.AutoModelForCausalLM`. Greedy exact-match
accuracy on the retention set (pretraining skills, held out) and on the new task is printed and
stored in `pretrain_summary.json` beside the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import numpy as np
import optax

from oftjax import data
from oftjax.models import gemma
from oftjax.train.objective import next_token_loss

ASSETS = pathlib.Path(__file__).resolve().parent / "assets"
ARCH = dict(
  hidden_size=64,
  intermediate_size=256,
  num_hidden_layers=4,
  num_attention_heads=4,
  num_key_value_heads=2,
  head_dim=16,
  query_pre_attn_scalar=16,
  sliding_window=16,
  layer_types=["sliding_attention", "full_attention"] * 2,
  max_position_embeddings=512,
)


def make_config(tokenizer):
  """The tiny `Gemma3TextConfig` for `tokenizer`'s vocabulary."""
  from transformers import Gemma3TextConfig

  return Gemma3TextConfig(
    vocab_size=len(tokenizer),
    pad_token_id=tokenizer.pad_token_id,
    bos_token_id=tokenizer.bos_token_id,
    eos_token_id=tokenizer.eos_token_id,
    **ARCH,
  )


def exact_match(model, params, tokenizer, path, batch_size=100, max_new_tokens=10):
  """Greedy exact-match accuracy on a JSONL eval file, overall and per instruction keyword."""
  items = data.load_eval_set(path, tokenizer)
  generated = []
  for tokens, mask, expected in data.eval_batches(items, batch_size, tokenizer.pad_token_id):
    new = np.asarray(
      gemma.generate(
        model,
        params,
        tokens,
        mask,
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
      )
    )
    generated += list(new[: len(expected)])
  skills: dict[str, list[int]] = {}
  for i, item in enumerate(items):
    skills.setdefault(tokenizer.decode(item.prompt_tokens[1:]).split(" ")[0], []).append(i)
  per_skill = {
    k: data.exact_match_accuracy(
      tokenizer, [generated[i] for i in rows], [items[i].expected for i in rows]
    )
    for k, rows in sorted(skills.items())
  }
  return data.exact_match_accuracy(tokenizer, generated, [x.expected for x in items]), per_skill


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=str(ASSETS / "tiny-gemma3"), help="output model folder")
  parser.add_argument("--steps", type=int, default=1500, help="optimizer steps")
  parser.add_argument("--batch-size", type=int, default=32, help="packed rows per batch")
  parser.add_argument("--seq-len", type=int, default=64, help="positions per packed row")
  parser.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
  parser.add_argument("--seed", type=int, default=0, help="seed of the init and the data order")
  args = parser.parse_args()

  tokenizer_dir = ASSETS / "tokenizer"
  tokenizer = data.load_tokenizer(tokenizer_dir)
  hf_config = make_config(tokenizer)
  model = gemma.from_hf_config(hf_config)
  params = gemma.init_params(model, jax.random.key(args.seed))
  print(f"{sum(x.size for x in jax.tree_util.tree_leaves(params))} parameters")

  corpus = data.load_dataset(ASSETS / "pretrain" / "train.jsonl", tokenizer, args.seq_len)
  stream = data.PackedBatches(
    corpus.examples, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed
  )
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, args.lr, min(100, args.steps // 10), args.steps, args.lr * 0.05
  )
  optimizer = optax.chain(
    optax.clip_by_global_norm(1.0), optax.adamw(schedule, b2=0.98, weight_decay=0.01)
  )
  opt_state = optimizer.init(params)

  @jax.jit
  def train_step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(lambda p: next_token_loss(model, p, batch)[0])(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  start = time.time()
  for step in range(args.steps):
    params, opt_state, loss = train_step(params, opt_state, next(stream))
    if step % 100 == 0 or step == args.steps - 1:
      print(f"step {step:5d} loss {float(loss):.4f} ({time.time() - start:.0f}s)", flush=True)
  train_s = time.time() - start

  out = pathlib.Path(args.out)
  gemma.save(out, model, params, tokenizer_dir=str(tokenizer_dir), overwrite=True)
  model, params = gemma.load(out)
  retention, retention_skills = exact_match(
    model, params, tokenizer, ASSETS / "task" / "retention.jsonl"
  )
  task, _ = exact_match(model, params, tokenizer, ASSETS / "task" / "eval.jsonl")
  summary = {
    "command": "python experiments/pretrain_tiny_gemma.py " + " ".join(sys.argv[1:]),
    "args": {k: v for k, v in vars(args).items() if k != "out"},
    "train_s": round(train_s, 1),
    "final_loss": float(loss),
    "cpu_count": os.cpu_count(),
    "retention_accuracy": retention,
    "retention_accuracy_per_skill": retention_skills,
    "task_accuracy": task,
  }
  (out / "pretrain_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  print(
    f"pretraining {train_s:.0f}s; retention accuracy {retention:.3f} {retention_skills}; "
    f"new-task accuracy {task:.3f}; saved {out}"
  )


if __name__ == "__main__":
  main()
