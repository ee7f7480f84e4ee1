"""Adapter-only training: masks, frozen weights untouched, XLA flops vs full finetuning."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tiny_models import TinyLM, next_token_loss

import oftjax
from oftjax.train.config import DEFAULT_TARGETS as TARGETS


def setup(width=256, mlp=1024, depth=2, block_size=16, seq=64):
  model = TinyLM(vocab=256, width=width, mlp=mlp, depth=depth)
  tokens = jax.random.randint(jax.random.key(0), (4, seq), 0, 256)
  wrapped = oftjax.Adapted(model, oftjax.AdapterConfig(block_size=block_size, targets=TARGETS))
  params = wrapped.init(jax.random.key(1), tokens)["params"]
  return model, wrapped, params, tokens


def test_only_adapters_change_and_loss_drops():
  _, wrapped, params, tokens = setup(width=64, mlp=128, block_size=8, seq=16)
  frozen, adapter = oftjax.split_params(params)
  frozen_copy = jax.tree_util.tree_map(np.array, frozen)
  loss_fn = lambda p, batch: next_token_loss(wrapped.apply({"params": p}, batch), batch)
  optimizer = optax.adam(3e-2)
  step = oftjax.make_train_step(loss_fn, optimizer)
  opt_state = optimizer.init(adapter)
  losses = []
  for _ in range(5):
    adapter, opt_state, loss, _ = step(adapter, opt_state, frozen, tokens)
    losses.append(float(loss))
  assert losses[-1] < losses[0] - 1e-3
  chex.assert_trees_all_equal(jax.tree_util.tree_map(np.asarray, frozen), frozen_copy)
  assert all(float(jnp.abs(x).max()) > 0 for x in jax.tree_util.tree_leaves(adapter))


def test_optax_mask_freezes_base_leaves_exactly():
  _, wrapped, params, tokens = setup(width=64, mlp=128, block_size=8, seq=16)
  mask = oftjax.trainable_mask(params)
  assert mask["layers"]["q_proj"]["oft"]["weight"] is True
  assert mask["layers"]["q_proj"]["kernel"] is False
  optimizer = oftjax.adapter_only(optax.adamw(1e-2, weight_decay=0.1), params)
  state = optimizer.init(params)
  grads = jax.grad(lambda p: next_token_loss(wrapped.apply({"params": p}, tokens), tokens))(params)
  updates, _ = optimizer.update(grads, state, params)
  new = optax.apply_updates(params, updates)
  base_new, adapter_new = oftjax.split_params(new)
  base_old, adapter_old = oftjax.split_params(params)
  chex.assert_trees_all_equal(base_new, base_old)
  assert not np.allclose(
    adapter_new["layers"]["q_proj"]["oft"]["weight"],
    adapter_old["layers"]["q_proj"]["oft"]["weight"],
  )


def _compiled_flops(fn, *args):
  return fn.lower(*args).compile().cost_analysis()["flops"]


def test_oft_step_costs_at_most_three_quarters_of_full_finetuning():
  model, wrapped, params, tokens = setup()
  frozen, adapter = oftjax.split_params(params)

  def oft_grad(a, f):
    return jax.grad(
      lambda a: next_token_loss(
        wrapped.apply({"params": oftjax.merge_params(f, a)}, tokens), tokens
      )
    )(a)

  def full_grad(p):
    return jax.grad(lambda p: next_token_loss(model.apply({"params": p}, tokens), tokens))(p)

  oft = _compiled_flops(jax.jit(oft_grad), adapter, frozen)
  full = _compiled_flops(jax.jit(full_grad), frozen)
  assert oft <= 0.75 * full, (oft, full, oft / full)
  assert oft >= 0.5 * full  # still back-propagates through every frozen matmul


def test_gradient_accumulation_equals_one_big_batch():
  _, wrapped, params, tokens = setup(width=64, mlp=128, block_size=8, seq=16)
  frozen, adapter = oftjax.split_params(params)
  loss_fn = lambda p, batch: next_token_loss(wrapped.apply({"params": p}, batch), batch)
  optimizer = optax.sgd(0.5)
  big = oftjax.make_train_step(loss_fn, optimizer, donate=False)
  accum = oftjax.make_train_step(loss_fn, optimizer, donate=False, accum_steps=2)
  state = optimizer.init(adapter)
  a1, _, l1, _ = big(adapter, state, frozen, tokens)
  a2, _, l2, _ = accum(adapter, state, frozen, tokens.reshape(2, 2, -1))
  chex.assert_trees_all_close(a1, a2, atol=1e-6)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)


def test_non_finite_loss_skips_the_update():
  _, wrapped, params, tokens = setup(width=64, mlp=128, block_size=8, seq=16)
  frozen, adapter = oftjax.split_params(params)
  loss_fn = lambda p, batch: (
    jnp.nan * next_token_loss(wrapped.apply({"params": p}, batch), batch),
    {},
  )
  optimizer = optax.adam(1e-2)
  step = oftjax.make_train_step(loss_fn, optimizer, has_aux=True, donate=False)
  state = optimizer.init(adapter)
  new, new_state, loss, aux = step(adapter, state, frozen, tokens)
  assert not np.isfinite(float(loss)) and int(aux["skipped"]) == 1
  chex.assert_trees_all_equal(new, adapter)
