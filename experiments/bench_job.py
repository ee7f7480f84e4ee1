"""The main job's own step in the benchmark (`benchmark.py --job`).

On a Hugging Face folder of a given shape (random weights, made locally with
transformers, the shipped tokenizer), these runners share one round-robin:

* `job`: the step `experiments/finetune_gemma.py` trains with, built by the same
  `oftjax.train.run.build_training` from a `RunConfig`: packed batches with segment ids
  and loss masks from the shipped task, AdamW with warmup/cosine and norm clipping,
  the non-finite guard and the logged metrics (token accuracy, grad norm). Each
  `step()` is the loop's per-step path: run the step, read the next batch while it
  runs (`oftjax.train.loop.batch_reader`), read the loss and skip flag back.
* `bare`: `oftjax.make_train_step` on the same adapted model, frozen tree and token
  rows, with plain next-token loss (no packing, masks, clipping or metrics): what
  `bench_jax` times.
* `bare[scan]` (or `bare[unrolled]`): `bare` with the layer scan the other way round
  from the job's `--unroll-layers` choice, to time what that choice buys.
* `peft_oft`: PEFT's OFT on the same folder (loaded by transformers) and tokens.

The job's overhead is `job / bare` (median over rounds of back-to-back steps).
"""

from __future__ import annotations

import copy
import os
import time

from bench_jax import PeakRunner, compiled_costs, next_token_loss
import bench_peft
import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "experiments", "assets")


def make_folder(folder: str, shape: dict) -> str:
  """Saves a random Gemma-3 text model of `shape` and the shipped tokenizer into `folder`.

  Args:
    folder: where to write (created).
    shape: `d_model`, `ffn`, `layers`, `vocab`, `heads`, `kv_heads`,
      `head_dim` and `seq` (the sliding window and position range).
  """
  import torch
  import transformers

  tok = transformers.AutoTokenizer.from_pretrained(os.path.join(ASSETS, "tokenizer"))
  if shape["vocab"] < len(tok):
    raise ValueError(f"vocab {shape['vocab']} is smaller than the tokenizer's {len(tok)}")
  cfg = transformers.Gemma3TextConfig(
    vocab_size=shape["vocab"],
    hidden_size=shape["d_model"],
    intermediate_size=shape["ffn"],
    num_hidden_layers=shape["layers"],
    num_attention_heads=shape["heads"],
    num_key_value_heads=shape["kv_heads"],
    head_dim=shape["head_dim"],
    query_pre_attn_scalar=shape["head_dim"],
    sliding_window=shape["seq"],
    layer_types=["full_attention"] * shape["layers"],
    max_position_embeddings=max(shape["seq"], 1024),
    tie_word_embeddings=True,
    pad_token_id=tok.pad_token_id,
    bos_token_id=tok.bos_token_id,
    eos_token_id=tok.eos_token_id,
  )
  torch.manual_seed(0)
  transformers.Gemma3ForCausalLM(cfg).save_pretrained(folder)
  tok.save_pretrained(folder)
  return folder


class JobRunner:
  """The job's compiled step and the loop's per-step path around it (see module doc)."""

  def __init__(self, c, log=print):
    import oftjax
    from oftjax import data, sharding
    from oftjax.train import run
    from oftjax.train.loop import batch_reader

    dtype = jnp.float32
    self.mesh = sharding.make_mesh(c.mesh)
    model = run.job_model(c, dtype, dtype)
    tokenizer = data.load_tokenizer(c.model)
    train = data.load_dataset(c.data, tokenizer, c.seq_len)
    adapted, trainable, frozen = run.load_weights(c, model, dtype, say=log)
    training = run.build_training(c, model, adapted, trainable, frozen, self.mesh, dtype)
    self.adapted, self.frozen, self.state = adapted, training.frozen, training.state
    stream = data.PackedBatches(
      train.examples,
      batch_size=c.batch_size,
      seq_len=c.seq_len,
      seed=c.seed,
      pad_id=tokenizer.pad_token_id or 0,
    )
    self.next_batch = batch_reader(stream, c.grad_accum, self.mesh)
    self.batch, self.ntok = self.next_batch()
    t0 = time.perf_counter()
    self.compiled = training.step.lower(
      self.state.trainable, self.state.opt_state, self.frozen, self.batch
    ).compile()
    self.stats = compiled_costs(self.compiled)
    self.stats["compile_s"] = time.perf_counter() - t0
    self.stats["trainable_params"] = oftjax.count_params(trainable)
    self.stats["real_tokens_per_step"] = (
      self.tokens_per_step
    ) = []  # non-padding, as the loop counts
    self.loss = float("nan")

  def step(self):
    from oftjax import distributed

    trainable, opt_state, loss, aux = self.compiled(
      self.state.trainable, self.state.opt_state, self.frozen, self.batch
    )
    upcoming = self.next_batch()  # overlapped with the step, as in the loop
    self.loss = distributed.scalar(loss)
    int(distributed.scalar(aux["skipped"]))
    self.state = self.state.replace(trainable=trainable, opt_state=opt_state)
    self.tokens_per_step.append(self.ntok)
    self.batch, self.ntok = upcoming

  def close(self):
    self.state = self.frozen = self.compiled = None


class BareRunner:
  """`oftjax.make_train_step` with plain next-token loss on the job's model and rows.

  `compiler_options` (XLA CPU options) and `unroll_layers` (the layer scan traced unrolled or
  not, against the job's own setting) make the A/B variants timed beside it.
  """

  def __init__(
    self,
    job: JobRunner,
    tokens,
    compiler_options: dict | None = None,
    unroll_layers: bool | None = None,
  ):
    import oftjax
    from oftjax.train import remat_choice

    adapted = job.adapted
    if unroll_layers is not None:  # the same adapted model with the layer scan (un)rolled
      adapted = copy.copy(adapted)
      adapted.module = remat_choice.with_decoder_config(adapted.module, unroll_layers=unroll_layers)
    optimizer = optax.adamw(1e-4, weight_decay=0.0)
    trainable = jax.tree.map(jnp.copy, job.state.trainable)
    self.state = [trainable, optimizer.init(trainable)]
    self.frozen, self.tokens = job.frozen, jnp.asarray(tokens)
    loss = lambda p, toks: next_token_loss(adapted.apply(p, toks), toks)
    step = oftjax.make_train_step(loss, optimizer)
    t0 = time.perf_counter()
    lowered = step.lower(*self.state, self.frozen, self.tokens)
    self.compiled = lowered.compile(compiler_options=compiler_options or None)
    self.stats = compiled_costs(self.compiled)
    self.stats["compiler_options"] = compiler_options or {}
    self.stats["unroll_layers"] = (
      job.adapted.model.config.unroll_layers if unroll_layers is None else unroll_layers
    )
    self.stats["compile_s"] = time.perf_counter() - t0
    self.stats["trainable_params"] = job.stats["trainable_params"]
    self.loss = float("nan")

  def step(self):
    trainable, opt_state, loss, _ = self.compiled(*self.state, self.frozen, self.tokens)
    self.loss = float(loss)
    self.state = [trainable, opt_state]

  def close(self):
    self.state = self.frozen = self.compiled = None


def build_job_runners(folder: str, shape: dict, log=print) -> tuple[dict, dict]:
  """The `job`, `bare` and `peft_oft` runners and both matmul peaks on `folder`.

  Returns:
    `(runners, info)`; `info` describes the shape, batch and run flags.
  """
  from oftjax.train.config import RunConfig

  c = RunConfig(
    model=folder,
    data=os.path.join(ASSETS, "task", "train.jsonl"),
    method="oft",
    block_size=shape["block_size"],
    batch_size=shape["batch"],
    seq_len=shape["seq"],
    steps=1000,
    warmup_steps=10,
  )
  runners = {}
  t0 = time.perf_counter()
  runners["job"] = job = JobRunner(c, log=log)
  log(f"  built job        in {time.perf_counter() - t0:5.1f}s")
  tokens = np.asarray(job.batch["inputs"])
  t0 = time.perf_counter()
  runners["bare"] = BareRunner(job, tokens)
  log(f"  built bare       in {time.perf_counter() - t0:5.1f}s")
  unrolled = runners["bare"].stats["unroll_layers"]
  t0 = time.perf_counter()
  runners["bare[scan]" if unrolled else "bare[unrolled]"] = BareRunner(
    job, tokens, unroll_layers=not unrolled
  )
  log(f"  built bare[{'scan' if unrolled else 'unrolled'}] in {time.perf_counter() - t0:5.1f}s")
  runners.update(bench_peft.build_peft_runners_on_folder(folder, shape, tokens, log=log))
  runners["matmul_peak"] = PeakRunner(2048 if shape["d_model"] >= 512 else 256)
  runners["torch_matmul_peak"] = bench_peft.TorchPeakRunner(
    2048 if shape["d_model"] >= 512 else 256
  )
  info = dict(
    shape,
    tokens=int(tokens.size),
    job_flags={k: getattr(c, k) for k in ("block_size", "neumann_terms", "lr", "clip_norm")},
    real_tokens_first_batch=job.ntok,
  )
  return runners, info
