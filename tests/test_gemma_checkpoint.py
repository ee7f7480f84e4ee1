"""Hugging Face checkpoints in and out: round trips, sharding, dtypes and clear errors."""

import json
import os

import gemma_helpers as H
import jax
import jax.numpy as jnp
import multimodal_helpers as M
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from oftjax.models import gemma
from oftjax.models.gemma import hf_names

NAMES = ["gemma1_mqa", "gemma2", "gemma3"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  out = {}
  for name in NAMES:
    folder = tmp_path_factory.mktemp(name)
    out[name] = (str(folder), H.save_hf_model(name, folder))
  return out


def _copy_with(src, dst, tensors=None, config=None):
  """A copy of an HF folder with edited tensors and/or config."""
  os.makedirs(dst, exist_ok=True)
  if tensors is None:
    tensors = safetensors.numpy.load_file(os.path.join(src, "model.safetensors"))
  safetensors.numpy.save_file(tensors, os.path.join(dst, "model.safetensors"))
  with open(os.path.join(src, "config.json")) as fh:
    cfg = json.load(fh)
  cfg.update(config or {})
  with open(os.path.join(dst, "config.json"), "w") as fh:
    json.dump(cfg, fh)
  return str(dst)


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_through_transformers(saved, name, tmp_path):
  folder, hf = saved[name]
  (tmp_path / "src").mkdir()
  src = _copy_with(folder, tmp_path / "src")
  (tmp_path / "src" / "tokenizer_config.json").write_text("{}")
  model, params = gemma.load(src)
  out = gemma.save(tmp_path / "out", model, params)
  assert (tmp_path / "out" / "tokenizer_config.json").exists()
  back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
  assert type(back) is type(hf)
  H.assert_same_state(hf, back)
  tokens = np.random.default_rng(0).integers(3, H.VOCAB, (2, 11))
  np.testing.assert_array_equal(H.hf_logits(back, tokens), H.hf_logits(hf, tokens))


def test_sharded_save_and_load(saved, tmp_path):
  folder, hf = saved["gemma2"]
  model, params = gemma.load(folder)
  out = gemma.save(tmp_path / "sharded", model, params, max_shard_bytes=40_000)
  files = sorted(os.listdir(out))
  assert "model.safetensors.index.json" in files and "model.safetensors" not in files
  assert sum(f.endswith(".safetensors") for f in files) > 2
  model2, params2 = gemma.load(out)
  chex_equal = jax.tree_util.tree_map(lambda a, b: bool(jnp.array_equal(a, b)), params, params2)
  assert all(jax.tree_util.tree_leaves(chex_equal))
  back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
  tokens = np.random.default_rng(1).integers(3, H.VOCAB, (1, 9))
  np.testing.assert_array_equal(H.hf_logits(back, tokens), H.hf_logits(hf, tokens))


@pytest.mark.parametrize(
  "tie, max_shard_bytes", [(True, 2 * 1024**3), (False, 40_000)], ids=["tied", "untied-sharded"]
)
def test_multimodal_round_trip_keeps_the_tower_byte_identical(tmp_path, tie, max_shard_bytes):
  """A `Gemma3ForConditionalGeneration` folder saves as one: same config, tower bytes kept."""
  text_cfg = H.hf_config("gemma3")
  text_cfg.final_logit_softcapping = None  # the multimodal model applies none
  src = str(tmp_path / "src")
  hf = M.save_multimodal_model(text_cfg, src, tie_word_embeddings=tie)
  model, params = gemma.load(src)
  assert model.config.multimodal and model.config.tie_word_embeddings == tie
  out = gemma.save(tmp_path / "out", model, params, max_shard_bytes=max_shard_bytes)
  weight_files = [f for f in os.listdir(out) if f.endswith(".safetensors")]
  assert "model.safetensors.index.json" in os.listdir(out)  # the tower has a file of its own
  assert len(weight_files) == 2 if tie else len(weight_files) > 2
  back, info = transformers.Gemma3ForConditionalGeneration.from_pretrained(
    out, attn_implementation="eager", output_loading_info=True
  )
  assert not any(info.values()), info  # no missing, unexpected or mismatched keys
  H.assert_same_state(hf, back.eval())
  with open(os.path.join(src, "config.json")) as fh, open(os.path.join(out, "config.json")) as gh:
    source_config, saved_config = json.load(fh), json.load(gh)
  assert saved_config["model_type"] == "gemma3"
  assert saved_config == source_config
  source, saved = H.raw_tensors(src), H.raw_tensors(out)
  towers = [n for n in source if hf_names.is_tower_tensor(n, model.config)]
  assert any(n.startswith("vision_tower.") for n in towers)  # transformers' own file names
  assert any(n.startswith("multi_modal_projector.") for n in towers)
  for tower in towers:
    assert saved[tower] == source[tower], tower
  assert set(saved) == set(source)  # the text decoder too is named as transformers names it
  tokens = np.random.default_rng(4).integers(3, H.VOCAB, (2, 9))
  np.testing.assert_array_equal(H.hf_logits(back, tokens), H.hf_logits(hf, tokens))


def test_multimodal_save_needs_its_source_folder(tmp_path):
  text_cfg = H.hf_config("gemma3")
  text_cfg.final_logit_softcapping = None
  M.save_multimodal_model(text_cfg, tmp_path / "src")
  model, params = gemma.load(str(tmp_path / "src"))
  orphan = model.clone(config=model.config.replace(source_dir=None))
  with pytest.raises(ValueError, match="needs its source folder"):
    gemma.save(tmp_path / "out", orphan, params)
  assert not (tmp_path / "out").exists()


def test_bfloat16_load_and_save(saved, tmp_path):
  folder, hf = saved["gemma3"]
  model, params = gemma.load(folder, dtype=jnp.bfloat16)
  assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.bfloat16)}
  tokens = np.random.default_rng(2).integers(3, H.VOCAB, (1, 9))
  ours = np.asarray(model.apply({"params": params}, jnp.asarray(tokens)))
  assert ours.dtype == np.float32
  assert np.abs(ours - H.hf_logits(hf, tokens)).max() < 0.5
  out = gemma.save(tmp_path / "bf16", model, params)
  assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
  back = transformers.AutoModelForCausalLM.from_pretrained(out)
  assert back.model.embed_tokens.weight.dtype == torch.bfloat16


def test_fresh_model_from_hf_config(tmp_path):
  model = gemma.from_hf_config(H.hf_config("gemma3"))
  params = gemma.init_params(model, jax.random.key(0))
  out = gemma.save(tmp_path / "fresh", model, params)
  back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
  tokens = np.random.default_rng(3).integers(3, H.VOCAB, (1, 9))
  ours = np.asarray(model.apply({"params": params}, jnp.asarray(tokens)))
  np.testing.assert_array_less(np.abs(ours - H.hf_logits(back, tokens)).max(), 1e-4)


def test_save_is_atomic_and_refuses_to_clobber(saved, tmp_path, monkeypatch):
  model, params = gemma.load(saved["gemma1_mqa"][0])
  target = tmp_path / "out"
  gemma.save(target, model, params)
  with pytest.raises(FileExistsError, match="already exists"):
    gemma.save(target, model, params)
  gemma.save(target, model, params, overwrite=True)

  def boom(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr("oftjax.models.gemma.safetensors_file.write", boom)
  with pytest.raises(OSError, match="disk full"):
    gemma.save(tmp_path / "crash", model, params)
  assert sorted(os.listdir(tmp_path)) == ["out"]  # nothing half-written, no temp folder


def test_save_refuses_unmerged_adapter_leaves(saved, tmp_path):
  model, params = gemma.load(saved["gemma1_mqa"][0])
  params["layers"]["self_attn"]["q_proj"]["oft"] = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="layers/self_attn/q_proj/oft"):
    gemma.save(tmp_path / "x", model, params)


# --- bad input: one clear line naming the file or key -------------------------------------


def _one_line(excinfo):
  msg = str(excinfo.value)
  assert "\n" not in msg
  return msg


def test_missing_folder_and_config(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    gemma.load(str(tmp_path / "nope"))
  assert "nope" in _one_line(e)
  with pytest.raises(FileNotFoundError) as e:
    gemma.load(str(tmp_path))
  assert "config.json" in _one_line(e)


@pytest.mark.parametrize("model_type", ["llama", "gemma3n", "made_up"])
def test_unknown_model_type(saved, tmp_path, model_type):
  folder = _copy_with(saved["gemma2"][0], tmp_path, config={"model_type": model_type})
  with pytest.raises(ValueError) as e:
    gemma.load(folder)
  assert model_type in _one_line(e) and "config.json" in _one_line(e)


def test_mismatched_shape(saved, tmp_path):
  folder = saved["gemma2"][0]
  tensors = safetensors.numpy.load_file(os.path.join(folder, "model.safetensors"))
  tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((95, 48), np.float32)
  with pytest.raises(ValueError) as e:
    gemma.load(_copy_with(folder, tmp_path, tensors))
  msg = _one_line(e)
  assert (
    "model.layers.1.mlp.up_proj.weight" in msg and "model.safetensors" in msg and "[95, 48]" in msg
  )


def test_missing_and_unexpected_tensor(saved, tmp_path):
  folder = saved["gemma2"][0]
  tensors = safetensors.numpy.load_file(os.path.join(folder, "model.safetensors"))
  del tensors["model.layers.2.self_attn.k_proj.weight"]
  with pytest.raises(ValueError) as e:
    gemma.load(_copy_with(folder, tmp_path / "a", tensors))
  assert "model.layers.2.self_attn.k_proj.weight" in _one_line(e)
  tensors = safetensors.numpy.load_file(os.path.join(folder, "model.safetensors"))
  tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
  with pytest.raises(ValueError) as e:
    gemma.load(_copy_with(folder, tmp_path / "b", tensors))
  assert "model.layers.0.self_attn.q_proj.bias" in _one_line(e)


def test_pickle_only_folder(saved, tmp_path):
  folder, hf = saved["gemma1_mqa"]
  _copy_with(folder, tmp_path)
  os.remove(tmp_path / "model.safetensors")
  torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
  with pytest.raises(ValueError) as e:
    gemma.load(str(tmp_path))
  assert "pytorch_model.bin" in _one_line(e) and "allow_pickle" in _one_line(e)
  model, params = gemma.load(str(tmp_path), allow_pickle=True)
  tokens = np.random.default_rng(4).integers(3, H.VOCAB, (1, 7))
  ours = np.asarray(model.apply({"params": params}, jnp.asarray(tokens)))
  np.testing.assert_array_less(np.abs(ours - H.hf_logits(hf, tokens)).max(), 1e-4)


def test_hub_id_offline_fails_in_one_line(monkeypatch):
  import huggingface_hub

  def offline(*args, **kwargs):
    raise huggingface_hub.errors.LocalEntryNotFoundError(
      "Cannot find the requested files in the cache.\nmore"
    )

  monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
  with pytest.raises(FileNotFoundError) as e:
    gemma.load("google/gemma-3-270m")
  assert "google/gemma-3-270m" in _one_line(e)


def test_on_host_load_equals_device_load(tmp_path):
  """`on_host=True` gives NumPy arrays (for sharded placement) equal to the default load."""
  name = next(iter(H.CONFIGS))
  H.save_hf_model(name, tmp_path)
  _, on_device = gemma.load(tmp_path)
  _, on_host = gemma.load(tmp_path, on_host=True)
  assert all(isinstance(x, np.ndarray) for x in jax.tree_util.tree_leaves(on_host))
  jax.tree_util.tree_map(
    lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), on_device, on_host
  )
