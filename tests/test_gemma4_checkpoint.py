"""Gemma 4 folders in and out: round trips through transformers, towers untouched, clear errors."""

import json
import os
import shutil

import gemma4_helpers as G
import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from oftjax.models import gemma
from oftjax.models.gemma import gemma4_names, loading, safetensors_file
from oftjax.models.gemma.gemma4_schedule import layer_schedule


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  out = {}
  for name, multimodal in (("shared", False), ("per_layer", False), ("pattern", True)):
    folder = tmp_path_factory.mktemp(f"g4-{name}")
    out[name] = (str(folder), G.save_hf_model(name, folder, multimodal=multimodal))
  return out


def _assert_same_state(ref: torch.nn.Module, back: torch.nn.Module):
  ref_sd, back_sd = ref.state_dict(), back.state_dict()
  assert set(ref_sd) == set(back_sd)
  for key in ref_sd:
    assert torch.equal(ref_sd[key], back_sd[key]), key


def _raw_tensors(folder) -> dict:
  """`{name: (dtype, shape, bytes)}` of every tensor in a folder's safetensors files."""
  out = {}
  for path in loading._weight_files(folder, allow_pickle=False):
    with open(path, "rb") as fh:
      header, start = safetensors_file.read_header(path, fh)
      for name, info in header.items():
        begin, end = info["data_offsets"]
        fh.seek(start + begin)
        out[name] = (info["dtype"], tuple(info["shape"]), fh.read(end - begin))
  return out


def _assert_round_trip(folder, hf, tmp_path):
  model, params = gemma.load(folder)
  out = gemma.save(tmp_path / "out", model, params)
  back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
  assert type(back) is transformers.Gemma4ForCausalLM
  _assert_same_state(hf, back)


@pytest.mark.parametrize("name", ["shared", "per_layer"])
def test_round_trip_through_transformers(folders, name, tmp_path):
  _assert_round_trip(*folders[name], tmp_path)


def test_moe_round_trip_through_transformers(tmp_path):
  pytest.importorskip("oftjax.models.gemma.gemma4_moe")
  hf = G.save_hf_model("moe", tmp_path / "src")
  _assert_round_trip(str(tmp_path / "src"), hf, tmp_path)


def test_multimodal_round_trip_keeps_the_towers_byte_identical(folders, tmp_path):
  folder, hf = folders["pattern"]
  model, params = gemma.load(folder)
  out = gemma.save(tmp_path / "out", model, params)
  back = transformers.Gemma4ForConditionalGeneration.from_pretrained(
    out, attn_implementation="eager"
  )
  _assert_same_state(hf, back)
  with open(os.path.join(out, "config.json")) as fh:
    assert json.load(fh)["architectures"] == ["Gemma4ForConditionalGeneration"]
  source, saved = _raw_tensors(folder), _raw_tensors(out)
  towers = [n for n in source if gemma4_names.is_tower_tensor(n, model.config)]
  assert any(n.startswith("model.vision_tower.") for n in towers)
  assert any(n.startswith("model.audio_tower.") for n in towers)
  for tower in towers:
    assert saved[tower] == source[tower], tower


def test_loading_never_reads_tower_tensors(folders, monkeypatch):
  folder, _ = folders["pattern"]
  names_read = []
  iter_tensors = loading._iter_tensors

  def recording(path):
    for name, shape, read in iter_tensors(path):

      def spy(rows=None, name=name, read=read):
        names_read.append(name)
        return read(rows)

      yield name, shape, spy

  monkeypatch.setattr(loading, "_iter_tensors", recording)
  model, _ = gemma.load(folder)
  assert names_read and all(n.startswith("model.language_model.") for n in names_read)
  assert len(set(names_read)) == len(gemma4_names.tensor_specs(model.config))


def test_parameter_tree_is_stacked_per_segment_and_slot(folders):
  model, params = gemma.load(folders["shared"][0])  # [S, S, F] + 3 KV-shared layers
  schedule = layer_schedule(model.config)
  assert sorted(params["layers"]) == [f"segment_{i}" for i in range(len(schedule))]

  def layer(i):
    """The params of decoder layer `i` (one index of its stacked slot) and the slot's depth."""
    for s, segment in enumerate(schedule):
      for r in range(segment.repeats):
        for j in range(len(segment.kinds)):
          if segment.layer(r, j) == i:
            node = params["layers"][f"segment_{s}"][f"slot_{j}"]
            return jax.tree_util.tree_map(lambda x: x[r], node), segment.repeats
    raise AssertionError(i)

  sliding, repeats = layer(0)
  assert (
    params["layers"]["segment_0"]["slot_0"]["self_attn"]["q_proj"]["kernel"].shape[0] == repeats
  )
  assert sliding["self_attn"]["q_proj"]["kernel"].shape == (32, 4, 8)
  assert sliding["self_attn"]["k_proj"]["kernel"].shape == (32, 2, 8)
  full = layer(2)[0]["self_attn"]
  assert full["q_proj"]["kernel"].shape == (32, 4, 16) and "v_proj" not in full  # k_eq_v
  assert full["k_proj"]["kernel"].shape == (32, 1, 16)
  shared = layer(3)[0]
  assert set(shared["self_attn"]) == {"q_proj", "q_norm", "o_proj"}
  assert shared["mlp"]["up_proj"]["kernel"].shape == (32, 96)  # double-wide
  assert sliding["layer_scalar"].shape == (1,)


def test_unused_kv_tensors_of_shared_layers_are_ignored(folders, tmp_path):
  """Checkpoints may carry k/v projections for KV-shared layers; transformers skips them."""
  folder, _ = folders["shared"]
  shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
  path = tmp_path / "model.safetensors"
  tensors = safetensors.numpy.load_file(path)
  tensors["model.layers.4.self_attn.k_proj.weight"] = np.ones((16, 32), np.float32)
  tensors["model.layers.4.self_attn.k_norm.weight"] = np.ones((8,), np.float32)
  safetensors.numpy.save_file(tensors, path)
  _, params = gemma.load(str(tmp_path))
  _, reference = gemma.load(folder)
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(reference)
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(reference)):
    np.testing.assert_array_equal(a, b)


def _edited(folder, tmp_path, text_changes=None, remove=()):
  """A copy of a text-only folder with config.json fields changed or removed."""
  dst = tmp_path / "edited"
  shutil.copytree(folder, dst, dirs_exist_ok=True)
  raw = json.loads((dst / "config.json").read_text())
  for key in remove:
    raw.pop(key, None)
  raw.update(text_changes or {})
  (dst / "config.json").write_text(json.dumps(raw))
  return str(dst)


@pytest.mark.parametrize(
  "changes, message",
  [
    (
      {
        "rope_parameters": {
          "sliding_attention": {"rope_type": "foo", "rope_theta": 10.0},
          "full_attention": {"rope_type": "default", "rope_theta": 10.0},
        }
      },
      "rope_type 'foo' of sliding_attention layers is not supported",
    ),
    (
      {
        "rope_parameters": {
          "sliding_attention": {"rope_type": "yarn", "rope_theta": 10.0, "factor": 2.0},
          "full_attention": {"rope_type": "default", "rope_theta": 10.0},
        }
      },
      "rope_type 'yarn' of sliding_attention layers is not supported",
    ),
    (
      {"rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10.0}}},
      "rope_parameters has no entry for full_attention layers",
    ),
    (
      {
        "rope_parameters": {
          "sliding_attention": {
            "rope_type": "default",
            "rope_theta": 10.0,
            "partial_rotary_factor": 0.5,
          },
          "full_attention": {"rope_type": "default", "rope_theta": 10.0},
        }
      },
      "partial_rotary_factor=0.5 with rope_type 'default'",
    ),
    ({"model_type": "gemma3n_text"}, "Gemma 3n"),
    ({"attention_bias": True}, "attention_bias=True is not implemented"),
    (
      {"use_bidirectional_attention": "all"},
      "use_bidirectional_attention='all' is not implemented",
    ),
    (
      {"per_layer_config": {"1": {"intermediate_size": 64}}},
      "per_layer_config overrides ['intermediate_size']",
    ),
    ({"num_kv_shared_layers": 6}, "num_kv_shared_layers=6 must be in [0, 6)"),
    ({"hidden_activation": "silu"}, "hidden_activation 'silu' is not supported"),
  ],
)
def test_bad_configs_fail_in_one_line(folders, tmp_path, changes, message):
  folder = _edited(folders["shared"][0], tmp_path, changes)
  with pytest.raises(ValueError) as err:
    gemma.load(folder)
  text = str(err.value)
  assert message in text and "\n" not in text, text


def test_multimodal_gemma3n_is_refused(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3n"}))
  with pytest.raises(ValueError, match="Gemma 3n"):
    gemma.load_model(str(tmp_path))


def test_multimodal_save_needs_its_source_folder(folders, tmp_path):
  folder, _ = folders["pattern"]
  model, params = gemma.load(folder)
  orphan = model.clone(config=model.config.replace(source_dir=None))
  with pytest.raises(ValueError, match="needs its source folder"):
    gemma.save(tmp_path / "out", orphan, params)
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["shared", "pattern"])
def test_module_names_map_back_to_checkpoint_names(folders, name):
  """`hf_module_name` (for adapter export) names every kernel as its checkpoint tensor."""
  model = gemma.load_model(folders[name][0])
  specs = [s for s in gemma4_names.tensor_specs(model.config) if s.path[-1] == "kernel"]
  assert specs
  for spec in specs:
    module = gemma4_names.hf_module_name(model.config, "/".join(spec.path[:-1]), spec.layer)
    assert module + ".weight" == gemma4_names.file_name(spec.hf_name, model.config)
  if model.config.multimodal:
    assert gemma4_names.hf_module_name(model.config, "layers/segment_1/slot_1/mlp/up_proj", 1) == (
      "model.language_model.layers.7.mlp.up_proj"
    )
  with pytest.raises(ValueError, match="no layer at index"):
    gemma4_names.hf_module_name(model.config, "layers/segment_0/slot_0/self_attn/q_proj", 99)
