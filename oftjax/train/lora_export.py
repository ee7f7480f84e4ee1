"""`--export-lora RANK`: the trained OFT adapter as a PEFT LoRA adapter, and what it costs.

vLLM and SGLang serve LoRA adapters but not OFT. The job truncates each OFT layer's exact
update to rank `RANK` (`oftjax.peft_io.lora_from_oft`), writes `lora_adapter/` (a PEFT
LoRA folder for the same base, scale 1) and `lora_export.json`: the per-layer and
model-level relative errors of the truncation, the rank-vs-error curve, and the logit
error of the LoRA model against the OFT model on the held-out set, so that a user can pick
the rank. On a quantized base the update uses the dequantized kernels and both models run
over the quantized base (the LoRA model as QLoRA would serve it).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from oftjax import atomic, data, distributed, peft_io
from oftjax import params as P
from oftjax.train.config import UsageError
from oftjax.train.objective import masked_xent


def check_exportable(c, adapted) -> None:
  """Refuses `--export-lora` before training when a layer's update cannot be a LoRA.

  Raises:
    UsageError: a targeted layer's output layout cannot hold LoRA, naming it.
  """
  if not c.export_lora:
    return
  bad = sorted(path for path, geom in adapted.geometries.items() if not geom.lora_ok)
  if bad:
    raise UsageError(
      f"--export-lora: layer '{bad[0]}' has free kernel axes that are not its trailing "
      "output axes, so LoRA cannot hold its update; narrow --targets"
    )


def _logit_gap(oft_module, lora_module):
  """Jitted `(oft params, lora params, batch) -> sums` of the logit gap and both losses."""

  def gap(oft_params, lora_params, batch):
    def logits_of(module, params):
      return module.apply(
        {"params": params},
        batch["inputs"],
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
      ).astype(jnp.float32)

    oft, lora = logits_of(oft_module, oft_params), logits_of(lora_module, lora_params)
    valid = (batch["segment_ids"] > 0)[..., None]
    diff = jnp.where(valid, lora - oft, 0.0)
    oft_loss, aux = masked_xent(oft, batch)
    lora_loss, _ = masked_xent(lora, batch)
    return {
      "diff_sq": jnp.sum(diff**2),
      "logits_sq": jnp.sum(jnp.where(valid, oft, 0.0) ** 2),
      "max_abs": jnp.max(jnp.abs(diff)),
      "oft_loss": oft_loss * aux["tokens"],
      "lora_loss": lora_loss * aux["tokens"],
      "tokens": aux["tokens"],
    }

  return jax.jit(gap)


def logit_error(job, trainable, lora_adapted, lora_tree, examples, seq_len, batch_size, pad_id):
  """The LoRA model's logits against the OFT model's over `examples` (non-padding positions).

  Returns:
    `{'max_abs_logit_error', 'relative_logit_error' (‖Δlogits‖_F / ‖logits‖_F),
    'oft_eval_loss', 'lora_eval_loss'}` (losses over the completion tokens, as the
    evaluator's).
  """
  gap = _logit_gap(job.eval_module, lora_adapted.module)
  oft_params = job.evaluated(trainable)
  lora_params = P.merge_params(job.frozen, lora_tree)
  totals = {}
  for batch in data.sequential_batches(
    examples, batch_size=batch_size, seq_len=seq_len, pad_id=pad_id
  ):
    sums = {k: distributed.scalar(v) for k, v in gap(oft_params, lora_params, batch).items()}
    for k, v in sums.items():
      totals[k] = max(totals.get(k, 0.0), v) if k == "max_abs" else totals.get(k, 0.0) + v
  tokens = max(totals["tokens"], 1.0)
  return {
    "max_abs_logit_error": totals["max_abs"],
    "relative_logit_error": (totals["diff_sq"] / max(totals["logits_sq"], 1e-30)) ** 0.5,
    "oft_eval_loss": totals["oft_loss"] / tokens,
    "lora_eval_loss": totals["lora_loss"] / tokens,
  }


def export_lora(c, job, trainable, examples, pad_id: int, naming) -> dict:
  """Writes `lora_adapter/` and `lora_export.json` under `c.output_dir` (main process).

  Every process computes (the logit check runs on the mesh); only the main one writes.

  Args:
    c: the run's `RunConfig` (`export_lora` is the rank).
    job: the run's model (`oftjax.train.run_model`), an OFT adapter run.
    trainable: the trained adapter tree (on the devices).
    examples: the held-out examples the logit error is measured on.
    pad_id: the tokenizer's padding id.
    naming: the base's PEFT module naming.

  Returns:
    The report's summary for `summary.json` (everything but the per-layer figures).
  """
  adapted = job.adapted
  geometries = adapted.geometries
  frozen = distributed.to_host(job.float_frozen())
  host_adapter = distributed.to_host(trainable)
  try:
    lora_tree, lora_config, report = peft_io.lora_from_oft(
      P.merge_params(frozen, host_adapter), geometries, adapted.config, c.export_lora
    )
  except ValueError as e:
    raise UsageError(f"--export-lora: {str(e).splitlines()[0]}") from None
  lora_adapted = adapted.with_config(lora_config)
  lora_device = jax.tree_util.tree_map(jnp.asarray, lora_tree)
  report["logits"] = logit_error(
    job, trainable, lora_adapted, lora_device, examples, c.seq_len, c.batch_size, pad_id
  )
  report["quantized_base"] = c.quantize if c.quantize != "none" else None
  adapter_dir = os.path.join(c.output_dir, "lora_adapter")
  if distributed.is_main():
    peft_io.export_peft(adapter_dir, lora_tree, lora_config, base_model=c.model, naming=naming)
    atomic.write_json(
      os.path.join(c.output_dir, "lora_export.json"), report, indent=2, sort_keys=True
    )
  summary = {k: v for k, v in report.items() if k not in ("layers", "curve")}
  return {"dir": adapter_dir, **summary}
