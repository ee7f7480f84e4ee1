"""QOFT / QLoRA: NF4 and int8 frozen kernels (storage, error bounds, forward parity, merging)."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import recorded_results
from tiny_models import TinyLM
import transformers

import oftjax
from oftjax import quant
from oftjax.models import gemma
from oftjax.train.config import DEFAULT_TARGETS as TARGETS

TOKENS = jax.random.randint(jax.random.key(0), (2, 9), 0, 64)
# QLoRA Appendix E (bitsandbytes' NF4 table), for an independent spot check.
QLORA_NF4 = [
  -1.0,
  -0.6961928009986877,
  -0.5250730514526367,
  -0.39491748809814453,
  -0.28444138169288635,
  -0.18477343022823334,
  -0.09105003625154495,
  0.0,
  0.07958029955625534,
  0.16093020141124725,
  0.24611230194568634,
  0.33791524171829224,
  0.44070982933044434,
  0.5626170039176941,
  0.7229568362236023,
  1.0,
]


@functools.cache
def tiny_gemma():
  config = transformers.Gemma3TextConfig(
    vocab_size=64,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    sliding_window=8,
    layer_types=["sliding_attention", "full_attention"],
    max_position_embeddings=64,
  )
  model = gemma.from_hf_config(config)
  return model, gemma.init_params(model, jax.random.key(1))


@functools.cache
def tiny_lm():
  model = TinyLM(vocab=64)
  return model, jax.jit(model.init)(jax.random.key(1), TOKENS)["params"]


def adapted(model, method, scale=0.1, seed=3, targets=TARGETS):
  """Adapted (over the dequantizing) wrapper, random non-identity adapter leaves, geometries."""
  config = oftjax.AdapterConfig(method=method, block_size=8, targets=targets, lora_rank=4)
  adapted_model = oftjax.adapt(quant.Dequantized(model), config, TOKENS)
  shapes = jax.eval_shape(adapted_model.init, jax.random.key(1))
  leaves, treedef = jax.tree_util.tree_flatten(shapes)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  adapter = treedef.unflatten([scale * jax.random.normal(k, s.shape) for k, s in zip(keys, leaves)])
  return config, adapted_model.module, adapter, adapted_model.geometries


def test_nf4_code_values_are_normal_quantiles():
  values = quant.nf4_code_values()
  assert values.shape == (16,) and np.all(np.diff(values) > 0)
  assert values[0] == -1.0 and values[-1] == 1.0 and np.sum(values == 0.0) == 1
  assert np.sum(values > 0) == 8 and np.sum(values < 0) == 7
  np.testing.assert_allclose(values, QLORA_NF4, atol=5e-7)  # float32 table
  # qwix's NF4 decoding uses exactly these values: codes of a block holding them all.
  mat = jnp.asarray(np.tile(values, 4)[:, None] * np.ones((1, 3)), jnp.float32)  # [64, 3]
  out = quant.dequantize_matrix(quant.quantize_matrix(mat, "nf4", double_quant=False))
  np.testing.assert_allclose(np.asarray(out), np.asarray(mat), atol=5e-7)
  print(f"NF4 half of the largest gap: {quant.nf4_max_half_gap():.6f}")


@pytest.mark.parametrize("mode,dq", [("int8", False), ("nf4", False), ("nf4", True)])
def test_quantize_dequantize_error_within_bounds(mode, dq):
  # Heavy-tailed stacked weights [2, 256, 96] so that block/channel absmax vary a lot.
  w = 0.05 * jax.random.t(jax.random.key(0), 3.0, (2, 256, 96))
  leaves = quant.quantize_matrix(w, mode, double_quant=dq)
  err = np.abs(np.asarray(quant.dequantize_matrix(leaves)) - np.asarray(w))
  if mode == "int8":
    bound = np.max(np.abs(np.asarray(w)), axis=-2, keepdims=True) / 254
    chex.assert_shape(leaves["scale"], (2, 1, 96))
  elif not dq:
    absmax = np.max(np.abs(np.asarray(w).reshape(2, 4, 64, 96)), axis=2, keepdims=True)
    bound = np.broadcast_to(quant.nf4_max_half_gap() * absmax, (2, 4, 64, 96)).reshape(w.shape)
    chex.assert_shape(leaves["absmax"], (2, 4, 96))
  else:  # codes chosen with the exact absmax, decoded with the int8-stored one
    bound = np.asarray(quant.error_bound(w, leaves))
    # ... whose own error is int8 rounding of the centred constants, per block of 128 here
    # (gcd(4 * 96, 256)): without this, coarser constants would just widen `bound`.
    exact = np.max(np.abs(np.asarray(w).reshape(2, 4, 64, 96)), axis=2).reshape(2, 3, 128)
    centred = exact - exact.mean(axis=(1, 2), keepdims=True)
    stored = (
      np.asarray(leaves["absmax_q"], np.float64) * np.asarray(leaves["absmax_scale"])
      + np.asarray(leaves["absmax_mean"])[:, :, None]
    )
    const_err = np.abs(stored - exact)
    const_bound = np.max(np.abs(centred), axis=-1, keepdims=True) / 254
    assert np.all(const_err <= const_bound * (1 + 1e-5) + 1e-8), np.max(const_err / const_bound)
  assert np.all(err <= bound * (1 + 1e-5) + 1e-8), float(np.max(err / bound))
  print(
    f"{mode}{'+dq' if dq else ''}: max |err| {err.max():.3e} = {np.max(err / bound):.3f} "
    f"x bound, mean |err| {err.mean():.3e} (mean |w| {np.abs(np.asarray(w)).mean():.3e})"
  )


def expected_stored_bytes(shape, mode, double_quant):
  """Bytes of one quantized `[..., d_in, d_out]` matrix, from the layout in `quant.codes`.

  int8: one byte per weight + a float32 scale per output channel. NF4: half a byte per
  weight + per block of `NF4_BLOCK` inputs a float32 absmax, or with double quantization
  an int8 one + a float32 scale per `gcd(n, 256)` of the `n` constants + a float32 mean.
  """
  *lead, d_in, d_out = shape
  copies = int(np.prod(lead, dtype=np.int64))
  if mode == "int8":
    return copies * (d_in * d_out + 4 * d_out)
  constants = d_in // quant.NF4_BLOCK * d_out
  if not double_quant:
    return copies * (d_in * d_out // 2 + 4 * constants)
  return copies * (d_in * d_out // 2 + constants + 4 * constants // np.gcd(constants, 256) + 4)


@pytest.mark.parametrize("mode,dq", [("nf4", True), ("nf4", False), ("int8", False)])
def test_stored_bytes_of_quantized_layers(mode, dq):
  model, base = tiny_gemma()
  _, _, _, geoms = adapted(model, "oft")
  frozen = quant.quantize_params(base, geoms, mode, double_quant=dq)
  report = quant.storage_report(frozen)
  shapes = [
    oftjax.geometry.kernel_to_matrix(oftjax.params.node_at(base, p)["kernel"], g).shape
    for p, g in geoms.items()
  ]
  kernels = sum(int(np.prod(s)) for s in shapes)
  assert report["reference_bytes"] == 2 * kernels
  # exactly the layout's bytes: a lost double quantization (0.28x here) fails, not only > 0.30x
  assert report["stored_bytes"] == sum(expected_stored_bytes(s, mode, dq) for s in shapes), report
  # tree_bytes of the frozen tree counts exactly the quantized storage for those layers.
  assert oftjax.tree_bytes(frozen) == oftjax.tree_bytes(base) - 4 * kernels + report["stored_bytes"]
  assert quant.logical_count(frozen) == oftjax.count_params(base)
  # the README quotes these (experiments/render_docs.py reads the committed file)
  recorded_results.check(
    "quant_storage",
    f"{mode}{'_double_quant' if dq else ''}",
    {**report, "nf4_block": quant.NF4_BLOCK, "d_in": sorted({s[-2] for s in shapes})},
  )
  print(
    f"{mode}{'+dq' if dq else ''}: {report['stored_bytes']} B stored vs "
    f"{report['reference_bytes']} B bf16 = {report['ratio']:.4f}x"
  )


@pytest.mark.parametrize(
  "method,mode", [("oft", "nf4"), ("oft", "int8"), ("lora", "nf4"), ("oftv1", "int8")]
)
def test_quantized_forward_equals_adapter_on_dequantized_weights(method, mode):
  model, base = tiny_lm()
  _, wrapped, adapter, geoms = adapted(model, method)
  frozen = quant.quantize_params(base, geoms, mode)
  deq = quant.dequantize_params(frozen, geoms)
  apply = jax.jit(wrapped.apply)
  got = apply({"params": oftjax.merge_params(frozen, adapter)}, TOKENS)
  want = apply({"params": oftjax.merge_params(deq, adapter)}, TOKENS)
  np.testing.assert_allclose(got, want, atol=1e-5 * float(jnp.max(jnp.abs(want))), rtol=0)
  base_tree, adapter_tree = oftjax.split_params(oftjax.merge_params(frozen, adapter))
  chex.assert_trees_all_equal_structs(adapter_tree, adapter)
  assert (
    "kernel_q" in base_tree["layers"]["q_proj"] and "kernel" not in base_tree["layers"]["q_proj"]
  )


@pytest.mark.parametrize("method", ["oft", "lora"])
def test_quantized_gemma_forward_equals_adapter_on_dequantized_weights(method):
  model, base = tiny_gemma()
  _, wrapped, adapter, geoms = adapted(model, method)
  frozen = quant.quantize_params(base, geoms, "nf4")
  deq = quant.dequantize_params(frozen, geoms)
  apply = jax.jit(wrapped.apply)
  got = apply({"params": oftjax.merge_params(frozen, adapter)}, TOKENS)
  want = apply({"params": oftjax.merge_params(deq, adapter)}, TOKENS)
  np.testing.assert_allclose(got, want, atol=1e-5 * float(jnp.max(jnp.abs(want))), rtol=0)


@pytest.mark.parametrize("method", ["oft", "lora"])
def test_generation_over_quantized_kernels_equals_the_folded_dequantized_model(method):
  # What the job evaluates for QOFT/QLoRA: the Adapted model over the quantized kernels.
  model, base = tiny_gemma()
  config, wrapped, adapter, geoms = adapted(model, method, scale=0.3)
  frozen = quant.quantize_params(base, geoms, "nf4")
  deq = quant.dequantize_params(frozen, geoms)
  folded = oftjax.fold_adapters(oftjax.merge_params(deq, adapter), geoms, config)
  prompts = TOKENS[:, :5]
  mask = jnp.ones_like(prompts).at[0, :2].set(0)  # one left-padded row
  got = gemma.generate(
    wrapped, oftjax.merge_params(frozen, adapter), prompts, mask, max_new_tokens=8
  )
  want = gemma.generate(model, folded, prompts, mask, max_new_tokens=8)
  np.testing.assert_array_equal(got, want)
  unadapted = gemma.generate(model, deq, prompts, mask, max_new_tokens=8)
  assert not np.array_equal(got, unadapted)  # the adapter really takes part


def test_dequantized_alone_runs_a_quantized_base_and_must_sit_inside_the_adapters():
  model, base = tiny_lm()
  config, _, adapter, geoms = adapted(model, "oft")
  frozen = quant.quantize_params(base, geoms, "int8")
  got = quant.Dequantized(model).apply({"params": frozen}, TOKENS)
  want = model.apply({"params": quant.dequantize_params(frozen, geoms)}, TOKENS)
  np.testing.assert_allclose(got, want, atol=1e-5 * float(jnp.max(jnp.abs(want))), rtol=0)
  np.testing.assert_array_equal(  # inert on a float tree
    np.asarray(quant.Dequantized(model).apply({"params": base}, TOKENS)),
    np.asarray(model.apply({"params": base}, TOKENS)),
  )
  # Outside the adapters its interceptor would run each layer first, without them.
  wrong = quant.Dequantized(oftjax.Adapted(model, config))
  with pytest.raises(ValueError, match=r"inside the adapters: Adapted\(quant.Dequantized\(model\)"):
    wrong.apply({"params": oftjax.merge_params(frozen, adapter)}, TOKENS)


def test_quantized_train_step_keeps_no_dequantized_kernels():
  model, base = tiny_gemma()
  _, wrapped, adapter, geoms = adapted(model, "oft")
  frozen = quant.quantize_params(base, geoms, "nf4")
  deq = quant.dequantize_params(frozen, geoms)

  def loss_fn(p, tokens):
    return -jnp.mean(jax.nn.log_softmax(wrapped.apply({"params": p}, tokens))[..., 0])

  opt = optax.adam(1e-2)
  step = oftjax.make_train_step(loss_fn, opt, donate=False)
  args = (adapter, opt.init(adapter))
  compiled = step.lower(*args, frozen, TOKENS).compile()
  mem_q = compiled.memory_analysis()
  mem_f = step.lower(*args, deq, TOKENS).compile().memory_analysis()
  new, _, loss, _ = compiled(*args, frozen, TOKENS)
  assert np.isfinite(float(loss))
  assert not jax.tree_util.tree_all(jax.tree_util.tree_map(jnp.array_equal, new, adapter))
  # Dequantized kernels are recomputed in the backward, not kept as residuals (without
  # jax.checkpoint in the dequantizing interceptor, temp grew by every targeted kernel in fp32).
  assert mem_q.temp_size_in_bytes <= mem_f.temp_size_in_bytes + 4096, (mem_q, mem_f)
  print(
    f"temp {mem_q.temp_size_in_bytes} B (nf4) vs {mem_f.temp_size_in_bytes} B (fp32), "
    f"arguments {mem_q.argument_size_in_bytes} B vs {mem_f.argument_size_in_bytes} B"
  )


def test_quantize_rejects_a_width_the_block_does_not_divide():
  model = nn.Dense(32, name="proj")
  base = model.init(jax.random.key(1), jnp.ones((1, 48)))["params"]
  geoms = {"": oftjax.geometry.LayerGeometry((1,), (0,), (48, 32), True)}
  with pytest.raises(ValueError, match="block size 64 must be even and divide the input width 48"):
    quant.quantize_params(base, geoms, "nf4")
  with pytest.raises(ValueError, match="unknown quantization"):
    quant.quantize_params(base, geoms, "int4")
  assert quant.dequantize_params(quant.quantize_params(base, geoms, "int8"), geoms)[
    "kernel"
  ].shape == (48, 32)
  host = quant.quantize_params(jax.device_get(base), geoms, "int8")  # host in, host out
  assert all(isinstance(x, np.ndarray) for x in jax.tree_util.tree_leaves(host))
  owned = jax.tree_util.tree_map(jnp.array, base)
  kernel = owned["kernel"]
  quant.quantize_params(owned, geoms, "int8", consume=True)
  assert "kernel" not in owned and kernel.is_deleted()


def test_fold_into_quantized_reports_the_added_error():
  model, base = tiny_gemma()
  rows = {}
  plain_apply = jax.jit(model.apply)
  for method in ("oft", "lora"):
    config, wrapped, adapter, geoms = adapted(
      model, method, scale=0.05, targets=r".*(q_proj|down_proj)"
    )
    adapted_apply = jax.jit(wrapped.apply)
    for mode in ("nf4", "int8"):
      frozen = quant.quantize_params(base, geoms, mode)
      merged, report = quant.fold_into_quantized(
        oftjax.merge_params(frozen, adapter), geoms, config
      )
      chex.assert_trees_all_equal_structs(merged, frozen)
      assert report["fp32_merge_max_abs"] < 1e-5 * 10 * report["output_mean_abs"]
      assert 0 < report["mean_abs"] < report["adapter_effect_mean_abs"]
      rows[method, mode] = report
      # The merged quantized model runs without the adapter and stays near the adapted one.
      plain = quant.dequantize_params(merged, geoms)
      want = adapted_apply({"params": oftjax.merge_params(frozen, adapter)}, TOKENS)
      got = plain_apply({"params": plain}, TOKENS)
      # ... much nearer than the base without the adapter, i.e. than a merge that was lost
      # (measured: nf4 0.28 OFT / 0.54 LoRA, int8 0.018 / 0.031 of that distance)
      unmerged = plain_apply({"params": quant.dequantize_params(frozen, geoms)}, TOKENS)
      off = float(jnp.mean(jnp.abs(got - want)))
      left = off / float(jnp.mean(jnp.abs(unmerged - want)))
      print(
        f"merged model {method}/{mode}: mean |y - y_adapted| = {left:.3f} x mean "
        f"|y_base - y_adapted| = {off / float(jnp.mean(jnp.abs(want))):.3f} x mean |y_adapted|"
      )
      assert left < {"nf4": 0.6, "int8": 0.05}[mode], left
  assert rows["oft", "int8"]["mean_abs"] < rows["oft", "nf4"]["mean_abs"]
  assert rows["lora", "int8"]["mean_abs"] < rows["lora", "nf4"]["mean_abs"]
  for (method, mode), r in rows.items():
    print(
      f"merge {method}/{mode}: output change max {r['max_abs']:.4f} mean {r['mean_abs']:.4f}"
      f" (requantize alone {r['requant_only_mean_abs']:.4f}; adapter effect "
      f"{r['adapter_effect_mean_abs']:.4f}; mean |y| {r['output_mean_abs']:.4f})"
    )


def test_quantize_on_load_equals_quantizing_the_loaded_tree_and_holds_no_full_copy(tmp_path):
  import tracemalloc

  # kernels dominate this model (8 layers, width 256, vocab 64): 97% of its fp32 bytes
  hf = transformers.Gemma3TextConfig(
    vocab_size=64,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    sliding_window=8,
    max_position_embeddings=64,
  )
  transformers.AutoModelForCausalLM.from_config(hf).save_pretrained(tmp_path)
  model = gemma.load_model(str(tmp_path))
  config = oftjax.AdapterConfig(method="oft", block_size=16, targets=TARGETS)
  geoms = oftjax.adapt(model, config, TOKENS).geometries

  def load_and_peak(**kwargs):
    tracemalloc.start()
    try:
      params = gemma.load(str(tmp_path), on_host=True, **kwargs)[1]
      return params, tracemalloc.get_traced_memory()[1]
    finally:
      tracemalloc.stop()

  full, full_peak = load_and_peak()
  streamed, streamed_peak = load_and_peak(on_param=quant.quantize_on_load(geoms, "nf4"))
  chex.assert_trees_all_equal(streamed, quant.quantize_params(full, geoms, "nf4"))
  fp32_bytes, stored = oftjax.tree_bytes(full), oftjax.tree_bytes(streamed)
  largest = max(x.nbytes for x in jax.tree_util.tree_leaves(full))
  print(
    f"host peak while loading: {full_peak} B plain, {streamed_peak} B quantizing on load "
    f"(fp32 tree {fp32_bytes} B, largest parameter {largest} B, quantized tree {stored} B)"
  )
  assert full_peak >= fp32_bytes
  # the quantized tree plus one full-precision parameter (one projection, all layers
  # stacked) and its read buffers, never the whole model
  assert streamed_peak < stored + 2.5 * largest < 0.8 * fp32_bytes
