"""KV-cache generation: greedy equals transformers' `generate`; the cache path equals the full pass."""

import gemma_helpers as H
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oftjax.models import gemma
from oftjax.models.gemma.model import Gemma

NEW = 20


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
  out = {}
  for name in ["gemma1_mqa", "gemma2", "gemma3"]:
    folder = tmp_path_factory.mktemp(name)
    hf = H.save_hf_model(name, folder)
    out[name] = (hf, *gemma.load(str(folder)))
  return out


def _prompts():
  return H.padded_batch(np.random.default_rng(7), [7, 3], 7, left=True)


@pytest.mark.parametrize("name", ["gemma1_mqa", "gemma2", "gemma3"])
def test_greedy_matches_transformers(loaded, name):
  hf, model, params = loaded[name]
  tokens, mask = _prompts()
  ref = H.hf_generate(hf, tokens, mask, NEW)
  ours = np.asarray(gemma.generate(model, params, tokens, mask, max_new_tokens=NEW))
  assert ours.shape == (2, NEW)
  np.testing.assert_array_equal(ours, ref)


def test_right_padding_and_eos(loaded):
  hf, model, params = loaded["gemma3"]
  tokens, mask = _prompts()
  free = np.asarray(gemma.generate(model, params, tokens, mask, max_new_tokens=NEW))
  eos = int(free[0, 4])
  ref = H.hf_generate(hf, tokens, mask, NEW, eos_token_id=eos)
  right = np.zeros_like(tokens)
  right_mask = np.zeros_like(mask)
  for i in range(2):
    n = mask[i].sum()
    right[i, :n], right_mask[i, :n] = tokens[i, mask[i] == 1], 1
  ours = np.asarray(
    gemma.generate(model, params, right, right_mask, max_new_tokens=NEW, eos_token_id=eos)
  )
  np.testing.assert_array_equal(ours[:, : ref.shape[1]], ref)
  assert (ours[0, 5:] == 0).all()


def test_cache_decode_equals_full_forward(loaded):
  _, model, params = loaded["gemma3"]  # sliding window 4 < sequence
  tokens, mask = H.padded_batch(np.random.default_rng(8), [10, 6], 10, left=True)
  cache = gemma.init_cache(model.config, 2, 10)
  stepped, full = H.decode_stepwise(model, params, Gemma.decode, cache, tokens, mask)
  real = mask.astype(bool)
  np.testing.assert_array_less(np.abs(stepped - full)[real].max(), 1e-4)


def test_sampling(loaded):
  _, model, params = loaded["gemma2"]
  tokens, mask = _prompts()
  greedy = np.asarray(gemma.generate(model, params, tokens, mask, max_new_tokens=NEW))
  top1 = gemma.generate(
    model, params, tokens, mask, max_new_tokens=NEW, temperature=0.7, top_k=1, rng=jax.random.key(1)
  )
  np.testing.assert_array_equal(np.asarray(top1), greedy)

  def sample(seed, **kw):
    return gemma.generate(
      model,
      params,
      tokens,
      mask,
      max_new_tokens=NEW,
      temperature=2.0,
      rng=jax.random.key(seed),
      **kw,
    )

  a, b, c = sample(3), sample(3), sample(4)
  top5 = np.asarray(sample(5, top_k=5))
  full = np.asarray(
    H.forward(
      model,
      params,
      jnp.asarray(np.concatenate([tokens, top5], 1)),
      attention_mask=jnp.asarray(np.concatenate([mask, np.ones_like(top5)], 1)),
    )
  )
  ranks = (full[:, 6:-1] > np.take_along_axis(full[:, 6:-1], top5[..., None], -1)).sum(-1)
  assert ranks.max() < 5  # every sampled token was among the 5 most likely
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(a), np.asarray(c))
  assert ((np.asarray(a) >= 0) & (np.asarray(a) < H.VOCAB)).all()


@pytest.mark.slow
def test_sampling_tiny_temperature_and_top_p(loaded):
  """Temperature -> 0 is greedy; top-p samples stay in the nucleus; same seed, same output."""
  _, model, params = loaded["gemma2"]
  tokens, mask = _prompts()
  greedy = np.asarray(gemma.generate(model, params, tokens, mask, max_new_tokens=NEW))
  cold = gemma.generate(
    model, params, tokens, mask, max_new_tokens=NEW, temperature=1e-5, rng=jax.random.key(2)
  )
  np.testing.assert_array_equal(np.asarray(cold), greedy)

  temperature, top_p = 1.5, 0.5

  def sample(seed, **kw):
    return np.asarray(
      gemma.generate(
        model,
        params,
        tokens,
        mask,
        max_new_tokens=NEW,
        temperature=temperature,
        rng=jax.random.key(seed),
        **kw,
      )
    )

  def outside_nucleus(new):
    """How many sampled tokens lie outside the `top_p` nucleus of the full pass's logits."""
    full = (
      np.asarray(
        H.forward(
          model,
          params,
          jnp.asarray(np.concatenate([tokens, new], 1)),
          attention_mask=jnp.asarray(np.concatenate([mask, np.ones_like(new)], 1)),
        )
      )[:, 6:-1].astype(np.float64)
      / temperature
    )
    probs = np.exp(full - full.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    chosen = np.take_along_axis(probs, new[..., None], -1)
    above = np.where(probs > chosen, probs, 0).sum(-1)  # mass ranked above the sampled token
    return int((above >= top_p).sum())

  nucleus = sample(6, top_p=top_p)
  np.testing.assert_array_equal(nucleus, sample(6, top_p=top_p))
  assert not np.array_equal(nucleus, sample(7, top_p=top_p))
  assert outside_nucleus(nucleus) == 0
  assert outside_nucleus(sample(6)) > 0  # without top-p the same check fails
  np.testing.assert_array_equal(sample(6, top_p=1.0), sample(6))  # p = 1 filters nothing
