"""Next-token choice: the top-k / top-p filters equal transformers' warpers; tiny temperature is greedy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oftjax.models.gemma import sampling

torch = pytest.importorskip("torch")
logits_process = pytest.importorskip("transformers.generation.logits_process")


def _logits(seed=0, rows=8, vocab=60):
  rng = np.random.default_rng(seed)
  scales = np.linspace(0.3, 4.0, rows)[:, None]  # flat to peaked distributions
  return (rng.standard_normal((rows, vocab)) * scales).astype(np.float32)


def _kept(x):
  return np.isfinite(np.asarray(x))


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.6, 0.9, 0.97])
def test_top_p_filter_equals_transformers(top_p):
  logits = _logits()
  ours = np.asarray(sampling.top_p_filter(jnp.asarray(logits), jnp.float32(top_p)))
  theirs = logits_process.TopPLogitsWarper(top_p)(None, torch.from_numpy(logits)).numpy()
  np.testing.assert_array_equal(_kept(ours), _kept(theirs))
  np.testing.assert_array_equal(ours[_kept(ours)], logits[_kept(ours)])  # kept ones unchanged
  assert 1 <= _kept(ours).sum(-1).min() and _kept(ours).sum(-1).max() < logits.shape[-1]


@pytest.mark.parametrize("top_k", [1, 5, 59])
def test_top_k_filter_equals_transformers(top_k):
  logits = _logits(1)
  ours = np.asarray(sampling.top_k_filter(jnp.asarray(logits), jnp.int32(top_k)))
  theirs = logits_process.TopKLogitsWarper(top_k)(None, torch.from_numpy(logits)).numpy()
  np.testing.assert_array_equal(_kept(ours), _kept(theirs))
  assert (_kept(ours).sum(-1) == top_k).all()


def test_top_p_keeps_the_smallest_set_reaching_p():
  probs = np.array([[0.05, 0.5, 0.15, 0.3]])  # ranked: 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)
  logits = jnp.asarray(np.log(probs), jnp.float32)
  expected = {0.4: [1], 0.6: [1, 3], 0.9: [1, 3, 2], 0.99: [0, 1, 2, 3], 1.0: [0, 1, 2, 3]}
  for top_p, tokens in expected.items():
    kept = np.flatnonzero(_kept(sampling.top_p_filter(logits, jnp.float32(top_p))[0]))
    assert sorted(kept) == sorted(tokens), (top_p, kept)


def test_top_p_after_top_k_sees_only_the_survivors():
  """`-inf` from top-k carries no probability: the nucleus is taken over the k survivors."""
  probs = np.array([[0.4, 0.3, 0.2, 0.1]])
  k2 = sampling.top_k_filter(jnp.asarray(np.log(probs), jnp.float32), jnp.int32(2))
  # over the survivors the first token holds 0.4 / 0.7 = 0.57 < 0.6: the second one stays
  kept = _kept(sampling.top_p_filter(k2, jnp.float32(0.6))[0])
  np.testing.assert_array_equal(kept, [True, True, False, False])


def test_tiny_temperature_is_greedy():
  logits = jnp.asarray(_logits(2, rows=64, vocab=100))
  top2 = np.sort(np.asarray(logits), -1)[:, -2:]
  assert (top2[:, 1] - top2[:, 0]).min() > 1e-3  # no near-tie for the noise to flip
  greedy = np.asarray(sampling.next_token(logits, jax.random.key(0), 0.0, 0, 1.0))
  np.testing.assert_array_equal(greedy, np.argmax(np.asarray(logits), -1))
  for seed in range(4):
    cold = sampling.next_token(logits, jax.random.key(seed), jnp.float32(1e-5), 0, 1.0)
    np.testing.assert_array_equal(np.asarray(cold), greedy)
  warm = sampling.next_token(logits, jax.random.key(0), jnp.float32(1.0), 0, 1.0)
  assert (np.asarray(warm) != greedy).any()  # the check above could fail


def test_settings_are_checked():
  for bad, message in [
    (dict(temperature=-1.0), "temperature must be"),
    (dict(temperature=float("nan")), "temperature must be"),
    (dict(top_k=0), "top_k must be >= 1"),
    (dict(top_p=0.0), "top_p must be in"),
    (dict(top_p=1.5), "top_p must be in"),
  ]:
    kwargs = {"temperature": 1.0, "top_k": None, "top_p": None, **bad}
    with pytest.raises(ValueError, match=message):
      sampling.check_settings(**kwargs)
