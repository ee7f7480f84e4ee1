"""Adapters written by PEFT itself import into oftjax exactly, and oftjax's exports load in PEFT.

Oracles: PEFT (`get_peft_model` with nonzero random adapter weights, `save_pretrained`,
`PeftModel.from_pretrained`) on transformers' Gemma 3, text-only (`Gemma3ForCausalLM`,
untied `lm_head`) and multimodal (`Gemma3ForConditionalGeneration` with a tiny SigLIP
tower), one forward each.
"""

import dataclasses
import json
import os
import re

import gemma_helpers as H
import multimodal_helpers as M
import numpy as np
import pytest

from oftjax import peft_io
from oftjax.models import gemma

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
import peft_helpers as PH  # noqa: E402  (needs torch and peft)

TOKENS = np.random.default_rng(0).integers(3, H.VOCAB, (2, 9))
TOL = 1e-4
TOWERS = ("vision_tower", "multi_modal_projector")
TEXT_TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj", "lm_head"]
MULTIMODAL_TARGETS = (
  r"(?:model\.language_model\.layers\.\d+\.(?:self_attn\.(?:q_proj|v_proj|o_proj)"
  r"|mlp\.down_proj)|lm_head)"
)


@dataclasses.dataclass
class Base:
  folder: str
  torch_class: type
  model: object
  params: dict
  naming: peft_io.ModuleNaming
  targets: object

  def torch_model(self):
    return self.torch_class.from_pretrained(self.folder, attn_implementation="eager").eval()

  def ours(self, adapter, config):
    return PH.oftjax_logits(self.model, self.params, TOKENS, adapter, config)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
  out = {}
  text = tmp_path_factory.mktemp("text")
  text_cfg = H.hf_config("gemma3")
  text_cfg.tie_word_embeddings = False  # an untied lm_head, adapted in every variant
  torch.manual_seed(0)
  hf = transformers.Gemma3ForCausalLM(text_cfg).eval()
  H.randomize_(hf, 0)
  hf.save_pretrained(text)
  mm = tmp_path_factory.mktemp("multimodal")
  text_cfg = H.hf_config("gemma3")
  text_cfg.final_logit_softcapping = None
  M.save_multimodal_model(text_cfg, mm, tie_word_embeddings=False)
  for kind, folder, cls, targets in (
    ("text", text, transformers.Gemma3ForCausalLM, TEXT_TARGETS),
    ("multimodal", mm, transformers.Gemma3ForConditionalGeneration, MULTIMODAL_TARGETS),
  ):
    model, params = gemma.load(str(folder))
    naming = peft_io.ModuleNaming.from_layout(
      gemma.module_layout(gemma.read_hf_config(str(folder)))
    )
    out[kind] = Base(str(folder), cls, model, params, naming, targets)
  return out


def test_bases_agree_and_naming_follows_the_folder(bases):
  assert bases["text"].naming.decoder_prefix == "model."
  assert bases["multimodal"].naming.decoder_prefix == "model.language_model."
  assert gemma.module_layout(H.hf_config("gemma3"))["outside"] == ()  # tied: no lm_head layer
  for base in bases.values():
    assert base.naming.num_layers == 4 and "lm_head" in base.params
    assert dict(base.naming.outside) == {"lm_head": "lm_head"}
    np.testing.assert_allclose(
      base.ours(None, None), PH.logits(base.torch_model(), TOKENS), atol=TOL
    )


# name -> (PEFT config from target_modules, std of the random adapter weights)
VARIANTS = {
  "oft_neumann_default": (PH.make_oft(), 0.1),  # PEFT's defaults: Cayley-Neumann, n = 5
  "oft_exact_cayley": (PH.make_oft(use_cayley_neumann=False), 0.2),
  "oft_block_share": (PH.make_oft(block_share=True, use_cayley_neumann=False), 0.2),
  "oft_coft": (PH.make_oft(coft=True, eps=1.5, num_cayley_neumann_terms=6), 0.2),
  "lora_plain": (PH.make_lora(), 0.3),
  "lora_rslora": (PH.make_lora(use_rslora=True), 0.3),
  "lora_alpha_pattern": (
    PH.make_lora(alpha_pattern={"v_proj": 32, r"layers\.0\.self_attn\.o_proj": 3}),
    0.3,
  ),
  "lora_rank_pattern": (
    PH.make_lora(
      rank_pattern={"v_proj": 2, r"layers\.1\.mlp\.down_proj": 6}, alpha_pattern={"lm_head": 2}
    ),
    0.3,
  ),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("kind", ["text", "multimodal"])
def test_peft_adapter_round_trips_exactly(bases, kind, variant, tmp_path):
  make_config, std = VARIANTS[variant]
  PH.assert_round_trip(bases[kind], make_config, std, tmp_path, TOKENS, TOWERS, TOL, 1e-2)


def _edited(folder, **changes):
  """Rewrites fields of a saved adapter_config.json (`None` deletes the field)."""
  path = os.path.join(folder, "adapter_config.json")
  meta = json.loads(open(path).read())
  for key, value in changes.items():
    if value is None:
      meta.pop(key, None)
    else:
      meta[key] = value
  with open(path, "w") as f:
    json.dump(meta, f)
  return folder


# A field missing from adapter_config.json takes PEFT's default (use_cayley_neumann: True).
MISSING = {
  "use_cayley_neumann": (PH.make_oft(use_cayley_neumann=False), {"use_cayley_neumann": None}),
  "num_cayley_neumann_terms": (
    PH.make_oft(num_cayley_neumann_terms=8),
    {"num_cayley_neumann_terms": None},
  ),
  "eps of coft": (PH.make_oft(), {"coft": True, "eps": None}),
  "block_share": (PH.make_oft(block_share=True), {"block_share": None, "r": None}),
  "lora_alpha": (PH.make_lora(lora_alpha=16), {"lora_alpha": None}),
  "use_rslora": (PH.make_lora(use_rslora=True), {"use_rslora": None}),
}


@pytest.mark.parametrize("case", sorted(MISSING))
def test_missing_fields_take_peft_defaults(bases, case, tmp_path):
  base = bases["text"]
  make_config, edits = MISSING[case]
  PH.peft_adapter(base, make_config, 0.1, tmp_path)
  folder = _edited(str(tmp_path), **edits)
  if case == "block_share":  # PEFT now builds one block per chunk and fails to load [1, n]
    adapter, config = peft_io.import_peft(folder, naming=base.naming)
    assert not config.block_share
    with pytest.raises(ValueError) as e:
      base.ours(adapter, config)
    assert "\n" not in str(e.value) and "has shape" in str(e.value)
    return
  with PH.captured_messages():  # PEFT warns about the missing peft_version; not our concern
    theirs = PH.logits(peft.PeftModel.from_pretrained(base.torch_model(), folder).eval(), TOKENS)
  adapter, config = peft_io.import_peft(folder, naming=base.naming)
  np.testing.assert_allclose(base.ours(adapter, config), theirs, atol=TOL)


@pytest.mark.parametrize("make_config", [PH.make_oft(), PH.make_lora()], ids=["oft", "lora"])
def test_layers_to_transform_leaves_other_layers_as_they_are(bases, make_config, tmp_path):
  base = bases["text"]
  narrow = lambda targets: dataclasses.replace(
    make_config(["q_proj", "down_proj"]), layers_to_transform=[1, 2]
  )
  theirs_model = PH.peft_adapter(base, narrow, 0.2, tmp_path / "peft")
  assert len(PH.tuner_modules(theirs_model)) == 4
  theirs = PH.logits(theirs_model, TOKENS)
  with pytest.raises(ValueError) as e:
    peft_io.import_peft(str(tmp_path / "peft"))  # no layer count: cannot fill layers 0 and 3
  assert "\n" not in str(e.value) and "layers_to_transform=[1, 2]" in str(e.value)
  adapter, config = peft_io.import_peft(str(tmp_path / "peft"), naming=base.naming)
  np.testing.assert_allclose(base.ours(adapter, config), theirs, atol=TOL)
  peft_io.export_peft(str(tmp_path / "ours"), adapter, config, naming=base.naming)
  back = PH.load_peft(base.torch_model(), str(tmp_path / "ours"))
  np.testing.assert_allclose(PH.logits(back, TOKENS), theirs, atol=TOL)


def test_bare_names_on_a_multimodal_base_are_refused(bases, tmp_path):
  """PEFT wraps the SigLIP tower's q_proj too: oftjax holds the text decoder only."""
  base = dataclasses.replace(bases["multimodal"], targets=["q_proj"])
  model = PH.peft_adapter(base, PH.make_oft(), 0.1, tmp_path)
  assert [m for m in PH.tuner_modules(model) if "vision_tower" in m]
  with pytest.raises(ValueError) as e:
    peft_io.import_peft(str(tmp_path), naming=base.naming)
  msg = str(e.value)
  assert "\n" not in msg and "model.vision_tower." in msg and "vision/audio tower" in msg


def test_lm_head_adapter_on_a_tied_base_is_refused(bases, tmp_path):
  """A tied lm_head is the embedding in oftjax: the adapter would silently do nothing."""
  base = bases["text"]
  PH.peft_adapter(base, PH.make_lora(), 0.1, tmp_path)
  tied = dataclasses.replace(base.naming, outside=())
  with pytest.raises(ValueError) as e:
    peft_io.import_peft(str(tmp_path), naming=tied)
  assert "\n" not in str(e.value) and "module 'lm_head'" in str(e.value)


def test_multimodal_adapter_on_text_naming_is_refused(bases, tmp_path):
  PH.peft_adapter(bases["multimodal"], PH.make_oft(), 0.1, tmp_path)
  with pytest.raises(ValueError) as e:
    peft_io.import_peft(str(tmp_path), naming=bases["text"].naming)
  assert "\n" not in str(e.value) and "model.language_model.layers.0" in str(e.value)


# adapter_config.json edits that oftjax cannot represent -> a needle of the one-line refusal.
REFUSED = {
  "use_dora": (PH.make_lora(), {"use_dora": True}, "use_dora"),
  "lora_bias": (PH.make_lora(), {"lora_bias": True}, "lora_bias"),
  "pissa": (PH.make_lora(), {"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
  "modules_to_save": (PH.make_lora(), {"modules_to_save": ["lm_head"]}, "modules_to_save"),
  "bias": (PH.make_oft(), {"bias": "all"}, "bias='all'"),
  "unknown field": (PH.make_oft(), {"new_variant": {"on": True}}, "new_variant"),
  "fan_in_fan_out": (PH.make_lora(), {"fan_in_fan_out": True}, "fan_in_fan_out"),
  "neumann n=2": (PH.make_oft(), {"num_cayley_neumann_terms": 2}, "num_cayley_neumann_terms=2"),
  "neumann n=1": (PH.make_oft(), {"num_cayley_neumann_terms": 1}, "R = I"),
  "rank_pattern mismatch": (
    PH.make_lora(rank_pattern={"v_proj": 2}),
    {"rank_pattern": {"v_proj": 3}},
    "rank_pattern",
  ),
  "eps not a number": (PH.make_oft(coft=True), {"eps": "small"}, "eps='small'"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unrepresentable_adapter_is_refused_in_one_line(bases, case, tmp_path):
  make_config, edits, needle = REFUSED[case]
  PH.peft_adapter(bases["text"], make_config, 0.1, tmp_path)
  with pytest.raises(ValueError) as e:
    peft_io.import_peft(_edited(str(tmp_path), **edits), naming=bases["text"].naming)
  assert "\n" not in str(e.value) and needle in str(e.value), str(e.value)


def test_naming_maps_paths_both_ways():
  naming = peft_io.ModuleNaming.from_layout(
    {
      "decoder_prefix": "model.language_model.",
      "module_list": "layers",
      "stacks": {"layers": range(2)},
      "outside": {"lm_head": "lm_head"},
    }
  )
  assert naming.module_name("layers/mlp/up_proj", 1) == "model.language_model.layers.1.mlp.up_proj"
  assert naming.module_name("lm_head", None) == "lm_head"
  assert naming.path_of("model.language_model.layers.1.mlp.up_proj") == ("layers/mlp/up_proj", 1)
  assert naming.path_of("lm_head") == ("lm_head", None)
  pattern = naming.target_pattern(["layers/mlp/up_proj", "lm_head"])
  assert re.fullmatch(pattern, "model.language_model.layers.1.mlp.up_proj")
  assert re.fullmatch(pattern, "lm_head")
  for other in (
    "model.vision_tower.encoder.layers.0.mlp.up_proj",
    "model.language_model.lm_head",
    "model.language_model.layers.1.mlp.up_proj.x",
  ):
    assert not re.fullmatch(pattern, other), other
  with pytest.raises(ValueError, match="unknown keys"):
    peft_io.ModuleNaming.from_layout({"prefix": "model."})
