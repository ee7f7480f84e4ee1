"""OFT's multiplicative (block) dropout: identity blocks at rate p while training only.

Oracles: the undropped adapter (rate 0 must be bit-identical to it), binomial statistics of
the dropped blocks, and PEFT (which reads `module_dropout` and, in eval, ignores it).
"""

import dataclasses

import flax.linen as nn
import gemma_helpers as H
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import oftjax
from oftjax import adapters, peft_io
from oftjax.models import gemma

TARGETS = r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
B = 2  # block size of the statistics tests: many blocks for little work


def _dense_case(d_in, rate, seed=0):
  """A Dense layer with kernel I and random OFT blocks (no block is I), and its adapter."""
  layer = nn.Dense(d_in, use_bias=False)
  config = oftjax.AdapterConfig(block_size=B, block_dropout=rate, parameterization="cayley")
  x = jax.random.normal(jax.random.key(seed), (1, d_in))
  adapted = oftjax.adapt(layer, config, x)
  weight = jax.random.uniform(jax.random.key(seed + 1), (d_in // B, 1), minval=0.5, maxval=1.5)
  params = {"kernel": jnp.eye(d_in), "oft": {"weight": weight}}
  return adapted, params, x


def _dropped_fraction(adapted, params, x, keys):
  """Fraction of chunks of `x` the training module leaves unrotated (their block was I)."""
  apply = jax.jit(
    lambda k: adapted.training_module.apply({"params": params}, x, rngs={"dropout": k})
  )
  same = [
    np.all(np.isclose(np.asarray(apply(k)).reshape(-1, B), np.asarray(x).reshape(-1, B)), axis=-1)
    for k in keys
  ]
  return np.mean(same), np.size(same), [s.mean() for s in same]


def _within_binomial_error(fraction, rate, n):
  return abs(fraction - rate) < 4 * np.sqrt(rate * (1 - rate) / n)


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_fraction_of_identity_blocks_is_the_rate(rate):
  adapted, params, x = _dense_case(2 * 512, rate)
  # without dropout no chunk is left as it was (every block is a real rotation)
  y = adapted.module.apply({"params": params}, x)
  assert not np.any(np.all(np.isclose(np.asarray(y).reshape(-1, B), x.reshape(-1, B)), axis=-1))
  keys = [jax.random.key(s) for s in range(16)]
  fraction, n, per_key = _dropped_fraction(adapted, params, x, keys)
  assert n == 16 * 512 and _within_binomial_error(fraction, rate, n), (fraction, rate)
  assert len(set(per_key)) > 1  # fresh masks for fresh keys


def test_shared_block_is_dropped_per_chunk():
  d_in, rate = 2 * 512, 0.25
  layer = nn.Dense(d_in, use_bias=False)
  config = oftjax.AdapterConfig(
    block_size=B, block_dropout=rate, block_share=True, parameterization="cayley"
  )
  x = jax.random.normal(jax.random.key(0), (1, d_in))
  adapted = oftjax.adapt(layer, config, x)
  params = {"kernel": jnp.eye(d_in), "oft": {"weight": jnp.ones((1, 1))}}
  fraction, n, _ = _dropped_fraction(adapted, params, x, [jax.random.key(s) for s in range(8)])
  assert _within_binomial_error(fraction, rate, n), fraction


def test_eval_is_deterministic_and_rate_zero_is_the_plain_adapter():
  adapted, params, x = _dense_case(64, 0.5)
  plain = oftjax.adapt(
    nn.Dense(64, use_bias=False), dataclasses.replace(adapted.config, block_dropout=0.0), x
  )
  reference = plain.module.apply({"params": params}, x)
  assert plain.training_module is plain.module  # rate 0: no stochastic module at all
  for rng in (None, jax.random.key(1), jax.random.key(2)):
    rngs = {} if rng is None else {"dropout": rng}
    evaluated = adapted.module.apply({"params": params}, x, rngs=rngs)
    assert np.array_equal(evaluated, reference)
  train = lambda k: adapted.training_module.apply({"params": params}, x, rngs={"dropout": k})
  assert np.array_equal(train(jax.random.key(1)), train(jax.random.key(1)))
  assert not np.array_equal(train(jax.random.key(1)), train(jax.random.key(2)))
  with pytest.raises(Exception, match="dropout"):  # training without a key is loud
    adapted.training_module.apply({"params": params}, x)


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
  folder = tmp_path_factory.mktemp("gemma3")
  H.save_hf_model("gemma3", folder, seed=0)
  model, base = gemma.load(str(folder))
  return folder, model, base


class Layer(nn.Module):
  """A scanned layer: a square Dense applied to the carry."""

  @nn.compact
  def __call__(self, carry, _):
    return carry, nn.Dense(carry.shape[-1], use_bias=False, name="proj")(carry)


class Scanned(nn.Module):
  """Three scanned layers that split the dropout rng as the Gemma stacks do."""

  @nn.compact
  def __call__(self, x):
    scan = nn.scan(
      Layer, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True}, length=3
    )
    return scan(name="layers")(x, None)[1]


def _scanned_case(d, rate, weight=None):
  x = jax.random.normal(jax.random.key(0), (4, d))
  config = oftjax.AdapterConfig(block_size=B, block_dropout=rate, parameterization="cayley")
  adapted = oftjax.adapt(Scanned(), config, x)
  weight = jnp.ones((3, d // B, 1)) if weight is None else weight
  kernel = jnp.broadcast_to(jnp.eye(d), (3, d, d))
  return adapted, {"layers": {"proj": {"kernel": kernel, "oft": {"weight": weight}}}}, x


def _train_step_outputs(rate, with_rng, accum_steps=1):
  weight = 0.1 * jax.random.normal(jax.random.key(7), (3, 32, 1))
  adapted, params, x = _scanned_case(64, rate, weight)
  base, adapter = oftjax.split_params(params)
  module = adapted.training_module

  def loss(params, batch, rng=None):
    y = module.apply({"params": params}, batch, rngs=None if rng is None else {"dropout": rng})
    return jnp.mean(jnp.sin(y))

  optimizer = optax.sgd(0.1)
  step = oftjax.make_train_step(
    loss, optimizer, with_rng=with_rng, donate=False, accum_steps=accum_steps
  )
  batch = x if accum_steps == 1 else jnp.stack([x * (i + 1) for i in range(accum_steps)])
  args = (adapter, optimizer.init(adapter), base, batch)
  key = np.asarray(jax.random.key_data(jax.random.key(3)))
  return step(*args, key) if with_rng else step(*args)


def test_rate_zero_train_step_is_bit_identical():
  plain = _train_step_outputs(0.0, with_rng=False)
  keyed = _train_step_outputs(0.0, with_rng=True)
  for a, b in zip(jax.tree_util.tree_leaves(plain[:3]), jax.tree_util.tree_leaves(keyed[:3])):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  dropped = _train_step_outputs(0.5, with_rng=True)
  assert float(dropped[2]) != float(plain[2])  # a positive rate does change the step


@pytest.mark.slow  # two more step compiles: ~20-60 s on a loaded 2-core machine
def test_rate_zero_accumulated_step_is_bit_identical():
  # micro-batch i draws from fold_in(key, i)
  plain = _train_step_outputs(0.0, with_rng=False, accum_steps=2)
  keyed = _train_step_outputs(0.0, with_rng=True, accum_steps=2)
  assert np.array_equal(np.asarray(plain[2]), np.asarray(keyed[2]))
  assert float(_train_step_outputs(0.5, with_rng=True, accum_steps=2)[2]) != float(plain[2])


def test_scanned_layers_draw_their_own_masks():
  """`nn.scan` with `split_rngs={'dropout': True}` (as the Gemma stacks): one mask per layer."""
  adapted, params, x = _scanned_case(2 * 256, 0.5)
  y = adapted.training_module.apply({"params": params}, x, rngs={"dropout": jax.random.key(4)})
  same = np.isclose(np.asarray(y).reshape(3, 4, -1, B), np.asarray(x).reshape(1, 4, -1, B))
  masks = np.all(same, axis=(1, 3))
  assert not np.array_equal(masks[0], masks[1]) and not np.array_equal(masks[1], masks[2])


def test_peft_export_writes_module_dropout_and_inference_ignores_it(tiny_gemma, tmp_path):
  pytest.importorskip("torch")
  pytest.importorskip("peft")
  import peft_helpers as PH

  folder, model, base = tiny_gemma
  config = oftjax.AdapterConfig(targets=TARGETS, block_size=8, block_dropout=0.3)
  tokens = np.random.default_rng(0).integers(3, H.VOCAB, (2, 9))
  adapted = oftjax.adapt(model, config, jnp.zeros((1, 4), jnp.int32))
  adapter = jax.tree_util.tree_map(
    lambda x: 0.1 * jax.random.normal(jax.random.key(7), x.shape), adapted.init(jax.random.key(0))
  )
  naming = peft_io.ModuleNaming.from_layout(gemma.module_layout(gemma.read_hf_config(str(folder))))
  adapted.export_peft(str(tmp_path / "a"), adapter, naming=naming)
  hf = H.CAUSAL_LM[type(H.hf_config("gemma3"))].from_pretrained(
    str(folder), attn_implementation="eager"
  )
  peft_model = PH.load_peft(hf.eval(), str(tmp_path / "a"))
  assert peft_model.peft_config["default"].module_dropout == 0.3
  ours = np.asarray(
    H.forward(adapted.module, oftjax.merge_params(base, adapter), jnp.asarray(tokens, jnp.int32))
  )
  np.testing.assert_allclose(ours, PH.logits(peft_model, tokens), atol=1e-4)
  _, icfg = peft_io.import_peft(str(tmp_path / "a"), naming=naming)
  assert icfg.block_dropout == 0.3
  cfg_file = tmp_path / "a" / "adapter_config.json"
  cfg_file.write_text(
    cfg_file.read_text().replace('"module_dropout": 0.3', '"module_dropout": 1.5')
  )
  with pytest.raises(ValueError, match=r"module_dropout=1.5 is not a probability in \[0, 1\)"):
    peft_io.import_peft(str(tmp_path / "a"), naming=naming)


def test_bad_rates_are_refused():
  with pytest.raises(ValueError, match=r"block_dropout must be in \[0, 1\)"):
    adapters.AdapterConfig(block_dropout=1.0)
  with pytest.raises(ValueError, match="drops OFT blocks"):
    adapters.AdapterConfig(method="lora", block_dropout=0.1)
