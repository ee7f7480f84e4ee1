"""Adapters on layers that are not flax's: the layer registry, on a gemma-library stand-in.

The stand-in (tests/gemma_lib_standin.py) has the google-deepmind/gemma library's layer
forms: `Einsum(eqn, x)` with weight `w`, two MLP einsums sharing one scope, `...`
equations, the `CBSKH` key/value output, `Module.param` patched to require a shape, and
an `nn.jit`-wrapped `__call__`. Every test runs with that patch in place.
"""

import functools

import chex
import flax.linen as nn
import gemma_lib_standin as standin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import oftjax

TOKENS = jax.random.randint(jax.random.key(0), (2, 7), 0, 64)
METHODS = {
  "oft": oftjax.AdapterConfig(block_size=8, targets=standin.TARGETS),
  "lora": oftjax.AdapterConfig(method="lora", lora_rank=4, targets=standin.TARGETS),
}


@pytest.fixture(autouse=True)
def gemma_param():
  with standin.patched_module_param():
    yield


def logits(module, params, tokens=TOKENS):
  return jax.jit(module.apply)({"params": params}, tokens).logits


def random_adapter(adapted, seed, scale=0.1):
  leaves, treedef = jax.tree_util.tree_flatten(jax.eval_shape(adapted.init, jax.random.key(1)))
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([scale * jax.random.normal(k, s.shape) for k, s in zip(keys, leaves)])


@functools.cache
def base_params():
  with standin.patched_module_param():
    return standin.Transformer().init(jax.random.key(1), TOKENS)["params"]


def test_adapters_sit_beside_each_weight_under_shared_scopes():
  adapted = oftjax.adapt(standin.Transformer(), METHODS["oft"], TOKENS)
  attn, mlp = "layer_0/attn", "layer_0/mlp"
  assert set(adapted.geometries) == {
    f"layer_{i}/{k}"
    for i in range(2)
    for k in ("attn/q_einsum/w", "attn/kv_einsum/w", "attn/attn_vec_einsum/w")
    + ("mlp/gating_einsum", "mlp/linear")
  }
  adapter = adapted.init(jax.random.key(2))
  assert set(adapter["layer_0"]["mlp"]) == {"oft_gating_einsum", "oft_linear"}
  assert set(adapter["layer_0"]["attn"]["q_einsum"]) == {"oft_w"}
  chex.assert_shape(adapter["layer_0"]["mlp"]["oft_gating_einsum"]["weight"], (32 // 8, 28))
  chex.assert_shape(adapter["layer_0"]["mlp"]["oft_linear"]["weight"], (64 // 8, 28))
  chex.assert_shape(adapter["layer_0"]["attn"]["attn_vec_einsum"]["oft_w"]["weight"], (8, 28))
  geom = adapted.geometries[f"{mlp}/gating_einsum"]
  assert (geom.weight, geom.x_axes, geom.kernel_axes) == ("gating_einsum", (2,), (2,))
  assert adapted.geometries[f"{attn}/attn_vec_einsum/w"].kernel_axes == (0, 1)
  params = oftjax.merge_params(base_params(), adapter)
  frozen, trainable = oftjax.split_params(params)
  chex.assert_trees_all_equal_structs(frozen, base_params())
  chex.assert_trees_all_equal_structs(trainable, adapter)
  mask = oftjax.trainable_mask(params)
  assert mask["layer_0"]["mlp"]["oft_linear"]["weight"] and not mask["layer_0"]["mlp"]["linear"]


def test_lora_term_follows_the_output_axis_order():
  geom = oftjax.adapt(standin.Transformer(), METHODS["lora"], TOKENS).geometries
  kv = geom["layer_0/attn/kv_einsum/w"]  # 'BSD,CKDH->CBSKH': [B,S] + [C,K,H] -> C,B,S,K,H
  assert kv.lora_ok and kv.output_perm == (2, 0, 1, 3, 4)
  assert geom["layer_0/mlp/gating_einsum"].output_perm is None


@pytest.mark.parametrize("method", ["oft", "lora"])
def test_zero_init_logits_equal_the_base_exactly(method):
  model = standin.Transformer()
  adapted = oftjax.adapt(model, METHODS[method], TOKENS)
  y0 = logits(model, base_params())
  y = logits(adapted.module, oftjax.merge_params(base_params(), adapted.init(jax.random.key(3))))
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y0))


@pytest.mark.parametrize("method", ["oft", "lora"])
def test_trained_adapter_folds_into_the_models_own_weights(method):
  model = standin.Transformer()
  adapted = oftjax.adapt(model, METHODS[method], TOKENS)
  params = oftjax.merge_params(base_params(), random_adapter(adapted, seed=4))
  y = logits(adapted.module, params)
  folded = adapted.fold(params)
  chex.assert_trees_all_equal_structs(folded, base_params())  # same names: w, gating_einsum
  y_folded = logits(model, folded)
  assert float(jnp.abs(y - logits(model, base_params())).max()) > 1e-2  # adapters act
  chex.assert_trees_all_close(y_folded, y, atol=2e-5)
  restored = adapted.unfold(oftjax.merge_params(folded, oftjax.split_params(params)[1]))
  chex.assert_trees_all_close(restored, base_params(), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["oft", "lora"])
def test_a_second_call_still_applies_the_adapters(method):
  """`Transformer.__call__` is under nn.jit: its cache must not serve a trace without adapters."""
  model = standin.Transformer()
  adapted = oftjax.adapt(model, METHODS[method], TOKENS)
  y0 = model.apply({"params": base_params()}, TOKENS).logits  # fills nn.jit's cache first
  for seed in (5, 6):
    params = oftjax.merge_params(base_params(), random_adapter(adapted, seed))
    y = adapted.apply(params, TOKENS).logits  # eager: every call goes through nn.jit's cache
    assert float(jnp.abs(y - y0).max()) > 1e-2
    chex.assert_trees_all_close(
      y, model.apply({"params": adapted.fold(params)}, TOKENS).logits, atol=2e-5
    )


@pytest.mark.slow
@pytest.mark.parametrize("method", ["oft", "lora"])
def test_steps_lower_the_loss_with_frozen_weights_bit_identical(method):
  adapted = oftjax.adapt(standin.Transformer(), METHODS[method], TOKENS)
  frozen = base_params()
  frozen_copy = jax.tree_util.tree_map(np.array, frozen)
  tokens = jax.random.randint(jax.random.key(7), (4, 9), 0, 64)

  def loss_fn(params, batch):
    out = adapted.module.apply({"params": params}, batch[:, :-1]).logits
    return optax.softmax_cross_entropy_with_integer_labels(out, batch[:, 1:]).mean()

  optimizer = optax.adam({"oft": 3e-2, "lora": 1e-2}[method])
  step = oftjax.make_train_step(loss_fn, optimizer)
  trainable = adapted.init(jax.random.key(8))
  opt_state = optimizer.init(trainable)
  losses = []
  for _ in range(4):
    trainable, opt_state, loss, _ = step(trainable, opt_state, frozen, tokens)
    losses.append(float(loss))
  assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 1e-3, losses
  chex.assert_trees_all_equal(jax.tree_util.tree_map(np.asarray, frozen), frozen_copy)


def test_targets_tell_the_shared_scope_einsums_apart():
  config = oftjax.AdapterConfig(block_size=8, targets=r".*mlp/linear")
  adapted = oftjax.adapt(standin.Transformer(), config, TOKENS)
  assert sorted(adapted.geometries) == ["layer_0/mlp/linear", "layer_1/mlp/linear"]
  assert set(adapted.init(jax.random.key(0))["layer_0"]["mlp"]) == {"oft_linear"}


def test_user_registered_layer_adapts_and_folds():
  class Projection(nn.Module):  # weight 'mat' [out, in], input as keyword 'h'
    features: int

    @nn.compact
    def __call__(self, *, h):
      mat = self.param("mat", nn.initializers.normal(), (self.features, h.shape[-1]))
      return jnp.einsum("...i,oi->...o", h, mat)

  x = jax.random.normal(jax.random.key(9), (3, 16))
  unregistered = oftjax.Adapted(Projection(8), oftjax.AdapterConfig(block_size=4))
  with pytest.raises(ValueError, match=r"'', a Projection whose 'mat' \[8, 16\].*register_layer"):
    unregistered.init(jax.random.key(0), h=x)
  oftjax.layer_kinds.register_layer(
    Projection,
    lambda m, args, kwargs: oftjax.layer_kinds.LayerCall(
      "...i,oi->...o", "mat", (m.features, kwargs["h"].shape[-1]), input="h"
    ),
  )
  for config in (oftjax.AdapterConfig(block_size=4), oftjax.AdapterConfig(method="lora")):
    adapted = oftjax.adapt(Projection(8), config, h=x)
    base = Projection(8).init(jax.random.key(0), h=x)["params"]
    params = oftjax.merge_params(base, random_adapter(adapted, seed=10, scale=0.3))
    y = adapted.apply(params, h=x)
    assert float(jnp.abs(y - Projection(8).apply({"params": base}, h=x)).max()) > 1e-2
    folded = Projection(8).apply({"params": adapted.fold(params)}, h=x)
    chex.assert_trees_all_close(folded, y, atol=1e-5)


def test_nn_jit_deeper_in_the_model_is_refused():
  class Outer(nn.Module):
    @nn.compact
    def __call__(self, tokens):
      return standin.Transformer(name="lm")(tokens).logits

  wrapped = oftjax.Adapted(Outer(), METHODS["oft"])
  with pytest.raises(
    ValueError, match=r"'lm' \(Transformer\) has its '__call__' wrapped in nn.jit"
  ):
    wrapped.init(jax.random.key(0), TOKENS)
