"""Parity with Hugging Face PEFT's OFT (torch + peft as oracles)."""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

import oftjax
from oftjax import orthogonal

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
import peft_helpers as PH  # noqa: E402  (needs torch and peft)


def peft_layer(d_in, d_out, block_size, neumann, n_terms, seed=0):
  torch.manual_seed(seed)
  model, layer = PH.peft_oft_linear(
    d_in,
    d_out,
    oft_block_size=block_size,
    use_cayley_neumann=neumann,
    num_cayley_neumann_terms=n_terms,
  )
  with torch.no_grad():
    layer.oft_R["default"].weight.normal_(0.0, 0.15)
  return model, layer


@pytest.mark.parametrize("n_terms", [4, 5, 6, 8])
def test_neumann_blocks_equal_peft(n_terms):
  _, layer = peft_layer(32, 16, 8, True, n_terms)
  module = layer.oft_R["default"]
  packed = module.weight.detach().numpy()
  theirs = module._cayley_batch(module.weight, 8, True, n_terms).detach().numpy()
  ours = oftjax.cayley_neumann(oftjax.skew_symmetric(jnp.asarray(packed), 8), n_terms)
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-6)


def test_exact_blocks_equal_peft_with_sign_flip():
  _, layer = peft_layer(32, 16, 8, False, 5)
  module = layer.oft_R["default"]
  packed = module.weight.detach().numpy()
  theirs = module._cayley_batch(module.weight, 8, False).detach().numpy()
  ours = oftjax.cayley(oftjax.skew_symmetric(-jnp.asarray(packed), 8))
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-6)
  unflipped = oftjax.cayley(oftjax.skew_symmetric(jnp.asarray(packed), 8))
  assert np.abs(np.asarray(unflipped) - theirs).max() > 1e-3  # the flip is needed


@pytest.mark.parametrize("neumann", [True, False])
def test_adapted_dense_equals_peft_oft_linear(neumann):
  model, layer = peft_layer(48, 24, 16, neumann, 6, seed=1)
  base = layer.base_layer
  packed = layer.oft_R["default"].weight.detach().numpy()
  x = np.random.default_rng(0).standard_normal((2, 7, 48)).astype(np.float32)
  with torch.no_grad():
    expected = model(torch.from_numpy(x)).numpy()
  config = oftjax.AdapterConfig(
    block_size=16, num_terms=6, parameterization="cayley_neumann" if neumann else "cayley"
  )
  params = {
    "kernel": jnp.asarray(base.weight.detach().numpy().T),
    "bias": jnp.asarray(base.bias.detach().numpy()),
    "oft": {"weight": jnp.asarray(packed if neumann else -packed)},
  }
  dense = oftjax.Adapted(nn.Dense(24), config)
  ours = dense.apply({"params": params}, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-5)
  assert params["oft"]["weight"].shape == (48 // 16, orthogonal.num_packed(16))
