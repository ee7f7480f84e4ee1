"""adapter_health: figures per layer (each scanned layer on its own), COFT radius per layer, summaries."""

import jax
import jax.numpy as jnp
import numpy as np
from tiny_models import TinyLM

import oftjax
from oftjax import params as P

EPS = 0.6


def health(adapter, config):
  return jax.jit(lambda a: P.adapter_health(a, config))(adapter)


def scanned_adapters():
  """OFT leaves of a 2-layer scanned TinyLM (`[2, r, 28]`), layer 1 far larger than layer 0."""
  config = oftjax.AdapterConfig(block_size=8, targets=r".*_proj", coft_eps=EPS)
  wrapped = oftjax.Adapted(TinyLM(vocab=32, width=32, mlp=64, depth=2), config)
  params = jax.jit(wrapped.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  _, adapter = oftjax.split_params(params)
  keys = iter(jax.random.split(jax.random.key(1), 16))
  scale = jnp.array([0.01, 0.3])[:, None, None]  # per scanned layer
  adapter = jax.tree_util.tree_map(
    lambda x: scale * jax.random.normal(next(keys), x.shape), adapter
  )
  return config, adapter


def test_scanned_layers_are_measured_one_by_one():
  config, adapter = scanned_adapters()
  figures_of = health(adapter, config)
  layers = figures_of["layers"]
  assert sorted(layers) == sorted(
    f"layers/{p}"
    for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
  )
  for i in range(2):  # each scanned layer alone, unstacked, gives the same figures
    alone = health(jax.tree_util.tree_map(lambda x: x[i], adapter), config)["layers"]
    for path, figures in layers.items():
      for name in ("q_norm", "orthogonality_error", "coft_ratio"):
        assert figures[name].shape == (2,)
        np.testing.assert_allclose(figures[name][i], alone[path][name], rtol=1e-6, atol=5e-7)
  # The radius is each layer's own eps / sqrt(r): 4 blocks of 8 on the 32-wide inputs, 8 on
  # down_proj's 64 (the old figure pooled all layers' blocks: eps / sqrt(2 r)).
  np.testing.assert_allclose(layers["layers/q_proj"]["coft_radius"], EPS / 2, rtol=1e-6)
  np.testing.assert_allclose(layers["layers/down_proj"]["coft_radius"], EPS / np.sqrt(8), rtol=1e-6)
  q_norms = np.concatenate([np.asarray(f["q_norm"]) for f in layers.values()])
  errors = np.concatenate([np.asarray(f["orthogonality_error"]) for f in layers.values()])
  np.testing.assert_allclose(figures_of["max_q_norm"], q_norms.max(), rtol=1e-6)
  np.testing.assert_allclose(figures_of["mean_q_norm"], q_norms.mean(), rtol=1e-6)
  np.testing.assert_allclose(figures_of["orthogonality_error"], errors.max(), rtol=1e-6)
  np.testing.assert_allclose(figures_of["mean_orthogonality_error"], errors.mean(), rtol=1e-6)
  assert q_norms.min() < 0.05 and q_norms.max() > 0.1, q_norms  # the layers really differ


def test_coft_ratio_tells_in_ball_from_projected():
  config, adapter = scanned_adapters()
  before = health(adapter, config)
  ratios = np.stack([np.asarray(f["coft_ratio"]) for f in before["layers"].values()])
  assert (ratios[:, 0] < 1).all() and (ratios[:, 1] > 1).all()  # layer 0 inside, 1 outside
  after = health(P.project_adapters(adapter, config), config)
  ratios = np.stack([np.asarray(f["coft_ratio"]) for f in after["layers"].values()])
  np.testing.assert_allclose(ratios[:, 1], 1.0, rtol=1e-6)  # projected onto the sphere
  np.testing.assert_allclose(
    ratios[:, 0],
    np.stack([np.asarray(f["coft_ratio"])[0] for f in before["layers"].values()]),
    rtol=1e-6,
  )
  np.testing.assert_allclose(after["max_coft_ratio"], 1.0, rtol=1e-6)
  # The figures are of the projected blocks either way (the forward projects too).
  np.testing.assert_allclose(
    after["orthogonality_error"], before["orthogonality_error"], rtol=1e-5, atol=1e-7
  )


def test_project_adapters_is_identity_without_coft_and_keeps_base_leaves():
  config, adapter = scanned_adapters()
  plain = oftjax.AdapterConfig(block_size=8)
  tree = {"kernel": jnp.ones(3), **adapter}
  same = P.project_adapters(tree, plain)
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: a is b, same, tree))
  projected = P.project_adapters(tree, config)
  assert projected["kernel"] is tree["kernel"]
  assert P.adapter_health({"kernel": jnp.ones(3)}, config) == {}


def test_summaries_alone_equal_the_full_figures():
  config, adapter = scanned_adapters()
  full = health(adapter, config)
  alone = jax.jit(lambda a: P.adapter_health(a, config, per_layer=False))(adapter)
  assert sorted(alone) == sorted(k for k in full if k != "layers")
  for key, value in alone.items():
    np.testing.assert_array_equal(value, full[key])
