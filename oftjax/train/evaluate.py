"""Held-out loss and exact-match accuracy (greedy generation) of a finetuned model.

Generation runs on what a user would deploy: the merged model (adapters folded into the
kernels; the same function to fp32 rounding), or, on a quantized base (QOFT / QLoRA), the
``Adapted`` model over the quantized kernels with unmerged adapters, so evaluating never
materializes a full-precision copy of a model that was quantized to fit.
"""

from __future__ import annotations

import jax
import numpy as np

from oftjax import data, distributed
from oftjax.models import gemma
from oftjax.train.objective import masked_xent


class Evaluator:
  """Evaluates params of one model on fixed held-out sets (compiled once per shape).

  ``model`` is a Gemma module (params: merged) or an ``Adapted`` one (params: frozen tree
  merged with the adapter tree, see ``oftjax.merge_params``).
  """

  def __init__(self, model, tokenizer, loss_examples, accuracy_sets: dict, seq_len: int,
               batch_size: int, max_new_tokens: int):
    self.model, self.tokenizer = model, tokenizer
    self.loss_examples = loss_examples
    self.accuracy_sets = accuracy_sets
    self.seq_len, self.batch_size = seq_len, batch_size
    self.max_new_tokens = max_new_tokens
    self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def forward(params, batch):
      logits = model.apply({"params": params}, batch["inputs"], positions=batch["positions"],
                           segment_ids=batch["segment_ids"])
      loss, aux = masked_xent(logits, batch)
      return loss * aux["tokens"], aux["tokens"]

    self._forward = jax.jit(forward)

  def loss(self, params) -> float:
    """Token-weighted mean cross-entropy over the loss examples' completion tokens."""
    total, count = 0.0, 0.0
    for batch in data.sequential_batches(self.loss_examples, batch_size=self.batch_size,
                                         seq_len=self.seq_len, pad_id=self.pad_id):
      s, n = self._forward(params, batch)
      total, count = total + distributed.scalar(s), count + distributed.scalar(n)
    return total / max(count, 1.0)

  def generations(self, params, items) -> list[str]:
    """Greedy completions of ``items``' prompts, decoded up to EOS."""
    stop = [self.tokenizer.eos_token_id]
    outputs = []
    for tokens, mask, expected in data.eval_batches(items, self.batch_size, self.pad_id):
      new = gemma.generate(self.model, params, tokens, mask, max_new_tokens=self.max_new_tokens,
                           eos_token_id=stop, pad_token_id=self.pad_id)
      new = distributed.to_host(new)
      outputs += [data.decode_completion(self.tokenizer, row) for row in new[: len(expected)]]
    return outputs

  def accuracy(self, params, name: str) -> tuple[float, list[str]]:
    """Exact-match accuracy on one named set, and the completions."""
    items = self.accuracy_sets[name]
    outputs = self.generations(params, items)
    hits = sum(o.strip() == x.expected.strip() for o, x in zip(outputs, items))
    return hits / len(items), outputs

  def run(self, params) -> dict:
    """``{'loss', 'accuracy', <set>_accuracy..., 'samples'}`` for the model's ``params``."""
    result = {"loss": self.loss(params)}
    for name in self.accuracy_sets:
      acc, outputs = self.accuracy(params, name)
      result["accuracy" if name == "eval" else f"{name}_accuracy"] = acc
      if name == "eval":
        result["samples"] = [
            {"prompt": self.tokenizer.decode(x.prompt_tokens, skip_special_tokens=True),
             "expected": x.expected, "generated": o}
            for x, o in zip(self.accuracy_sets[name][:3], outputs[:3])]
    return result
