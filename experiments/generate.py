"""Generate with a Gemma model, a finetuned adapter on it, or a merged folder.

    python experiments/generate.py --prompt "What is 2+3?"                 # shipped tiny model
    python experiments/generate.py --model BASE --adapter RUN_OR_PEFT_DIR --prompt "..."
    python experiments/generate.py --merged MERGED_DIR --prompts prompts.jsonl --batch-size 8 \
        --output out.jsonl
    python experiments/generate.py --help                                  # every flag

Exit codes: 0 success, 2 on a user mistake (one line on stderr, no traceback).
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
os.environ.setdefault("OFTJAX_ASSETS", os.path.join(HERE, "assets"))  # the shipped tiny model

from oftjax.train.generate_cli import main  # noqa: E402

if __name__ == "__main__":
  sys.exit(main())
