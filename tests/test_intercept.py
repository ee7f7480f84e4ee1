"""The Linen interceptor: tree layout, equivalences, zero-init identity, errors."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import TinyLM

import oftjax
from oftjax.train.config import DEFAULT_TARGETS as TARGETS

TOKENS = jax.random.randint(jax.random.key(0), (2, 9), 0, 97)


def adapted_params(model, config, scale=0.2, seed=5):
  """Base params of `model` plus random (non-identity) adapter leaves, and geometries."""
  base = model.init(jax.random.key(1), TOKENS)["params"]
  adapted = oftjax.adapt(model, config, TOKENS)
  leaves, treedef = jax.tree_util.tree_flatten(jax.eval_shape(adapted.init, jax.random.key(1)))
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  adapter = treedef.unflatten([scale * jax.random.normal(k, s.shape) for k, s in zip(keys, leaves)])
  return adapted.module, base, oftjax.merge_params(base, adapter), adapted.geometries


def test_tree_layout_puts_adapters_beside_kernels():
  config = oftjax.AdapterConfig(block_size=8, targets=TARGETS)
  wrapped, base, params, geoms = adapted_params(TinyLM(), config)
  q = params["layers"]["q_proj"]
  assert set(q) == {"kernel", "oft"}
  chex.assert_shape(q["oft"]["weight"], (2, 64 // 8, 28))  # stacked by nn.scan
  chex.assert_shape(params["layers"]["o_proj"]["oft"]["weight"], (2, 8, 28))
  chex.assert_shape(params["layers"]["down_proj"]["oft"]["weight"], (2, 128 // 8, 28))
  assert "oft" not in params["lm_head"] and "oft" not in params["embed"]
  split_base, _ = oftjax.split_params(params)
  chex.assert_trees_all_equal_structs(split_base, base)
  assert len(geoms) == 7


@pytest.mark.parametrize("use_einsum", [False, True])
def test_input_centric_equals_weight_centric_equals_merged(use_einsum):
  model = TinyLM(use_einsum=use_einsum)
  oft = oftjax.AdapterConfig(block_size=8, targets=TARGETS)
  wrapped, base, params, geoms = adapted_params(model, oft)
  v1 = oftjax.Adapted(model, oftjax.AdapterConfig(method="oftv1", block_size=8, targets=TARGETS))
  y2 = jax.jit(wrapped.apply)({"params": params}, TOKENS)
  y1 = jax.jit(v1.apply)({"params": params}, TOKENS)
  merged = oftjax.fold_adapters(params, geoms, oft)
  ym = model.apply({"params": merged}, TOKENS)
  y0 = model.apply({"params": base}, TOKENS)
  assert float(jnp.abs(y2 - y0).max()) > 1e-2  # the adapters do something
  chex.assert_trees_all_close(y1, y2, atol=2e-5)
  chex.assert_trees_all_close(ym, y2, atol=2e-5)
  _, adapter = oftjax.split_params(params)
  restored = oftjax.fold_adapters(oftjax.merge_params(merged, adapter), geoms, oft, unfold=True)
  chex.assert_trees_all_close(restored, base, atol=1e-5)


def test_lora_merge_and_unmerge():
  model = TinyLM(use_einsum=True)
  lora = oftjax.AdapterConfig(method="lora", lora_rank=4, targets=TARGETS)
  wrapped, base, params, geoms = adapted_params(model, lora)
  y = wrapped.apply({"params": params}, TOKENS)
  merged = oftjax.fold_adapters(params, geoms, lora)
  chex.assert_trees_all_close(model.apply({"params": merged}, TOKENS), y, atol=2e-5)
  _, adapter = oftjax.split_params(params)
  restored = oftjax.fold_adapters(oftjax.merge_params(merged, adapter), geoms, lora, unfold=True)
  chex.assert_trees_all_close(restored, base, atol=1e-5)


def test_multi_axis_output_dense_general():
  layer = nn.DenseGeneral((3, 8), axis=(-2, -1))
  x = jax.random.normal(jax.random.key(2), (4, 2, 16))
  config = oftjax.AdapterConfig(block_size=4)
  adapted = oftjax.adapt(layer, config, x)
  wrapped, geoms = adapted.module, adapted.geometries
  params = wrapped.init(jax.random.key(3), x)["params"]
  params["oft"]["weight"] = 0.3 * jax.random.normal(jax.random.key(4), (8, 6))
  y = wrapped.apply({"params": params}, x)
  chex.assert_shape(y, (4, 3, 8))
  merged = oftjax.fold_adapters(params, geoms, config)
  chex.assert_trees_all_close(layer.apply({"params": merged}, x), y, atol=1e-5)


@pytest.mark.parametrize("kind", ["jit", "scan", "remat", "loop"])
@pytest.mark.parametrize("method", ["oft", "oftv1", "lora"])
def test_zero_init_is_bit_identical_to_base(kind, method):
  model = TinyLM(scan=kind != "loop", remat=kind == "remat")
  wrapped = oftjax.Adapted(
    model, oftjax.AdapterConfig(method=method, block_size=8, targets=TARGETS)
  )
  params = wrapped.init(jax.random.key(1), TOKENS)["params"]
  base, _ = oftjax.split_params(params)
  y_base = jax.jit(model.apply)({"params": base}, TOKENS)
  y = jax.jit(wrapped.apply)({"params": params}, TOKENS)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y_base))


def test_bfloat16_activations_keep_their_dtype():
  layer = nn.Dense(16, dtype=jnp.bfloat16)
  wrapped = oftjax.Adapted(layer, oftjax.AdapterConfig(block_size=8))
  x = jnp.ones((2, 32), jnp.bfloat16)
  params = wrapped.init(jax.random.key(0), x)["params"]
  chex.assert_type(params["oft"]["weight"], jnp.float32)
  chex.assert_type(wrapped.apply({"params": params}, x), jnp.bfloat16)


def test_adapter_gradients_match_finite_differences():
  model = TinyLM(width=16, mlp=32, depth=1)
  config = oftjax.AdapterConfig(block_size=8, targets=TARGETS, parameterization="cayley")
  wrapped, base, params, _ = adapted_params(model, config, scale=0.1)
  frozen, adapter = oftjax.split_params(params)

  def loss(a):
    return jnp.mean(wrapped.apply({"params": oftjax.merge_params(frozen, a)}, TOKENS) ** 2)

  jax.config.update("jax_enable_x64", True)
  try:
    adapter64 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), adapter)
    frozen = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), frozen)
    jax.test_util.check_grads(
      jax.jit(loss), (adapter64,), order=1, modes=["rev"], atol=1e-3, rtol=1e-3
    )
  finally:
    jax.config.update("jax_enable_x64", False)


def test_target_matching_nothing_is_an_error():
  wrapped = oftjax.Adapted(TinyLM(), oftjax.AdapterConfig(block_size=8, targets=r".*qproj"))
  with pytest.raises(ValueError, match=r"matched no .*layers/q_proj"):
    wrapped.init(jax.random.key(0), TOKENS)


def test_block_size_not_dividing_width_names_layer_and_fix():
  wrapped = oftjax.Adapted(TinyLM(), oftjax.AdapterConfig(block_size=24, targets=TARGETS))
  with pytest.raises(ValueError, match=r"layers/q_proj': block size 24 does not divide .* 64"):
    wrapped.init(jax.random.key(0), TOKENS)


def test_unsupported_layer_forms_are_errors():
  embed = oftjax.Adapted(TinyLM(), oftjax.AdapterConfig(block_size=8, targets="embed"))
  with pytest.raises(ValueError, match="'embed' is an Embed"):
    embed.init(jax.random.key(0), TOKENS)
  batched = oftjax.Adapted(nn.DenseGeneral(4, batch_dims=(0,)), oftjax.AdapterConfig(block_size=2))
  with pytest.raises(ValueError, match="batch_dims"):
    batched.init(jax.random.key(0), jnp.ones((2, 3, 4)))
  implicit = oftjax.Adapted(nn.Einsum((4, 2), "bd,de"), oftjax.AdapterConfig(block_size=2))
  with pytest.raises(ValueError, match="not supported"):
    implicit.init(jax.random.key(0), jnp.ones((3, 4)))
  weight_ellipsis = oftjax.Adapted(nn.Einsum((4, 2), "bd,d...->b..."), oftjax.AdapterConfig())
  with pytest.raises(ValueError, match="explicitly"):
    weight_ellipsis.init(jax.random.key(0), jnp.ones((3, 4)))


def test_ellipsis_einsum_adapts_and_folds():
  layer = nn.Einsum((2, 6, 8), "...f,nhf->...nh")  # the gemma library's transposed gating
  x = jax.random.normal(jax.random.key(2), (2, 3, 8))
  for config in (oftjax.AdapterConfig(block_size=4), oftjax.AdapterConfig(method="lora")):
    adapted = oftjax.adapt(layer, config, x)
    params = adapted.module.init(jax.random.key(3), x)["params"]
    _, adapter = oftjax.split_params(params)
    adapter = jax.tree_util.tree_map(
      lambda a: 0.3 * jax.random.normal(jax.random.key(4), a.shape), adapter
    )
    params = oftjax.merge_params(oftjax.split_params(params)[0], adapter)
    y = adapted.apply(params, x)
    chex.assert_shape(y, (2, 3, 2, 6))
    assert float(jnp.abs(y - layer.apply({"params": adapted.fold(params)}, x)).max()) < 1e-5


def test_packed_vector_of_wrong_length_is_an_error():
  config = oftjax.AdapterConfig(block_size=8, targets=TARGETS)
  wrapped, base, params, _ = adapted_params(TinyLM(), config)
  params["layers"]["q_proj"]["oft"]["weight"] = jnp.zeros((2, 8, 27))
  with pytest.raises(
    ValueError, match=r"q_proj': adapter leaf 'oft/weight' has shape \(8, 27\), expected \(8, 28\)"
  ):
    wrapped.apply({"params": params}, TOKENS)


def test_bad_config_values():
  with pytest.raises(ValueError, match="unknown adapter method"):
    oftjax.AdapterConfig(method="boft")
  with pytest.raises(ValueError, match="num_terms must be >= 2"):
    oftjax.AdapterConfig(num_terms=1)


def test_adapt_builds_one_object_for_layers_init_fold_and_peft_files(tmp_path):
  model = TinyLM()
  config = oftjax.AdapterConfig(block_size=8, targets=TARGETS)
  adapted = oftjax.adapt(model, config, TOKENS)
  names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
  assert sorted(adapted.geometries) == sorted(f"layers/{n}" for n in names)
  base = model.init(jax.random.key(1), TOKENS)["params"]
  adapter = adapted.init(jax.random.key(2))
  assert all(not np.any(np.asarray(x)) for x in jax.tree_util.tree_leaves(adapter))  # R = I
  y = adapted.apply(oftjax.merge_params(base, adapter), TOKENS)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(model.apply({"params": base}, TOKENS)))
  _, _, params, _ = adapted_params(model, config)
  _, trained = oftjax.split_params(params)
  merged = adapted.fold(params)
  chex.assert_trees_all_equal(merged, oftjax.fold_adapters(params, adapted.geometries, config))
  chex.assert_trees_all_close(
    model.apply({"params": merged}, TOKENS), adapted.apply(params, TOKENS), atol=2e-5
  )
  chex.assert_trees_all_close(adapted.unfold(oftjax.merge_params(merged, trained)), base, atol=1e-5)
  adapted.export_peft(str(tmp_path / "peft"), trained)
  imported, imported_config = adapted.import_peft(str(tmp_path / "peft"))
  assert imported_config.targets == TARGETS and imported_config.block_size == 8
  chex.assert_trees_all_close(jax.tree_util.tree_map(jnp.asarray, imported), trained, atol=0)
  lora = adapted.with_config(oftjax.AdapterConfig(method="lora", lora_rank=4, targets=".*q_proj"))
  assert list(lora.geometries) == ["layers/q_proj"] and lora.module.config.method == "lora"
  assert len(adapted.geometries) == 7  # each object traced on its own: no shared recorder


class _NamedLikeAnAdapter(nn.Module):
  """A model whose own submodules are named `lora_proj` and `oft_gate`."""

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(8, name="lora_proj")(x)
    return nn.Dense(8, name="oft_gate")(x) + nn.Dense(8, name="out")(x)


@pytest.mark.parametrize("method", ["oft", "lora"])
def test_own_submodules_named_like_adapters_stay_frozen(method):
  """Only sub-trees holding exactly an adapter's leaves are adapters, whatever their name."""
  from oftjax import params as P

  config = oftjax.AdapterConfig(method=method, block_size=4, lora_rank=2, targets=r".*out")
  model = oftjax.Adapted(_NamedLikeAnAdapter(), config)
  variables = model.init(jax.random.PRNGKey(0), jnp.ones((1, 8)))
  base, adapter = P.split_params(variables["params"])
  assert {"lora_proj", "oft_gate"} <= set(base)
  assert set(adapter) == {"out"} and set(adapter["out"]) == {method}
  mask = P.trainable_mask(variables["params"])
  assert not any(jax.tree_util.tree_leaves(mask["lora_proj"]))
  assert not any(jax.tree_util.tree_leaves(mask["oft_gate"]))
  assert all(jax.tree_util.tree_leaves(mask["out"][method]))
