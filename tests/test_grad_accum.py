"""Gradient accumulation weighs micro-batches by their loss tokens: k micro-batches == one k-times batch."""

import functools

import chex
from finetune_helpers import job_args, read_jsonl, run_job
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tiny_models import TinyLM

import oftjax
from oftjax.train.objective import masked_xent

# Loss tokens per row: the first micro-batch of four rows holds 10 of them, the second 44.
COMPLETION_LENGTHS = (1, 2, 3, 4, 15, 9, 12, 8)
SEQ = 16


def uneven_batches(steps, seed=0):
  """`steps` batches of 8 rows whose completions (loss tokens) end each row unevenly."""
  rng = np.random.default_rng(seed)
  mask = np.zeros((len(COMPLETION_LENGTHS), SEQ), np.float32)
  for row, n in enumerate(COMPLETION_LENGTHS):
    mask[row, SEQ - n :] = 1.0
  batches = []
  for _ in range(steps):
    tokens = rng.integers(0, 64, (len(COMPLETION_LENGTHS), SEQ + 1)).astype(np.int32)
    batches.append({"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask})
  return batches


def micro(batch, k):
  """The same rows as `k` micro-batches (a leading axis of `k`)."""
  return {key: value.reshape(k, -1, *value.shape[1:]) for key, value in batch.items()}


@functools.lru_cache(maxsize=1)
def tiny_adapted():
  """A one-layer scanned TinyLM with OFT on every projection: (wrapped, frozen, adapter)."""
  wrapped = oftjax.Adapted(
    TinyLM(vocab=64, width=16, mlp=32, depth=1),
    oftjax.AdapterConfig(block_size=4, targets=r".*_proj"),
  )
  params = jax.jit(wrapped.init)(jax.random.key(0), jnp.zeros((1, SEQ), jnp.int32))["params"]
  return (wrapped, *oftjax.split_params(params))


def loss_fn(params, batch):
  wrapped, _, _ = tiny_adapted()
  return masked_xent(wrapped.apply({"params": params}, batch["inputs"]), batch)


def run_steps(accum, weight_key, batches):
  _, frozen, adapter = tiny_adapted()
  optimizer = optax.adam(3e-2)
  step = oftjax.make_train_step(
    loss_fn, optimizer, has_aux=True, donate=False, accum_steps=accum, weight_key=weight_key
  )
  state, rows = optimizer.init(adapter), []
  for batch in batches:
    adapter, state, loss, aux = step(
      adapter, state, frozen, micro(batch, accum) if accum > 1 else batch
    )
    rows.append((float(loss), float(aux["token_accuracy"]), float(aux["tokens"])))
  return np.array(rows), adapter


def test_token_weighted_accumulation_equals_the_big_batch():
  batches = uneven_batches(3)
  batches[2]["loss_mask"] = batches[2]["loss_mask"].copy()
  batches[2]["loss_mask"][:4] = 0.0  # step 3: the first micro-batch has no loss token
  big, big_adapter = run_steps(1, None, batches)
  accum, accum_adapter = run_steps(2, "tokens", batches)
  np.testing.assert_allclose(accum[:, 0], big[:, 0], rtol=2e-6)  # loss per step
  np.testing.assert_allclose(accum[:, 1], big[:, 1], rtol=2e-6)  # token accuracy
  np.testing.assert_array_equal(accum[:, 2], [54, 54, 44])  # loss tokens, summed
  np.testing.assert_array_equal(big[:, 2], [54, 54, 44])
  chex.assert_trees_all_close(accum_adapter, big_adapter, atol=2e-6)
  # The data tells the weightings apart: the micro-batches' mean losses differ, so their
  # plain average (the old accumulation) is not the big batch's token mean.
  _, frozen, adapter = tiny_adapted()
  means = [
    float(jax.jit(loss_fn)(oftjax.merge_params(frozen, adapter), m)[0])
    for m in (jax.tree_util.tree_map(lambda x: x[i], micro(batches[0], 2)) for i in (0, 1))
  ]
  assert abs(np.mean(means) - big[0, 0]) > 1e-3, (means, big[0, 0])
  np.testing.assert_allclose((10 * means[0] + 44 * means[1]) / 54, big[0, 0], rtol=2e-6)


def test_weight_key_needs_aux():
  with pytest.raises(ValueError, match="has_aux"):
    oftjax.make_train_step(lambda p, b: 0.0, optax.sgd(1.0), weight_key="tokens")


@pytest.mark.slow
def test_job_grad_accum_equals_big_batch(tiny_model_dir, tmp_path):
  """Through the job, on the shipped task (uneven completions): same rows, same run.

  The stream hands out packed rows in order whatever the batch size, so two micro-batches
  of 4 rows are the 8 rows of the big batch.
  """
  from safetensors.numpy import load_file

  runs = {}
  for name, flags in (
    ("big", ["--batch-size", "8"]),
    ("accum", ["--batch-size", "4", "--grad-accum", "2"]),
  ):
    runs[name] = tmp_path / name
    args = job_args(
      tiny_model_dir,
      runs[name],
      "--steps",
      "3",
      "--save-every",
      "3",
      "--retention-data",
      "",
      "--eval-limit",
      "2",
      *flags,
    )  # last flag wins
    proc = run_job(args)
    assert proc.returncode == 0, proc.stderr[-2000:]
  big, accum = (read_jsonl(runs[n] / "metrics.jsonl") for n in ("big", "accum"))
  np.testing.assert_allclose([r["loss"] for r in accum], [r["loss"] for r in big], rtol=1e-5)
  np.testing.assert_allclose(
    [r["token_accuracy"] for r in accum], [r["token_accuracy"] for r in big], rtol=1e-5
  )
  weights = [
    load_file(str(runs[n] / "peft_adapter" / "adapter_model.safetensors")) for n in ("big", "accum")
  ]
  assert weights[0].keys() == weights[1].keys() and weights[0]
  for key in weights[0]:
    np.testing.assert_allclose(weights[1][key], weights[0][key], atol=1e-5, err_msg=key)
