"""Gemma 4's layer schedule, and a traced program that does not grow with depth."""

import gemma4_helpers as G
import gemma_helpers as H
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oftjax.models import gemma
from oftjax.models.gemma.gemma4_schedule import LayerKind, layer_schedule

S, F = "sliding_attention", "full_attention"


def _config(layer_types, shared=0, remat=False):
  hf = G.text_config(
    "pattern",
    num_hidden_layers=len(layer_types),
    layer_types=list(layer_types),
    num_kv_shared_layers=shared,
  )
  return gemma.config_from_hf(hf, remat=remat)


@pytest.mark.parametrize(
  "layer_types, shared, expected",
  [
    # gemma-4-E2B-like: [sliding x4, full] x 7, the last 20 layers KV-shared.
    ([S, S, S, S, F] * 7, 20, [(0, 5, 3, False), (15, 5, 4, True)]),
    # 26B-A4B / 31B-like: [sliding x5, full] repeated, no sharing.
    ([S] * 5 + [F], 0, [(0, 1, 5, False), (5, 1, 1, False)]),
    ([S] * 5 + [F] + [S] * 5 + [F], 0, [(0, 6, 2, False)]),
    # An irregular tail: the repeating part is still one scan.
    ([S, F] * 5 + [F], 0, [(0, 2, 5, False), (10, 1, 1, False)]),
  ],
)
def test_schedule_scans_the_repeating_group(layer_types, shared, expected):
  cfg = _config(layer_types, shared)
  schedule = layer_schedule(cfg)
  got = [(s.start, len(s.kinds), s.repeats, s.kinds[0].kv_shared) for s in schedule]
  assert got == expected
  covered = [s.layer(r, j) for s in schedule for r in range(s.repeats) for j in range(len(s.kinds))]
  assert sorted(covered) == list(range(len(layer_types)))
  first_shared = len(layer_types) - shared
  for s in schedule:
    for r in range(s.repeats):
      for j, kind in enumerate(s.kinds):
        i = s.layer(r, j)
        assert kind == LayerKind(sliding=layer_types[i] == S, kv_shared=i >= first_shared)


def _train_step_text(model) -> str:
  params = jax.eval_shape(lambda: gemma.init_params(model, jax.random.key(0)))
  tokens = jax.ShapeDtypeStruct((2, 9), jnp.int32)
  return jax.jit(jax.value_and_grad(H.next_token_loss_of(model))).lower(params, tokens).as_text()


def test_traced_train_step_does_not_grow_with_depth():
  """8 and 32 layers ([sliding, full] repeated, the second half KV-shared) lower to the same ops."""
  texts = [_train_step_text(gemma.Gemma4(_config([S, F] * n, shared=n))) for n in (4, 16)]
  for op in (
    "stablehlo.dot_general",
    "stablehlo.while",
    "stablehlo.exponential",
    "stablehlo.rsqrt",
  ):
    counts = [t.count(op) for t in texts]
    assert counts[0] == counts[1] > 0, (op, counts)


@pytest.mark.slow
def test_train_step_gradients_reach_every_layer():
  cfg = _config([S, F] * 3, shared=2)  # segments [S, F] x 2, then [S', F'] x 1
  model = gemma.Gemma4(cfg)
  params = gemma.init_params(model, jax.random.key(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, G.VOCAB, (2, 9)))
  loss, grads = jax.jit(jax.value_and_grad(H.next_token_loss_of(model)))(params, tokens)
  assert np.isfinite(float(loss))
  for index, segment in enumerate(layer_schedule(cfg)):
    for slot in range(len(segment.kinds)):
      node = grads["layers"][f"segment_{index}"][f"slot_{slot}"]
      q = np.asarray(node["self_attn"]["q_proj"]["kernel"])
      assert q.shape[0] == segment.repeats and all(
        np.abs(q[r]).max() > 0 for r in range(segment.repeats)
      )
  # The shared layers' keys come from the last unshared layer of their type: it gets their gradient.
  source = np.asarray(grads["layers"]["segment_0"]["slot_1"]["self_attn"]["k_proj"]["kernel"])
  assert np.abs(source[-1]).max() > 0


def test_remat_flag_checkpoints_the_layer():
  tokens = jnp.zeros((1, 5), jnp.int32)

  def primitives(remat):
    model = gemma.Gemma4(_config([S, F], remat=remat))
    params = jax.eval_shape(lambda: gemma.init_params(model, jax.random.key(0)))
    return str(jax.make_jaxpr(jax.grad(H.next_token_loss_of(model)))(params, tokens))

  assert "remat" in primitives(True) or "checkpoint" in primitives(True)
  assert "remat" not in primitives(False) and "checkpoint" not in primitives(False)
