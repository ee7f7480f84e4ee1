"""PEFT adapters on Gemma 4 bases: PEFT's own files import exactly, oftjax's exports load in PEFT.

Oracles: PEFT (`get_peft_model` with nonzero random adapter weights, `save_pretrained`,
`PeftModel.from_pretrained`) on transformers' Gemma 4, text-only (`Gemma4ForCausalLM`)
and multimodal (`Gemma4ForConditionalGeneration` with vision and audio towers) on the
"shared" config (KV-shared layers without `k_proj`/`v_proj`, full layers without
`v_proj`, per-layer embeddings), and a multimodal "pattern" model whose stacked axes
each hold every other layer, one forward each.
"""

import dataclasses
import os
import re

import gemma4_helpers as G
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import oftjax
from oftjax import peft_io
from oftjax.models import gemma

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
import peft_helpers as PH  # noqa: E402  (needs torch and peft)

TOKENS = np.random.default_rng(0).integers(3, G.VOCAB, (2, 9))
TOL = 1e-4
_PROJECTIONS = r"self_attn\.(?:q|k|v|o)_proj|mlp\.(?:gate|up|down)_proj"
# Every linear layer of the text decoder, per-layer-embedding ones included ("shared" has a
# PLE width of 8, which block size 8 divides); the multimodal regex names the decoder.
TEXT_TARGETS = (
  rf"model\.layers\.\d+\.(?:{_PROJECTIONS}|per_layer_input_gate|per_layer_projection)"
  r"|model\.per_layer_model_projection"
)
MULTIMODAL_TARGETS = rf"model\.language_model\.layers\.\d+\.(?:{_PROJECTIONS})"
TOWERS = ("vision_tower", "audio_tower", "embed_vision", "embed_audio")


@dataclasses.dataclass
class Base:
  name: str
  multimodal: bool
  folder: str
  changes: dict
  model: object
  params: dict
  naming: peft_io.ModuleNaming
  targets: str

  def torch_model(self):
    return G.make_hf_model(self.name, multimodal=self.multimodal, **self.changes)

  def ours(self, adapter=None, config=None):
    return PH.oftjax_logits(self.model, self.params, TOKENS, adapter, config)


def _naming(folder):
  return peft_io.ModuleNaming.from_layout(gemma.module_layout(gemma.read_hf_config(folder)))


def _base(tmp_path_factory, name, multimodal, targets, **changes):
  folder = str(tmp_path_factory.mktemp(f"g4-{name}-{'mm' if multimodal else 'text'}"))
  G.save_hf_model(name, folder, multimodal=multimodal, **changes)
  model, params = gemma.load(folder)
  return Base(name, multimodal, folder, changes, model, params, _naming(folder), targets)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
  return {
    "text": _base(tmp_path_factory, "shared", False, TEXT_TARGETS),
    "multimodal": _base(tmp_path_factory, "shared", True, MULTIMODAL_TARGETS),
  }


@pytest.fixture(scope="module")
def pattern(tmp_path_factory):
  """Multimodal "pattern": [sliding, full] x 2, then the group x 2 KV-shared, so each stacked
  axis holds every other layer."""
  return _base(tmp_path_factory, "pattern", True, MULTIMODAL_TARGETS)


# name -> (PEFT config from target_modules, std of the random adapter weights). The Neumann
# series is only near-orthogonal for small Q: larger weights make it grow activations layer
# after layer, which turns fp32 rounding into more than TOL on logits of ~20.
VARIANTS = {
  "oft_neumann_default": (PH.make_oft(), 0.05),
  "oft_exact_cayley": (PH.make_oft(use_cayley_neumann=False), 0.2),
  "lora": (PH.make_lora(), 0.3),
}


def test_naming_maps_each_stacked_index_to_its_layer(bases, pattern):
  text, mm = bases["text"].naming, pattern.naming
  assert text.decoder_prefix == "model." and mm.decoder_prefix == "model.language_model."
  # "pattern": [sliding, full] x 2, then the group x 2 KV-shared: every other layer per slot.
  assert dict(mm.stacks) == {
    "layers/segment_0/slot_0": (0, 2),
    "layers/segment_0/slot_1": (1, 3),
    "layers/segment_1/slot_0": (4, 6),
    "layers/segment_1/slot_1": (5, 7),
  }
  assert mm.module_name("layers/segment_1/slot_1/mlp/up_proj", 1) == (
    "model.language_model.layers.7.mlp.up_proj"
  )
  assert mm.path_of("model.language_model.layers.6.self_attn.q_proj") == (
    "layers/segment_1/slot_0/self_attn/q_proj",
    1,
  )
  assert text.path_of("model.per_layer_model_projection") == ("per_layer_model_projection", None)
  assert (text.num_layers, mm.num_layers) == (6, 8)
  for naming, params in ((text, bases["text"].params), (mm, pattern.params)):
    for stack, numbers in naming.stacks:
      node = params
      for key in stack.split("/"):
        node = node[key]
      assert node["layer_scalar"].shape[0] == len(numbers)  # the stacked axis has those layers
  # KV-shared layers (3, 4, 5 of "shared") have no k_proj; full layers (2, 5) no v_proj.
  with pytest.raises(ValueError) as e:
    text.path_of("model.layers.4.self_attn.k_proj")
  assert "\n" not in str(e.value) and "is not a linear layer of this model" in str(e.value)
  with pytest.raises(ValueError, match="not a linear layer"):
    text.path_of("model.layers.2.self_attn.v_proj")
  with pytest.raises(ValueError, match="is in layer 6 but the model has 6 layers"):
    text.path_of("model.layers.6.self_attn.q_proj")
  with pytest.raises(ValueError, match="not a linear layer"):
    text.path_of("model.layers.0.experts")


def test_target_pattern_matches_exactly_the_adapted_modules(pattern):
  base = pattern
  paths = [p for p in base.naming.linear_layers if p.endswith(("k_proj", "q_proj"))]
  pattern = base.naming.target_pattern(paths)
  expected = {
    base.naming.module_name(p, i) for p in paths for i in range(base.naming.stack_size(p))
  }
  matched = {n for n, _ in base.torch_model().named_modules() if re.fullmatch(pattern, n)}
  assert matched == expected and len(expected) == 12  # q_proj of 8 layers, k_proj of 4


ROUND_TRIPS = (
  [("text", v) for v in sorted(VARIANTS)]
  + [("multimodal", "oft_neumann_default")]
  + [pytest.param("multimodal", v, marks=pytest.mark.slow) for v in ("lora", "oft_exact_cayley")]
)


@pytest.mark.parametrize("kind, variant", ROUND_TRIPS)
def test_peft_adapter_round_trips_exactly(bases, kind, variant, tmp_path):
  make_config, std = VARIANTS[variant]
  PH.assert_round_trip(bases[kind], make_config, std, tmp_path, TOKENS, TOWERS, TOL, 1e-1)


def test_non_contiguous_stacks_round_trip(pattern, tmp_path):
  """Each stacked index gets its own layer's adapter, in both directions.

  "pattern" has no logit soft-cap: its logits of ~20 differ by ~1e-4 between any two fp32
  implementations with no adapter at all (each side measured against transformers in
  float64), hence 1e-3 here; giving a layer its neighbour's adapter moves them by > 0.1.
  """
  theirs_model = PH.peft_adapter(
    pattern, PH.make_oft(use_cayley_neumann=False), 0.2, tmp_path / "peft"
  )
  theirs = PH.logits(theirs_model, TOKENS)
  adapter, config = peft_io.import_peft(str(tmp_path / "peft"), naming=pattern.naming)
  np.testing.assert_allclose(pattern.ours(adapter, config), theirs, atol=1e-3)
  swapped = jax.tree_util.tree_map(lambda x: x, adapter)
  q = swapped["layers"]["segment_0"]["slot_0"]["self_attn"]["q_proj"]["oft"]
  q["weight"] = q["weight"][::-1]  # layer 0 gets layer 2's adapter and vice versa
  assert np.abs(pattern.ours(swapped, config) - theirs).max() > 0.1
  peft_io.export_peft(str(tmp_path / "ours"), adapter, config, naming=pattern.naming)
  back = PH.load_peft(pattern.torch_model(), str(tmp_path / "ours"))
  assert sorted(PH.tuner_modules(back)) == sorted(PH.tuner_modules(theirs_model))
  np.testing.assert_allclose(PH.logits(back, TOKENS), theirs, atol=TOL)


def test_layers_to_transform_covers_some_stacked_indices(bases, tmp_path):
  """Layers 1 and 3 of "shared": index 1 of segment_0/slot_0 and all of segment_1/slot_1."""
  base = bases["text"]
  narrow = lambda targets: dataclasses.replace(
    PH.make_oft(use_cayley_neumann=False)(["q_proj", "down_proj"]), layers_to_transform=[1, 3]
  )
  theirs_model = PH.peft_adapter(base, narrow, 0.2, tmp_path / "peft")
  assert len(PH.tuner_modules(theirs_model)) == 2 * 2
  theirs = PH.logits(theirs_model, TOKENS)
  adapter, config = peft_io.import_peft(str(tmp_path / "peft"), naming=base.naming)
  weight = adapter["layers"]["segment_0"]["slot_0"]["self_attn"]["q_proj"]["oft"]["weight"]
  assert not np.any(weight[0]) and np.any(weight[1])  # layer 0 keeps its identity adapter
  assert set(adapter["layers"]["segment_1"]) == {"slot_1"}
  np.testing.assert_allclose(base.ours(adapter, config), theirs, atol=TOL)
  peft_io.export_peft(str(tmp_path / "ours"), adapter, config, naming=base.naming)
  back = PH.load_peft(base.torch_model(), str(tmp_path / "ours"))
  np.testing.assert_allclose(PH.logits(back, TOKENS), theirs, atol=TOL)


def _add_tensor(folder, key, like):
  path = os.path.join(folder, "adapter_model.safetensors")
  tensors = safetensors.numpy.load_file(path)
  tensors[key] = np.ones_like(tensors[like])
  safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize(
  "module, needle",
  [
    ("model.layers.4.self_attn.k_proj", "is not a linear layer of this model"),  # KV-shared
    ("model.layers.5.self_attn.v_proj", "is not a linear layer of this model"),  # k_eq_v
    ("model.layers.7.self_attn.q_proj", "is in layer 7 but the model has 6 layers"),
  ],
)
def test_adapter_for_modules_the_model_lacks_is_refused(bases, tmp_path, module, needle):
  base = bases["text"]
  PH.peft_adapter(base, PH.make_oft(), 0.05, tmp_path)
  like = "base_model.model.model.layers.0.self_attn.k_proj.oft_R.weight"
  _add_tensor(str(tmp_path), f"base_model.model.{module}.oft_R.weight", like)
  with pytest.raises(ValueError) as e:
    peft_io.import_peft(str(tmp_path), naming=base.naming)
  assert "\n" not in str(e.value) and needle in str(e.value) and module in str(e.value)


def test_export_of_a_layer_the_model_lacks_is_refused(bases, tmp_path):
  """An adapter tree for another variant (a v_proj on a k_eq_v full layer) never exports."""
  base = bases["text"]
  adapter = {
    "layers": {
      "segment_1": {
        "slot_0": {"self_attn": {"v_proj": {"oft": {"weight": np.zeros((1, 4, 28), np.float32)}}}}
      }
    }
  }
  config = oftjax.AdapterConfig(block_size=8, targets=".*v_proj")
  with pytest.raises(ValueError) as e:
    peft_io.export_peft(str(tmp_path / "out"), adapter, config, naming=base.naming)
  assert "\n" not in str(e.value) and "model.layers.2.self_attn.v_proj" in str(e.value)
  assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def moe_base(tmp_path_factory):
  pytest.importorskip("oftjax.models.gemma.gemma4_moe")
  return _base(
    tmp_path_factory, "moe", False, rf"model\.layers\.\d+\.(?:{_PROJECTIONS}|router\.proj)"
  )


def test_router_projection_adapter_round_trips(moe_base, tmp_path):
  """The MoE router's `proj` is an nn.Linear PEFT wraps: oftjax adapts and exports it too."""
  theirs_model = PH.peft_adapter(
    moe_base, PH.make_oft(use_cayley_neumann=False), 0.2, tmp_path / "peft"
  )
  assert [m for m in PH.tuner_modules(theirs_model) if m.endswith("router.proj")]
  theirs = PH.logits(theirs_model, TOKENS)
  adapter, config = peft_io.import_peft(str(tmp_path / "peft"), naming=moe_base.naming)
  assert "proj" in adapter["layers"]["segment_0"]["slot_0"]["router"]
  np.testing.assert_allclose(moe_base.ours(adapter, config), theirs, atol=TOL)
  peft_io.export_peft(str(tmp_path / "ours"), adapter, config, naming=moe_base.naming)
  back = PH.load_peft(moe_base.torch_model(), str(tmp_path / "ours"))
  np.testing.assert_allclose(PH.logits(back, TOKENS), theirs, atol=TOL)


@pytest.mark.parametrize(
  "targets", [r".*experts", r".*experts/gate_up_proj", r".*(experts|q_proj)"]
)
def test_targeting_moe_experts_is_refused_in_one_line(moe_base, targets):
  """Expert kernels are packed 3-D parameters, not linear layers: no silent no-op adapter."""
  config = oftjax.AdapterConfig(block_size=8, targets=targets)
  with pytest.raises(ValueError) as e:
    oftjax.adapt(moe_base.model, config, jnp.zeros((1, 4), jnp.int32))
  msg = str(e.value)
  assert "\n" not in msg and "layers/segment_0/slot_0/experts" in msg and "packed" in msg, msg
