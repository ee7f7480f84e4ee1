"""Gemma 4 KV-cache generation: greedy equals transformers' `generate`; decode equals the full pass."""

import gemma4_helpers as G
import gemma_helpers as H
import numpy as np
import pytest

from oftjax.models import gemma

NEW = 14  # prompt 7 + 14 new tokens: far past the sliding window of 3
SEEDS = {"pattern": 0, "shared": 5}  # random models whose greedy continuations vary


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
  out = {}
  for name, seed in SEEDS.items():
    folder = tmp_path_factory.mktemp(f"g4gen-{name}")
    out[name] = (G.save_hf_model(name, folder, seed=seed), *gemma.load(str(folder)))
  return out


@pytest.mark.parametrize("name", ["pattern", pytest.param("shared", marks=pytest.mark.slow)])
def test_greedy_matches_transformers(loaded, name):
  """KV-shared layers decode from their source layer's cache, as transformers does."""
  hf, model, params = loaded[name]
  tokens, mask = H.padded_batch(np.random.default_rng(7), [7, 3], 7, left=True)
  ref = H.hf_generate(hf, tokens, mask, NEW)
  ours = np.asarray(gemma.generate(model, params, tokens, mask, max_new_tokens=NEW))
  assert ours.shape == (2, NEW)
  assert len(np.unique(ref)) > 6  # a continuation that is not one token repeated
  np.testing.assert_array_equal(ours, ref)


def test_cache_decode_equals_full_forward(loaded):
  _, model, params = loaded["pattern"]
  tokens, mask = H.padded_batch(np.random.default_rng(8), [10, 6], 10, left=True)
  cache = gemma.init_cache(model.config, 2, 10)
  assert cache[1] == (None, None)  # the KV-shared segment keeps no cache of its own
  stepped, full = H.decode_stepwise(model, params, gemma.Gemma4.decode, cache, tokens, mask)
  real = mask.astype(bool)
  np.testing.assert_allclose(stepped[real], full[real], atol=5e-5)
