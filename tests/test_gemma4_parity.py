"""Gemma 4 logits equal transformers' (fp32, eager) on tiny random models, left padding included."""

import json
import shutil

import gemma4_helpers as G
import gemma_helpers as H
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oftjax
from oftjax.models import gemma

TOL = 1e-4
NAMES = ["shared", "per_layer", "pattern"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  out = {}
  for name in NAMES:
    folder = tmp_path_factory.mktemp(f"g4-{name}")
    out[name] = (str(folder), G.save_hf_model(name, folder))
  return out


def _batch(seed=0):
  """Two left-padded rows, the longer one well past every sliding window (3 and 4)."""
  return H.padded_batch(np.random.default_rng(seed), [11, 6], 11, left=True)


def _assert_logits_match(model, params, hf, tokens, mask):
  ref = H.hf_logits(hf, tokens, mask)
  ours = np.asarray(H.forward(model, params, jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))
  assert ours.shape == ref.shape
  real = mask.astype(bool)
  err = np.abs(ours[real] - ref[real]).max()
  assert err <= TOL, f"max |ours - transformers| = {err:.2e}"
  assert np.abs(ref[real]).max() > 1.0  # the comparison is not between near-zero logits


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(saved, name):
  folder, hf = saved[name]
  model, params = gemma.load(folder)
  assert isinstance(model, gemma.Gemma4)
  _assert_logits_match(model, params, hf, *_batch())


def test_configs_exercise_the_geometry(saved):
  shared = gemma.load_model(saved["shared"][0]).config
  assert (shared.sliding.head_dim, shared.sliding.num_kv_heads, shared.sliding.k_eq_v) == (
    8,
    2,
    False,
  )
  assert (shared.full.head_dim, shared.full.num_kv_heads, shared.full.k_eq_v) == (16, 1, True)
  assert (shared.full.rope.kind, shared.full.rope.partial_rotary_factor) == ("proportional", 0.5)
  assert shared.num_kv_shared_layers == 3 and shared.use_double_wide_mlp
  assert shared.per_layer_input_size == 8 and shared.final_logit_softcapping == 6.0
  per_layer = gemma.load_model(saved["per_layer"][0]).config
  assert (per_layer.full.head_dim, per_layer.full.num_kv_heads) == (12, 4)
  assert (per_layer.sliding.rope.kind, per_layer.sliding.rope.factor) == ("linear", 4.0)
  assert not per_layer.tie_word_embeddings and per_layer.per_layer_input_size == 0


def test_top_level_schema_on_disk_equals_per_layer_config(saved, tmp_path):
  """`global_head_dim` / `num_global_key_value_heads` in config.json (transformers writes
  `per_layer_config` instead) give the same model."""
  folder, hf = saved["shared"]
  shutil.copytree(folder, tmp_path / "top", dirs_exist_ok=True)
  path = tmp_path / "top" / "config.json"
  raw = json.loads(path.read_text())
  assert raw.pop("per_layer_config")  # what transformers wrote
  raw.update(global_head_dim=16, num_global_key_value_heads=1)
  path.write_text(json.dumps(raw))
  model, params = gemma.load(str(tmp_path / "top"))
  assert model.config == gemma.load_model(folder).config
  _assert_logits_match(model, params, hf, *_batch(1))


def test_multimodal_folder_loads_the_text_decoder(tmp_path):
  hf = G.save_hf_model("shared", tmp_path, seed=3, multimodal=True)
  model, params = gemma.load(str(tmp_path))
  assert model.config.multimodal
  assert set(params) == {
    "embed_tokens",
    "embed_tokens_per_layer",
    "per_layer_model_projection",
    "per_layer_projection_norm",
    "layers",
    "norm",
  }
  _assert_logits_match(model, params, hf, *_batch(2))


def test_moe_logits_match_transformers(tmp_path):
  pytest.importorskip("oftjax.models.gemma.gemma4_moe")
  hf = G.save_hf_model("moe", tmp_path)
  model, params = gemma.load(str(tmp_path))
  assert model.config.enable_moe_block
  layer = params["layers"]["segment_0"]["slot_0"]
  assert {
    "router",
    "experts",
    "pre_feedforward_layernorm_2",
    "post_feedforward_layernorm_1",
  } <= set(layer)
  _assert_logits_match(model, params, hf, *_batch(3))
  dense = model.clone(config=model.config.replace(moe_implementation="dense"))
  _assert_logits_match(dense, params, hf, *_batch(3))


def test_packed_segments_equal_separate_sequences(saved):
  model, params = gemma.load(saved["shared"][0])
  rng = np.random.default_rng(4)
  a, b = rng.integers(3, G.VOCAB, (1, 7)), rng.integers(3, G.VOCAB, (1, 5))
  packed = jnp.asarray(np.concatenate([a, b], axis=1))
  seg = jnp.asarray([[1] * 7 + [2] * 5])
  both = np.asarray(H.forward(model, params, packed, segment_ids=seg))
  alone_a = np.asarray(H.forward(model, params, jnp.asarray(a)))
  alone_b = np.asarray(H.forward(model, params, jnp.asarray(b)))
  np.testing.assert_allclose(both[:, :7], alone_a, atol=2e-5)
  np.testing.assert_allclose(both[:, 7:], alone_b, atol=2e-5)


def test_adapters_reach_every_projection(saved):
  """The interceptor sees HF-named projections in every scanned slot; zero-init is the identity."""
  model, params = gemma.load(saved["pattern"][0])
  targets = r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
  config = oftjax.AdapterConfig(block_size=4, targets=targets)
  wrapped = oftjax.Adapted(model, config)
  tokens = jnp.asarray(_batch()[0])
  geoms = oftjax.adapt(model, config, tokens).geometries
  full = jax.eval_shape(wrapped.init, jax.random.key(0), tokens)["params"]
  # 2 segments x 2 slots; KV-shared slots have no k_proj / v_proj.
  assert sorted(geoms) == sorted(
    f"layers/segment_{s}/slot_{j}/{p}"
    for s in (0, 1)
    for j in (0, 1)
    for p in (
      "self_attn/q_proj",
      "self_attn/o_proj",
      "mlp/gate_proj",
      "mlp/up_proj",
      "mlp/down_proj",
    )
    + (("self_attn/k_proj", "self_attn/v_proj") if s == 0 else ())
  )
  _, adapter = oftjax.split_params(full)
  zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), adapter)
  adapted = jax.jit(wrapped.apply)({"params": oftjax.merge_params(params, zeros)}, tokens)
  np.testing.assert_allclose(
    np.asarray(adapted), np.asarray(H.forward(model, params, tokens)), atol=1e-5
  )
