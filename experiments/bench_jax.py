"""oftjax side of the benchmark: Gemma-shaped stacks, one jitted train step per method.

Every method is the same `oftjax.make_train_step` (AdamW, adapter-only gradients) on the
real `oftjax.models.gemma` decoder, so the only difference between two methods is what
is trainable and how the adapter enters the forward pass:

* `oft`    OFTv2, input-centric (`AdapterConfig(method='oft')`).
* `oftv1`  the original weight-centric OFT (dense block-diagonal R, R·W every step).
* `lora16` LoRA rank 16; `lora_match` the smallest rank with >= OFTv2's trainable params.
* `full`   full finetuning (every parameter trainable).
* `floor`  no adapter: the gradient w.r.t. an additive zero bias `[d_model]` on the
  embedded input (broadcast over batch and time). The step back-propagates to the
  activations through every frozen layer and computes no weight gradient.
"""

from __future__ import annotations

import math
import re
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import transformers

import oftjax
from oftjax.models import gemma
from oftjax.train.config import DEFAULT_TARGETS as TARGETS

TARGET_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def hf_config(
  d_model: int,
  head_dim: int = 128,
  layers: int = 1,
  vocab: int = 256,
  mlp_ratio: int = 4,
  seq: int = 512,
) -> transformers.Gemma3TextConfig:
  """A Gemma-3-shaped text config: GQA (kv = heads / 2), MLP = 4 x width, tiny vocab."""
  head_dim = min(head_dim, d_model)
  heads = d_model // head_dim
  return transformers.Gemma3TextConfig(
    vocab_size=vocab,
    hidden_size=d_model,
    intermediate_size=mlp_ratio * d_model,
    num_hidden_layers=layers,
    num_attention_heads=heads,
    num_key_value_heads=max(1, heads // 2),
    head_dim=head_dim,
    query_pre_attn_scalar=head_dim,
    sliding_window=seq,
    layer_types=["full_attention"] * layers,
    max_position_embeddings=max(seq, 1024),
    tie_word_embeddings=True,
  )


def next_token_loss(logits, tokens):
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


class _InputBias:
  """Interceptor adding `bias` to the output of the model's `embed_tokens` call."""

  def __init__(self, bias):
    self.bias = bias

  def __call__(self, next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and context.module.name == "embed_tokens":
      out = out + self.bias.astype(out.dtype)
    return out


_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*?\) -> .*?\{\n(.*?)\n\}", re.S | re.M)
_DOT = re.compile(
  r"= \w+\[([\d,]*)\]\S* dot\(%([\w.\-]+), %[\w.\-]+\),.*?lhs_contracting_dims=\{([\d,]*)\}"
)
_CALL = re.compile(r"(?:calls|body|to_apply)=%([\w.\-]+)")
_WHILE = re.compile(r"while\(.*?body=%([\w.\-]+).*?known_trip_count\W+n\W+(\d+)")


def scan_matmul_flops(hlo_text: str) -> float:
  """Matmul flops that XLA's cost analysis leaves out of a compiled module: repeated loops.

  XLA CPU's `cost_analysis()` counts a while loop's body once, whatever its trip count,
  so a model whose layers run under one `nn.scan` reports one layer's flops. This parses
  the optimized HLO and returns, for every while loop with a known trip count `n`,
  `(n - 1)` times the dot flops of its body (nested fusions and loops included).
  Elementwise flops in the body are not added (a few % of a layer's flops).
  """
  comps = {m.group(1): m.group(2) for m in _COMPUTATION.finditer(hlo_text)}
  shapes = {}
  for body in comps.values():
    for m in re.finditer(r"%([\w.\-]+) = \w+\[([\d,]*)\]", body):
      shapes[m.group(1)] = [int(x) for x in m.group(2).split(",") if x]

  def dots(name, seen=()):
    body, total = comps.get(name, ""), 0.0
    for m in _DOT.finditer(body):
      out = [int(x) for x in m.group(1).split(",") if x]
      lhs = shapes.get(m.group(2), [])
      k = math.prod(lhs[int(i)] for i in m.group(3).split(",") if i) if lhs else 0
      total += 2.0 * math.prod(out) * k
    for line in body.splitlines():
      loop = _WHILE.search(line)
      for callee in _CALL.findall(line):
        if callee not in seen:
          trips = int(loop.group(2)) if loop and callee == loop.group(1) else 1
          total += trips * dots(callee, seen + (name,))
    return total

  extra = 0.0
  for body in comps.values():
    for line in body.splitlines():
      loop = _WHILE.search(line)
      if loop and int(loop.group(2)) > 1:
        extra += (int(loop.group(2)) - 1) * dots(loop.group(1))
  return extra


def compiled_costs(compiled) -> dict:
  """XLA's figures of a compiled step: flops (scan-corrected), bytes, memory analysis."""
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  xla_flops = float(cost.get("flops", float("nan")))
  return {
    "flops": xla_flops + scan_matmul_flops(compiled.as_text()),
    "xla_cost_analysis_flops": xla_flops,
    "bytes_accessed": float(cost.get("bytes accessed", float("nan"))),
    "temp_bytes": int(mem.temp_size_in_bytes),
    "argument_bytes": int(mem.argument_size_in_bytes),
    "output_bytes": int(mem.output_size_in_bytes),
  }


def lora_match_rank(d_model: int, block_size: int, geometries) -> int:
  """Smallest LoRA rank whose trainable params are >= OFTv2's on the same layers."""
  oft = sum(
    g.d_in // block_size * oftjax.orthogonal.num_packed(block_size) for g in geometries.values()
  )
  per_rank = sum(g.d_in + g.d_out for g in geometries.values())
  return int(math.ceil(oft / per_rank))


class JaxRunner:
  """One method's compiled train step with its live state; `step()` runs one update."""

  def __init__(self, name, loss_fn, trainable, frozen, tokens, lr=1e-4):
    self.name = name
    optimizer = optax.adamw(lr, weight_decay=0.0)
    self.state = [trainable, optimizer.init(trainable)]
    self.frozen, self.tokens = frozen, tokens
    step = oftjax.make_train_step(loss_fn, optimizer)
    t0 = time.perf_counter()
    self.compiled = step.lower(self.state[0], self.state[1], frozen, tokens).compile()
    self.compile_s = time.perf_counter() - t0
    self.stats = compiled_costs(self.compiled)
    self.stats["trainable_params"] = oftjax.count_params(trainable)
    self.stats["compile_s"] = self.compile_s
    self.loss = float("nan")

  def step(self):
    trainable, opt_state, loss, _ = self.compiled(
      self.state[0], self.state[1], self.frozen, self.tokens
    )
    jax.block_until_ready((trainable, opt_state, loss))
    self.state = [trainable, opt_state]
    self.loss = float(loss)

  def close(self):
    self.state = self.frozen = self.compiled = None


def build_jax_runners(
  d_model,
  tokens_per_step,
  block_size,
  seq,
  methods,
  *,
  layers=1,
  num_terms=6,
  seed=0,
  log=print,
  dtype=jnp.float32,
):
  """Builds a `JaxRunner` per method on one Gemma-shaped config.

  `dtype` is the compute and frozen-weight dtype (adapters stay float32).

  Returns:
    `(runners, info)`; `info` holds the config and the matched LoRA rank.
  """
  cfg = hf_config(d_model, layers=layers, seq=seq)
  model = gemma.from_hf_config(cfg, dtype=dtype)
  base = gemma.init_params(model, jax.random.key(seed))
  batch = max(1, tokens_per_step // seq)
  tokens = jax.random.randint(jax.random.key(seed + 1), (batch, seq), 0, cfg.vocab_size)

  def plain_loss(p, toks):
    return next_token_loss(model.apply({"params": p}, toks), toks)

  def adapted(config):
    adapted_model = oftjax.adapt(model, config, tokens[:1, :2])
    adapter = adapted_model.init(jax.random.key(seed + 2))
    loss = lambda p, toks: next_token_loss(adapted_model.apply(p, toks), toks)
    return loss, adapter, adapted_model.geometries

  oft_cfg = dict(targets=TARGETS, block_size=block_size, num_terms=num_terms)
  oft_adapted = adapted(oftjax.AdapterConfig(method="oft", **oft_cfg))
  geoms = oft_adapted[2]
  match_rank = lora_match_rank(d_model, block_size, geoms)
  info = {
    "d_model": d_model,
    "tokens": batch * seq,
    "batch": batch,
    "seq": seq,
    "block_size": block_size,
    "layers": layers,
    "head_dim": cfg.head_dim,
    "heads": cfg.num_attention_heads,
    "kv_heads": cfg.num_key_value_heads,
    "intermediate": cfg.intermediate_size,
    "vocab": cfg.vocab_size,
    "num_terms": num_terms,
    "lora_match_rank": match_rank,
    "base_params": oftjax.count_params(base),
  }
  if "lora_match" in methods and "lora16" in methods and match_rank <= 16:
    # r=16 already has >= OFTv2's trainable params: the matched rank adds nothing new.
    log(f"  (lora_match rank {match_rank} <= 16: lora16 covers it; skipped)")
    methods = [m for m in methods if m != "lora_match"]
  runners = {}
  for name in methods:
    t0 = time.perf_counter()
    if name in ("oft", "oftv1"):
      loss, adapter, _ = (
        oft_adapted if name == "oft" else adapted(oftjax.AdapterConfig(method=name, **oft_cfg))
      )
      runners[name] = JaxRunner(name, loss, adapter, base, tokens)
    elif name in ("lora16", "lora_match"):
      rank = 16 if name == "lora16" else match_rank
      loss, adapter, _ = adapted(
        oftjax.AdapterConfig(method="lora", targets=TARGETS, lora_rank=rank, lora_alpha=2.0 * rank)
      )
      runners[name] = JaxRunner(name, loss, adapter, base, tokens)
      runners[name].stats["lora_rank"] = rank
    elif name == "full":
      own = jax.tree_util.tree_map(jnp.copy, base)  # donated by the step
      runners[name] = JaxRunner(name, lambda p, t: plain_loss(p, t), own, {}, tokens)
    elif name == "floor":

      def floor_loss(p, toks):
        p = dict(p)
        bias = p.pop("input_bias")
        with nn.intercept_methods(_InputBias(bias)):
          return plain_loss(p, toks)

      bias = {"input_bias": jnp.zeros((d_model,), jnp.float32)}
      runners[name] = JaxRunner(name, floor_loss, bias, base, tokens)
    else:
      raise ValueError(f"unknown method {name!r}")
    log(
      f"  built {name:10s} in {time.perf_counter() - t0:5.1f}s "
      f"(compile {runners[name].compile_s:.1f}s, {runners[name].stats['flops'] / 1e9:.1f} GFLOP)"
    )
  return runners, info


def compile_only(
  d_model, tokens_per_step, block_size, seq, methods, *, layers=1, num_terms=6, log=print
) -> dict:
  """`compiled_costs` of OFT-family steps on abstract arguments: nothing is allocated or run.

  For shapes too slow to time here (OFT v1 at d_model 4096): the flops and memory claims
  can be checked from the compiled step alone.
  """
  cfg = hf_config(d_model, layers=layers, seq=seq)
  model = gemma.from_hf_config(cfg, dtype=jnp.float32)
  base = jax.eval_shape(lambda: gemma.init_params(model, jax.random.key(0)))
  tokens = jax.ShapeDtypeStruct((max(1, tokens_per_step // seq), seq), jnp.int32)
  optimizer = optax.adamw(1e-4, weight_decay=0.0)
  out = {}
  for name in methods:
    config = oftjax.AdapterConfig(
      method=name, targets=TARGETS, block_size=block_size, num_terms=num_terms
    )
    adapted = oftjax.adapt(model, config, jnp.zeros((1, 2), jnp.int32))
    adapter = jax.eval_shape(adapted.init, jax.random.key(2))
    loss = lambda p, toks, adapted=adapted: next_token_loss(adapted.apply(p, toks), toks)
    step = oftjax.make_train_step(loss, optimizer)
    t0 = time.perf_counter()
    opt_state = jax.eval_shape(optimizer.init, adapter)
    out[name] = compiled_costs(step.lower(adapter, opt_state, base, tokens).compile())
    out[name]["compile_s"] = time.perf_counter() - t0
    log(
      f"  {name:6s} {out[name]['flops'] / 1e9:9.1f} GFLOP temp {out[name]['temp_bytes'] / 2**20:8.1f} MiB"
    )
  return out


def matmul_peak(n: int = 2048, reps: int = 7) -> dict:
  """XLA's fp32 matmul throughput on this machine: median of `reps` jitted n x n x n products."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - t0)
  return peak_record(n, times)


def peak_record(n: int, times: list[float]) -> dict:
  """The matmul-peak record of `n`^3 fp32 matmuls timed `times` (seconds each), any framework."""
  flops = 2.0 * n**3
  return {
    "n": n,
    "median_s": float(np.median(times)),
    "flops_per_s": flops / float(np.median(times)),
    "best_flops_per_s": flops / min(times),
  }


class PeakRunner:
  """XLA's matmul throughput as a round-robin "method": one jitted n x n x n product."""

  def __init__(self, n: int = 2048, dtype=jnp.float32):
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    self.args = (a, a + 1.0)
    self.fn = jax.jit(lambda a, b: a @ b)
    self.fn(*self.args).block_until_ready()
    self.stats = {"n": n, "flops": 2.0 * n**3}
    self.loss = float("nan")

  def step(self):
    self.fn(*self.args).block_until_ready()

  def close(self):
    self.args = None
