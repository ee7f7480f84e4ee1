"""The main job: finetune a Gemma model with OFTv2 (or a baseline) and write a full run folder.

    python experiments/finetune_gemma.py            # shipped tiny Gemma 3 + shipped task
    python experiments/finetune_gemma.py --help     # every flag with its default

Exit codes: 0 success (or a clean stop on SIGINT/SIGTERM after checkpointing), 2 on a
user mistake (one line on stderr, no traceback).
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
# The shipped defaults (tiny Gemma 3, the task) live with this script, not in the package.
os.environ.setdefault("OFTJAX_ASSETS", os.path.join(HERE, "assets"))

from oftjax.train.config import UsageError, parse_args  # noqa: E402


def main(argv=None) -> int:
  try:
    config = parse_args(argv)
    from oftjax.train.run import run  # heavy imports after argument parsing

    summary = run(config)
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if "stopped_at" in summary:
    return 0
  before, after = summary["eval_before"], summary["eval_after"]
  changes = [f"eval loss {before['loss']:.4f} -> {after['loss']:.4f}"]
  if "perplexity" in before:  # absent from the eval_before of a run resumed from an old one
    changes.append(f"perplexity {before['perplexity']:.3f} -> {after['perplexity']:.3f}")
  if "accuracy" in after:  # a {text} eval set has no exact-match accuracy
    changes.insert(0, f"accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}")
  if "retention_before" in summary:
    changes.append(
      f"retention {summary['retention_before']:.3f} -> {summary['retention_after']:.3f}"
    )
  print(", ".join(changes))
  for sample in summary["samples_after"]:
    print(f"  {sample['prompt']!r} -> {sample['generated']!r} (expected {sample['expected']!r})")
  speed = summary["train_tokens_per_s"]
  print(
    f"{f'{speed:.0f}' if speed else 'n/a'} tokens/s, compile {summary['compile_s']:.1f}s, "
    f"wall {summary['wall_s']:.1f}s; outputs in {config.output_dir}"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
