"""Held-out loss, perplexity and exact-match accuracy (greedy generation) of a finetuned model.

A set of `{"text"}` records has no prompt to complete: it is evaluated by its loss and
perplexity alone, and its result holds no `accuracy` (rather than a made-up one).

Generation runs on what a user would deploy: the merged model (adapters folded into the
kernels; the same function to fp32 rounding), or, on a quantized base (QOFT / QLoRA), the
`Adapted` model over the quantized kernels with unmerged adapters, so evaluating never
materializes a full-precision copy of a model that was quantized to fit.
"""

from __future__ import annotations

import math

import jax

from oftjax import data, distributed
from oftjax.models import gemma
from oftjax.train.objective import next_token_loss


class Evaluator:
  """Evaluates params of one model on fixed held-out sets (compiled once per shape).

  `model` is a Gemma module (params: merged) or an `Adapted` one (params: frozen tree
  merged with the adapter tree, see `oftjax.merge_params`). `accuracy_sets` maps a set
  name (`'eval'`, `'retention'`) to its exact-match items; a `{"text"}` eval set is
  not among them (loss only).
  """

  def __init__(
    self,
    model,
    tokenizer,
    loss_examples,
    accuracy_sets: dict,
    seq_len: int,
    batch_size: int,
    max_new_tokens: int,
  ):
    self.model, self.tokenizer = model, tokenizer
    self.loss_examples = loss_examples
    self.accuracy_sets = accuracy_sets
    self.seq_len, self.batch_size = seq_len, batch_size
    self.max_new_tokens = max_new_tokens
    self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def forward(params, batch):
      loss, aux = next_token_loss(model, params, batch)
      return loss * aux["tokens"], aux["tokens"]

    self._forward = jax.jit(forward)

  def loss(self, params) -> float:
    """Token-weighted mean cross-entropy over the loss examples' completion tokens."""
    total, count = 0.0, 0.0
    for batch in data.sequential_batches(
      self.loss_examples, batch_size=self.batch_size, seq_len=self.seq_len, pad_id=self.pad_id
    ):
      s, n = self._forward(params, batch)
      total, count = total + distributed.scalar(s), count + distributed.scalar(n)
    return total / max(count, 1.0)

  def generations(self, params, items) -> list:
    """Greedy completions of `items`' prompts.

    Per item, the generated ids (to EOS or the length limit;
    `oftjax.data.decode_completion` decodes them).
    """
    stop = data.default_stop_ids(self.tokenizer)  # decode_completion cuts there too
    rows = []
    for tokens, mask, expected in data.eval_batches(items, self.batch_size, self.pad_id):
      new = gemma.generate(
        self.model,
        params,
        tokens,
        mask,
        max_new_tokens=self.max_new_tokens,
        eos_token_id=stop,
        pad_token_id=self.pad_id,
      )
      rows += list(distributed.to_host(new)[: len(expected)])
    return rows

  def accuracy(self, params, name: str) -> tuple[float, list]:
    """Exact-match accuracy on one named set, and the generated ids.

    The accuracy is `oftjax.data.exact_match_accuracy`.
    """
    items = self.accuracy_sets[name]
    rows = self.generations(params, items)
    return data.exact_match_accuracy(self.tokenizer, rows, [x.expected for x in items]), rows

  def run(self, params) -> dict:
    """The metrics of the model's `params`.

    Returns:
      `{'loss', 'perplexity'}` of the loss examples (perplexity `exp(loss)`, `inf` past
      float range), plus `'accuracy'` and `'samples'` when the eval set has exact-match
      items and `'<set>_accuracy'` for each other set.
    """
    loss = self.loss(params)
    result = {"loss": loss, "perplexity": math.inf if loss > 709.0 else math.exp(loss)}
    for name in self.accuracy_sets:
      acc, rows = self.accuracy(params, name)
      result["accuracy" if name == "eval" else f"{name}_accuracy"] = acc
      if name == "eval":
        result["samples"] = [
          {
            "prompt": self.tokenizer.decode(x.prompt_tokens, skip_special_tokens=True),
            "expected": x.expected,
            "generated": data.decode_completion(self.tokenizer, row),
          }
          for x, row in zip(self.accuracy_sets[name][:3], rows[:3])
        ]
    return result
