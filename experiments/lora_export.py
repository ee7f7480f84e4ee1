"""The rank-vs-error curve of exporting the default run's OFT adapter as LoRA.

    python experiments/lora_export.py          # writes experiments/results/lora_export.json

Runs the shipped default job once with `--export-lora 16` (so `lora_export.json` of the run
is the job's own report), then, for every rank of that report's curve, converts the same
trained OFT adapter (read back from the run's `peft_adapter/`) with
`oftjax.peft_io.lora_from_oft` and measures the LoRA model on the job's eval set as the
job's evaluator does (loss and greedy exact-match accuracy) and against the OFT model
(logit error, `oftjax.train.lora_export.logit_error`). About 3-5 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("OFTJAX_ASSETS", os.path.join(ROOT, "experiments", "assets"))

RESULT = os.path.join(ROOT, "experiments", "results", "lora_export.json")
FLAGS = ["--export-lora", "16"]


def _measure_ranks(out: str, ranks: list[int]) -> list[dict]:
  """Eval loss, accuracy and logit error of the LoRA export of `out`'s adapter at each rank."""
  import jax
  import jax.numpy as jnp

  from oftjax import data, peft_io
  from oftjax import params as P
  from oftjax.adapted_model import adapt
  from oftjax.models import gemma
  from oftjax.train import lora_export
  from oftjax.train.config import RunConfig
  from oftjax.train.evaluate import Evaluator
  from oftjax.train.finish import peft_naming
  from oftjax.train.run_model import build_run_model

  c = RunConfig()
  tokenizer = data.load_tokenizer(c.model)
  model, base = gemma.load(c.model)
  naming = peft_naming(model)
  adapter, config = peft_io.import_peft(
    os.path.join(out, "peft_adapter"), targets=c.targets, naming=naming
  )
  adapted = adapt(model, config, jnp.zeros((1, 8), jnp.int32))
  adapter = jax.tree_util.tree_map(jnp.asarray, adapter)
  job = build_run_model(model, base, adapted)
  held_out = data.load_dataset(c.eval_data, tokenizer, c.seq_len)
  sets = {"eval": data.load_eval_set(c.eval_data, tokenizer, c.eval_limit)}
  max_new = max(len(tokenizer.encode(x.expected, add_special_tokens=False)) for x in sets["eval"])

  def evaluate(module, params):
    evaluator = Evaluator(
      module, tokenizer, held_out.examples, sets, c.seq_len, c.batch_size, max_new + 2
    )
    result = evaluator.run(params)
    return {"eval_loss": result["loss"], "accuracy": result["accuracy"]}, evaluator.pad_id

  oft, pad_id = evaluate(adapted.module, P.merge_params(base, adapter))
  rows = []
  for rank in ranks:
    tree, lora_config, report = peft_io.lora_from_oft(
      P.merge_params(base, adapter), adapted.geometries, config, rank
    )
    lora_adapted = adapted.with_config(lora_config)
    tree = jax.tree_util.tree_map(jnp.asarray, tree)
    measured, _ = evaluate(lora_adapted.module, P.merge_params(base, tree))
    gap = lora_export.logit_error(
      job, adapter, lora_adapted, tree, held_out.examples, c.seq_len, c.batch_size, pad_id
    )
    rows.append(
      {
        "rank": rank,
        "relative_error": report["relative_error"],
        "relative_to_weight": report["relative_to_weight"],
        "lora_params": report["lora_params"],
        "max_abs_logit_error": gap["max_abs_logit_error"],
        "relative_logit_error": gap["relative_logit_error"],
        **measured,
      }
    )
    print(json.dumps(rows[-1]), flush=True)
  return oft, rows


def main() -> int:
  from oftjax import atomic

  with tempfile.TemporaryDirectory(prefix="oftjax_lora_export_") as scratch:
    out = os.path.join(scratch, "run")
    proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", "finetune_gemma.py"), *FLAGS]
      + ["--output-dir", out],
      capture_output=True,
      text=True,
      env={**os.environ, "PYTHONPATH": ROOT},
    )
    if proc.returncode != 0:
      print(proc.stderr[-2000:], file=sys.stderr)
      return 1
    with open(os.path.join(out, "lora_export.json")) as f:
      job_report = json.load(f)
    with open(os.path.join(out, "summary.json")) as f:
      summary = json.load(f)
    oft, rows = _measure_ranks(out, [row["rank"] for row in job_report["curve"]])
  result = {
    "command": ["python", "experiments/finetune_gemma.py", *FLAGS],
    "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    "run": {
      "steps": summary["steps"],
      "eval_before": summary["eval_before"],
      "eval_after": summary["eval_after"],
      "trainable_params": summary["trainable_params"],
    },
    "job_report": {k: v for k, v in job_report.items() if k != "layers"},
    "job_report_layers": job_report["layers"],
    "oft": oft,
    "ranks": rows,
  }
  atomic.write_json(RESULT, result, indent=2, sort_keys=True)
  print(f"wrote {os.path.relpath(RESULT, ROOT)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
