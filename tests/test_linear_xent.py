"""The chunked head cross-entropy equals the full-logits one: values, gradients, the job's loss."""

import gemma4_helpers as G4
import gemma_helpers as H
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oftjax
from oftjax import params as P
from oftjax.models import gemma
from oftjax.train import linear_xent, objective


def _reference(h, w, targets, weights, transposed, cap):
  logits = (h @ w if transposed else h @ w.T).astype(jnp.float32)
  logits = logits if cap is None else jnp.tanh(logits / cap) * cap
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  correct = (jnp.argmax(logits, axis=-1) == targets) * weights
  return jnp.sum(nll * weights), jnp.sum(correct)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("cap", [None, 3.0])
@pytest.mark.parametrize("chunk_elements", [1 << 25, 3 * 50])  # one chunk; 3-token chunks, padded
def test_values_and_gradients_equal_the_full_logits(monkeypatch, transposed, cap, chunk_elements):
  monkeypatch.setattr(linear_xent, "CHUNK_ELEMENTS", chunk_elements)
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.normal(size=(2, 7, 16)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(16, 50) if transposed else (50, 16)), jnp.float32)
  best = jnp.argmax(h @ w if transposed else h @ w.T, axis=-1)  # soft-capping keeps the order
  targets = jnp.where(jnp.asarray(rng.random((2, 7)) < 0.5), best, rng.integers(0, 50, (2, 7)))
  weights = jnp.asarray(rng.integers(0, 2, size=(2, 7)), jnp.float32)

  def fused(h, w):
    return linear_xent.linear_xent(
      h, w, targets, weights, transposed=transposed, softcap=cap, head_grad=True
    )

  got, want = fused(h, w), _reference(h, w, targets, weights, transposed, cap)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  assert float(got[1]) == float(want[1]) and float(want[1]) > 0
  g_got = jax.grad(lambda h, w: 0.7 * fused(h, w)[0], argnums=(0, 1))(h, w)
  g_want = jax.grad(
    lambda h, w: 0.7 * _reference(h, w, targets, weights, transposed, cap)[0], argnums=(0, 1)
  )(h, w)
  for a, b in zip(g_got, g_want):
    # atol: terms of size ~1 (softmax minus one-hot, times weights) cancel to ~1e-4 entries
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(b).max()) > 1e-2
  frozen = jax.grad(
    lambda w: linear_xent.linear_xent(h, w, targets, weights, transposed=transposed)[0]
  )(w)
  assert not np.any(np.asarray(frozen))  # head_grad=False: a zero cotangent, never computed


def _adapted_gemma(cfg):
  model = gemma.from_hf_config(cfg)
  params = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))["params"]
  params = jax.tree_util.tree_map(
    lambda x: x + 0.3 * jax.random.normal(jax.random.key(2), x.shape, x.dtype), params
  )
  config = oftjax.AdapterConfig(method="oft", block_size=4, targets=r".*_proj")
  adapted = oftjax.adapt(model, config, jnp.zeros((1, 4), jnp.int32))
  adapter = jax.tree_util.tree_map(
    lambda x: 0.1 * jax.random.normal(jax.random.key(3), x.shape, x.dtype),
    adapted.init(jax.random.key(0)),
  )
  return adapted, params, adapter


@pytest.mark.parametrize(
  "cfg, tie",
  [(H.hf_config("gemma2"), False), (H.hf_config("gemma3"), True), (G4.text_config("moe"), True)],
  ids=["gemma2-softcap-untied", "gemma3-tied", "gemma4-moe-softcap-tied"],
)
def test_the_jobs_loss_equals_the_logits_loss_with_adapters(cfg, tie):
  cfg.tie_word_embeddings = tie
  adapted, params, adapter = _adapted_gemma(cfg)
  assert ("lm_head" in params) == (not tie)
  rng = np.random.default_rng(0)
  batch = {
    "inputs": jnp.asarray(rng.integers(1, cfg.vocab_size, size=(2, 9))),
    "targets": jnp.asarray(rng.integers(1, cfg.vocab_size, size=(2, 9))),
    "positions": jnp.tile(jnp.arange(9), (2, 1)),
    "segment_ids": jnp.ones((2, 9), jnp.int32).at[1, 6:].set(2),
    "loss_mask": jnp.ones((2, 9), jnp.float32).at[0, :3].set(0),
  }

  def logits_loss(tree):
    merged = P.merge_params(params, tree)
    logits = adapted.module.apply(
      {"params": merged}, batch["inputs"], batch["positions"], batch["segment_ids"]
    )
    return objective.masked_xent(logits, batch)

  def job_loss(tree):
    return objective.next_token_loss(adapted.module, P.merge_params(params, tree), batch)

  (got, got_aux), g_got = jax.jit(jax.value_and_grad(job_loss, has_aux=True))(adapter)
  (want, want_aux), g_want = jax.jit(jax.value_and_grad(logits_loss, has_aux=True))(adapter)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert got_aux["tokens"] == want_aux["tokens"] == 15
  np.testing.assert_allclose(got_aux["token_accuracy"], want_aux["token_accuracy"])
  for a, b in zip(jax.tree_util.tree_leaves(g_got), jax.tree_util.tree_leaves(g_want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_an_adapted_head_goes_through_the_full_logits():
  """Adapter leaves beside `lm_head`'s kernel: only the module computes that head right."""
  cfg = H.hf_config("gemma3")
  cfg.tie_word_embeddings = False
  model = gemma.from_hf_config(cfg)
  config = oftjax.AdapterConfig(method="oft", block_size=4, targets=r".*_proj|lm_head")
  adapted = oftjax.adapt(model, config, jnp.zeros((1, 4), jnp.int32))
  params = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))["params"]
  adapter = jax.tree_util.tree_map(
    lambda x: 0.1 * jax.random.normal(jax.random.key(3), x.shape, x.dtype),
    adapted.init(jax.random.key(0)),
  )
  merged = P.merge_params(params, adapter)
  assert objective._plain_head(merged) is None and objective._plain_head(params) is not None
  batch = {
    "inputs": jnp.ones((1, 5), jnp.int32),
    "targets": jnp.full((1, 5), 3),
    "positions": jnp.arange(5)[None],
    "segment_ids": jnp.ones((1, 5), jnp.int32),
    "loss_mask": jnp.ones((1, 5)),
  }
  logits = adapted.module.apply({"params": merged}, batch["inputs"])
  want = objective.masked_xent(logits, batch)[0]
  np.testing.assert_allclose(objective.next_token_loss(adapted.module, merged, batch)[0], want)
