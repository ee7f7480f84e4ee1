"""Logit parity of oftjax's Gemma 1/2/3 with transformers (fp32, eager attention)."""

import json
import os

import gemma_helpers as H
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from oftjax.models import gemma

TOL = 1e-4


SHAPE = (3, 13)  # one input shape per model, so each model compiles once


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """name -> (folder, torch model), each built once."""
  out = {}
  for name in H.CONFIGS:
    folder = tmp_path_factory.mktemp(name)
    out[name] = (str(folder), H.save_hf_model(name, folder))
  return out


_LOADED = {}


def _ours(folder, tokens, **kw):
  if folder not in _LOADED:
    _LOADED[folder] = gemma.load(folder)
  model, params = _LOADED[folder]
  kw.setdefault("attention_mask", np.ones(np.shape(tokens), np.int32))  # same compiled signature
  kw = {k: jnp.asarray(v) for k, v in kw.items()}
  return np.asarray(H.forward(model, params, jnp.asarray(tokens), **kw))


@pytest.mark.parametrize("name", list(H.CONFIGS))
def test_logits_match_transformers(saved, name):
  folder, hf = saved[name]
  tokens = np.random.default_rng(1).integers(0, H.VOCAB, SHAPE)  # longer than every window
  ref = H.hf_logits(hf, tokens)
  ours = _ours(folder, tokens)
  assert ours.dtype == np.float32 and ours.shape == SHAPE + (H.VOCAB,)
  assert np.abs(ref).max() > 5.0  # logits are not trivially small
  np.testing.assert_array_less(np.abs(ours - ref).max(), TOL)


@pytest.mark.parametrize("name", list(H.CONFIGS))
@pytest.mark.parametrize("left", [True, False])
def test_padded_batch_matches_transformers(saved, name, left):
  folder, hf = saved[name]
  tokens, mask = H.padded_batch(np.random.default_rng(2), [13, 4, 7], 13, left=left)
  ref = H.hf_logits(hf, tokens, mask)
  ours = _ours(folder, tokens, attention_mask=mask)
  real = mask.astype(bool)
  np.testing.assert_array_less(np.abs(ours - ref)[real].max(), TOL)


def test_packed_segments_match_separate_sequences(saved):
  folder, hf = saved["gemma3"]
  rng = np.random.default_rng(3)
  a, b = rng.integers(3, H.VOCAB, 6), rng.integers(3, H.VOCAB, 5)
  tokens = np.stack([np.concatenate([a, b, [0, 0]])] * 3)
  segments = np.array([[1] * 6 + [2] * 5 + [0, 0]] * 3)
  ours = _ours(folder, tokens, segment_ids=segments)
  np.testing.assert_array_less(np.abs(ours[0, :6] - H.hf_logits(hf, a[None])[0]).max(), TOL)
  np.testing.assert_array_less(np.abs(ours[0, 6:11] - H.hf_logits(hf, b[None])[0]).max(), TOL)


def test_explicit_positions_match_transformers(saved):
  import torch

  folder, hf = saved["gemma2"]
  tokens = np.random.default_rng(4).integers(3, H.VOCAB, SHAPE)
  positions = np.cumsum(np.random.default_rng(5).integers(1, 4, SHAPE), axis=1)
  with torch.no_grad():
    ref = hf(torch.as_tensor(tokens), position_ids=torch.as_tensor(positions)).logits.numpy()
  ours = _ours(folder, tokens, positions=positions)
  np.testing.assert_array_less(np.abs(ours - ref).max(), TOL)
  assert np.abs(ours - _ours(folder, tokens)).max() > 1e-3


def test_legacy_gemma3_config_keys(saved, tmp_path):
  """Hub Gemma 3 configs use rope_theta / rope_local_base_freq / rope_scaling / sliding_window_pattern."""
  folder, hf = saved["gemma3"]
  with open(os.path.join(folder, "config.json")) as fh:
    cfg = json.load(fh)
  cfg.pop("rope_parameters")
  cfg.update(
    rope_theta=1000.0,
    rope_local_base_freq=100.0,
    rope_scaling={"rope_type": "linear", "factor": 8.0},
  )
  os.symlink(os.path.join(folder, "model.safetensors"), tmp_path / "model.safetensors")
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  tokens = np.random.default_rng(5).integers(3, H.VOCAB, SHAPE)
  np.testing.assert_array_less(
    np.abs(_ours(str(tmp_path), tokens) - H.hf_logits(hf, tokens)).max(), TOL
  )


def test_multimodal_gemma3_checkpoint_loads_text_decoder(saved, tmp_path):
  import transformers

  folder, hf = saved["gemma3"]
  tensors = safetensors.numpy.load_file(os.path.join(folder, "model.safetensors"))
  renamed = {k.replace("model.", "model.language_model.", 1): v for k, v in tensors.items()}
  renamed["model.vision_tower.vision_model.post_layernorm.weight"] = np.ones(8, np.float32)
  renamed["model.multi_modal_projector.mm_input_projection_weight"] = np.ones((8, 48), np.float32)
  safetensors.numpy.save_file(renamed, str(tmp_path / "model.safetensors"))
  mm = transformers.Gemma3Config(text_config=hf.config.to_dict(), vision_config={"hidden_size": 8})
  mm.save_pretrained(tmp_path)
  tokens = np.random.default_rng(6).integers(3, H.VOCAB, SHAPE)
  model, params = gemma.load(str(tmp_path))
  assert model.config.hf_config.model_type == "gemma3_text"
  ours = np.asarray(H.forward(model, params, jnp.asarray(tokens)))
  np.testing.assert_array_less(np.abs(ours - H.hf_logits(hf, tokens)).max(), TOL)


def test_param_tree_layout(saved):
  model, params = gemma.load(saved["gemma3"][0])
  attn, mlp = params["layers"]["self_attn"], params["layers"]["mlp"]
  assert attn["q_proj"]["kernel"].shape == (4, 48, 4, 16)
  assert attn["k_proj"]["kernel"].shape == (4, 48, 2, 16)
  assert attn["o_proj"]["kernel"].shape == (4, 4, 16, 48)
  assert attn["q_norm"]["scale"].shape == (4, 16)
  assert mlp["down_proj"]["kernel"].shape == (4, 96, 48)
  assert set(params) == {"embed_tokens", "layers", "norm"}
