"""COFT trains like PEFT's: 50 Adam steps from the same nonzero init end at the same weights.

PEFT (peft/tuners/oft/layer.py, `OFTRotationModule.forward`) writes
`_project_batch(weight, eps)` back into the stored weight before every forward, under
`no_grad`: each block's `Q` is rescaled onto the Frobenius sphere of radius
`eps / sqrt(r)` (`r` = the layer's stored blocks) when outside it. The gradient is
taken at the projected value and the optimizer updates that value. oftjax's step
projects the incoming tree, differentiates there and projects the updated tree, so its
stored weight is PEFT's after the next write-back.
"""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import oftjax
from oftjax import params as P

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
import peft_helpers as PH  # noqa: E402  (needs torch and peft)

D_IN, D_OUT, BLOCK, EPS, STEPS, LR = 32, 16, 8, 1.4, 50, 1e-2
RADIUS = EPS / np.sqrt(D_IN // BLOCK)  # 0.7 per block


def _problem():
  """PEFT's COFT layer with a nonzero init (two blocks inside the ball, two outside) and data."""
  torch.manual_seed(0)
  model, layer = PH.peft_oft_linear(
    D_IN,
    D_OUT,
    oft_block_size=BLOCK,
    coft=True,
    eps=EPS,
    use_cayley_neumann=True,
    num_cayley_neumann_terms=6,
  )
  rng = np.random.default_rng(0)
  init = (0.1 * rng.standard_normal(layer.oft_R["default"].weight.shape)).astype(np.float32)
  with torch.no_grad():
    layer.oft_R["default"].weight.copy_(torch.from_numpy(init))
  xs = rng.standard_normal((STEPS, 16, D_IN)).astype(np.float32)
  turn = np.linalg.qr(rng.standard_normal((D_IN, D_IN)))[0].astype(np.float32)
  kernel = layer.base_layer.weight.detach().numpy().T
  bias = layer.base_layer.bias.detach().numpy()
  ys = (xs @ turn) @ kernel + bias  # a rotation of the inputs the adapter can only partly learn
  return model, layer, init, kernel, bias, xs, ys


def _block_norms(packed):
  return np.sqrt(2.0) * np.linalg.norm(packed, axis=-1)  # ‖Q‖_F of each block


def _peft_run(model, layer, xs, ys):
  module = layer.oft_R["default"]
  optimizer = torch.optim.Adam([module.weight], lr=LR)
  losses = []
  for x, y in zip(xs, ys):
    optimizer.zero_grad()
    loss = torch.mean((model(torch.from_numpy(x)) - torch.from_numpy(y)) ** 2)
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
  with torch.no_grad():  # what PEFT's next forward (or merge) writes back and uses
    final = module._project_batch(module.weight, eps=EPS).numpy()
  return np.array(losses), final


def _oftjax_run(init, kernel, bias, xs, ys, project):
  config = oftjax.AdapterConfig(block_size=BLOCK, num_terms=6, coft_eps=EPS)
  dense = oftjax.Adapted(nn.Dense(D_OUT), config)
  frozen = {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}
  loss_fn = lambda p, b: jnp.mean((dense.apply({"params": p}, b[0]) - b[1]) ** 2)
  optimizer = optax.adam(LR)  # torch's Adam defaults: b1 0.9, b2 0.999, eps 1e-8
  step = oftjax.make_train_step(
    loss_fn,
    optimizer,
    donate=False,
    project=(lambda t: P.project_adapters(t, config)) if project else None,
  )
  trainable = {"oft": {"weight": jnp.asarray(init)}}
  state, losses, norms = optimizer.init(trainable), [], []
  for x, y in zip(xs, ys):
    trainable, state, loss, _ = step(trainable, state, frozen, (jnp.asarray(x), jnp.asarray(y)))
    losses.append(float(loss))
    norms.append(_block_norms(np.asarray(trainable["oft"]["weight"])).max())
  return np.array(losses), np.asarray(trainable["oft"]["weight"]), np.array(norms)


def test_coft_matches_peft_over_50_adam_steps():
  model, layer, init, kernel, bias, xs, ys = _problem()
  norms0 = _block_norms(init)
  assert (norms0 < RADIUS).any() and (norms0 > RADIUS).any()  # both cases at step 1
  peft_losses, peft_final = _peft_run(model, layer, xs, ys)
  losses, final, norms = _oftjax_run(init, kernel, bias, xs, ys, project=True)
  # Measured: weights 8e-7 apart (entries up to 0.18), losses 1e-6 apart (0.74 -> 0.55).
  np.testing.assert_allclose(final, peft_final, atol=5e-6)
  np.testing.assert_allclose(losses, peft_losses, atol=1e-5)
  assert peft_losses[-1] < peft_losses[0] - 0.1  # it trained
  assert norms.max() <= RADIUS * (1 + 1e-6)  # the stored weight is projected after every step
  np.testing.assert_allclose(_block_norms(final), RADIUS, rtol=1e-6)  # the constraint binds


def test_straight_through_alone_drifts_from_peft():
  """The oracle tells the two apart: projecting only in the forward lets the raw weight grow."""
  model, layer, init, kernel, bias, xs, ys = _problem()
  _, peft_final = _peft_run(model, layer, xs, ys)
  _, final, norms = _oftjax_run(init, kernel, bias, xs, ys, project=False)
  assert norms[-1] > 2 * RADIUS  # measured 2.1 (radius 0.7)
  effective = np.asarray(oftjax.project_coft(jnp.asarray(final), BLOCK, EPS))
  assert np.abs(effective - peft_final).max() > 1e-2
