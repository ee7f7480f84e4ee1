"""Rematerialisation policies: same loss and gradients, less compiled activation memory."""

import gemma4_helpers as G4
import gemma_helpers as H
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oftjax
from oftjax.models import gemma, remat
from oftjax.train import config as job_config

POLICY_OF = {
  "full": None,
  "dots": jax.checkpoint_policies.dots_saveable,
  "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _deep_gemma3(policy, layers=6):
  return gemma.from_hf_config(H.deep_gemma3_config(layers), remat=policy)


def _checkpoint_policies(jaxpr) -> list:
  """The `policy` of every checkpoint (remat) equation, nested jaxprs (scan bodies) included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("checkpoint", "remat", "remat2"):  # its name by jax version
      found.append(eqn.params["policy"])
    for param in eqn.params.values():
      for inner in param if isinstance(param, (tuple, list)) else [param]:
        inner = getattr(inner, "jaxpr", inner)  # a ClosedJaxpr's Jaxpr
        if hasattr(inner, "eqns"):
          found += _checkpoint_policies(inner)
  return found


def test_the_job_offers_exactly_the_library_policies():
  assert job_config.REMAT_CHOICES == ("auto", *remat.POLICIES)


def test_policy_names_and_bools():
  assert remat.policy_name(True) == "full" and remat.policy_name(False) == "none"
  assert gemma.config_from_hf(H.hf_config("gemma3"), remat=True).remat == "full"
  with pytest.raises(ValueError, match="unknown remat policy 'dot'.*dots_no_batch"):
    remat.policy_name("dot")


@pytest.mark.parametrize("policy", ["none", "full", "dots", "dots_no_batch"])
def test_each_policy_reaches_jax_checkpoint_in_both_families(policy):
  tokens = jnp.zeros((1, 5), jnp.int32)
  for model in (
    _deep_gemma3(policy, layers=2),
    gemma.from_hf_config(G4.text_config("shared"), remat=policy),
  ):
    params = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), tokens)["params"])
    loss = lambda p, m=model: m.apply({"params": p}, tokens).sum()
    found = _checkpoint_policies(jax.make_jaxpr(loss)(params).jaxpr)  # grad would inline it
    if policy == "none":
      assert found == [], type(model).__name__
    else:
      assert found and all(p == POLICY_OF[policy] for p in found), (type(model).__name__, found)


@pytest.mark.slow  # three compiles of a 4-layer OFT train step: ~20 s of CPU
def test_remat_keeps_the_oft_loss_and_gradients_and_lowers_temp_memory():
  """A 4-layer Gemma 3 with OFT adapters: the rematerialised steps' loss and adapter
  gradients equal the plain step's (fp32), and each keeps less than the one before it."""
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, H.VOCAB, (4, 48)))
  acfg = oftjax.AdapterConfig(method="oft", targets=r".*(q_proj|down_proj)", block_size=16)
  rng = np.random.default_rng(1)
  shapes = jax.eval_shape(lambda: gemma.init_params(_deep_gemma3("none", 4), jax.random.key(0)))
  frozen = H.random_like(shapes, rng, 0.2)  # norms included
  temp, results, trainable = {}, {}, None
  for policy in ("none", "dots_no_batch", "full"):
    adapted = oftjax.adapt(_deep_gemma3(policy, 4), acfg, tokens[:, :8])
    if trainable is None:  # non-zero rotations
      trainable = H.random_like(adapted.init(jax.random.key(2)), rng, 0.05)
    loss = H.adapter_loss_of(adapted.module)
    compiled = jax.jit(jax.value_and_grad(loss)).lower(trainable, frozen, tokens).compile()
    temp[policy] = compiled.memory_analysis().temp_size_in_bytes
    results[policy] = compiled(trainable, frozen, tokens)
  print("temp bytes by policy:", temp)
  value, grads = results["none"]
  for policy, (v, g) in results.items():
    np.testing.assert_allclose(v, value, rtol=1e-6, err_msg=policy)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(grads)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=policy)
  assert temp["full"] < temp["dots_no_batch"] < temp["none"], temp
  assert temp["full"] < 0.5 * temp["none"], temp
