"""OFT adapters exported as LoRA adapters (oftjax.peft_io.oft_to_lora).

Oracles: the OFT model's own logits and folded kernels (`fold_oft`), and PEFT loading the
written LoRA folder on transformers' Gemma 3 (`PeftModel.from_pretrained`, key warnings fail).
"""

import dataclasses

import gemma_helpers as H
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oftjax
from oftjax import adapters, peft_io, quant
from oftjax import geometry as geo
from oftjax import params as P
from oftjax.models import gemma
from oftjax.peft_io import oft_to_lora as L

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
import peft_helpers as PH  # noqa: E402  (needs torch and peft)

TOKENS = np.random.default_rng(1).integers(3, H.VOCAB, (2, 9))
TARGETS = r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny Gemma 3 folder and an OFT adapter with random nonzero blocks on it."""
  folder = tmp_path_factory.mktemp("gemma3")
  H.save_hf_model("gemma3", folder, seed=0)
  model, base = gemma.load(str(folder))
  config = oftjax.AdapterConfig(targets=TARGETS, block_size=8, num_terms=6)
  adapted = oftjax.adapt(model, config, jnp.zeros((1, 4), jnp.int32))
  zeros = adapted.init(jax.random.key(0))
  leaves, treedef = jax.tree_util.tree_flatten(zeros)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  adapter = jax.tree_util.tree_unflatten(
    treedef, [0.15 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
  )
  naming = peft_io.ModuleNaming.from_layout(gemma.module_layout(gemma.read_hf_config(str(folder))))
  return folder, model, base, adapted, adapter, naming


def _logits(module, params):
  return np.asarray(H.forward(module, params, jnp.asarray(TOKENS, jnp.int32)), np.float64)


def _lora_logits(trained, lora_tree, lora_config):
  _, model, base, *_ = trained
  return _logits(oftjax.Adapted(model, lora_config), P.merge_params(base, lora_tree))


def test_update_is_what_fold_adds(trained):
  _, _, base, adapted, adapter, _ = trained
  folded = adapted.fold(P.merge_params(base, adapter))
  for path, geom in adapted.geometries.items():
    kernel = P.node_at(base, path)["kernel"]
    blocks = adapters.oft_blocks(P.node_at(adapter, path)["oft"], adapted.config, path)
    delta = L.oft_update(kernel, geom, blocks)
    added = np.asarray(geo.kernel_to_matrix(P.node_at(folded, path)["kernel"], geom), np.float64)
    added -= np.asarray(geo.kernel_to_matrix(kernel, geom), np.float64)
    assert np.linalg.norm(delta) > 0.05 * np.linalg.norm(np.asarray(kernel))  # a real update
    np.testing.assert_allclose(delta, added, atol=2e-6)


def test_full_rank_reproduces_the_oft_logits(trained):
  _, model, base, adapted, adapter, _ = trained
  oft = _logits(adapted.module, P.merge_params(base, adapter))
  assert np.abs(oft - _logits(model, base)).max() > 1e-2  # the adapter changes the model
  tree, lora_config, report = L.lora_from_oft(
    P.merge_params(base, adapter), adapted.geometries, adapted.config, rank=report_full(trained)
  )
  assert lora_config.lora_alpha == lora_config.lora_rank == report["full_rank"]
  assert report["relative_error"] < 1e-6
  np.testing.assert_allclose(_lora_logits(trained, tree, lora_config), oft, atol=1e-4, rtol=0)


def report_full(trained):
  """The largest full rank of the adapted layers (min(d_in, d_out) over layers)."""
  return max(min(g.d_in, g.d_out) for g in trained[3].geometries.values())


def test_reported_error_is_the_measured_error(trained):
  _, _, base, adapted, adapter, _ = trained
  rank = 3
  tree, lora_config, report = L.lora_from_oft(
    P.merge_params(base, adapter), adapted.geometries, adapted.config, rank=rank
  )
  folded_oft = adapted.fold(P.merge_params(base, adapter))
  lora_model = adapted.with_config(lora_config)
  folded_lora = lora_model.fold(P.merge_params(base, tree))
  res_sq = delta_sq = weight_sq = 0.0
  for path, geom in adapted.geometries.items():
    mat = lambda t: np.asarray(geo.kernel_to_matrix(P.node_at(t, path)["kernel"], geom), np.float64)
    k, k_oft, k_lora = mat(base), mat(folded_oft), mat(folded_lora)
    res = np.linalg.norm(k_lora - k_oft, axis=(-2, -1))
    delta = np.linalg.norm(k_oft - k, axis=(-2, -1))
    weight = np.linalg.norm(k, axis=(-2, -1))
    layer = report["layers"][path]
    np.testing.assert_allclose(layer["relative_error"], res / delta, rtol=1e-3)
    np.testing.assert_allclose(layer["relative_to_weight"], res / weight, rtol=1e-3)
    res_sq, delta_sq = res_sq + np.sum(res**2), delta_sq + np.sum(delta**2)
    weight_sq += np.sum(weight**2)
  assert 0.05 < report["relative_error"] < 0.99  # rank 3 loses a visible part
  np.testing.assert_allclose(report["relative_error"], np.sqrt(res_sq / delta_sq), rtol=1e-3)
  np.testing.assert_allclose(report["relative_to_weight"], np.sqrt(res_sq / weight_sq), rtol=1e-3)
  curve = {row["rank"]: row for row in report["curve"]}
  errors = [row["relative_error"] for row in report["curve"]]
  assert (
    errors == sorted(errors, reverse=True) and curve[report["full_rank"]]["relative_error"] < 1e-6
  )


def test_peft_loads_the_lora_export_and_agrees(trained, tmp_path):
  folder, _, base, adapted, adapter, naming = trained
  tree, lora_config, report = L.lora_from_oft(
    P.merge_params(base, adapter), adapted.geometries, adapted.config, rank=4
  )
  peft_io.export_peft(str(tmp_path / "lora"), tree, lora_config, naming=naming)
  hf = H.CAUSAL_LM[type(H.hf_config("gemma3"))].from_pretrained(
    str(folder), attn_implementation="eager"
  )
  peft_model = PH.load_peft(hf.eval(), str(tmp_path / "lora"))
  cfg = peft_model.peft_config["default"]
  assert cfg.peft_type.value == "LORA" and cfg.r == 4 and cfg.lora_alpha == 4
  assert len(PH.tuner_modules(peft_model)) == 7 * H.hf_config("gemma3").num_hidden_layers
  theirs = PH.logits(peft_model, TOKENS)
  np.testing.assert_allclose(_lora_logits(trained, tree, lora_config), theirs, atol=1e-4, rtol=0)
  # and the truncation is felt in the logits: rank 4 is not the OFT model
  oft = _logits(adapted.module, P.merge_params(base, adapter))
  assert np.abs(theirs - oft).max() > 1e-4 and report["relative_error"] > 0.01


def test_quantized_base_uses_the_dequantized_kernel(trained):
  _, model, base, _, adapter, _ = trained
  config = oftjax.AdapterConfig(targets=TARGETS, block_size=8, num_terms=6)
  qadapted = oftjax.adapt(quant.Dequantized(model), config, jnp.zeros((1, 4), jnp.int32))
  base_q = quant.quantize_params(base, qadapted.geometries, "nf4", block_size=16)
  deq = quant.dequantize_params(base_q, qadapted.geometries)
  with pytest.raises(ValueError, match="dequantize the base first"):
    L.lora_from_oft(P.merge_params(base_q, adapter), qadapted.geometries, config, 4)
  tree, lora_config, _ = L.lora_from_oft(
    P.merge_params(deq, adapter), qadapted.geometries, config, rank=report_full(trained)
  )
  oft_q = _logits(qadapted.module, P.merge_params(base_q, adapter))
  lora_q = _logits(qadapted.with_config(lora_config).module, P.merge_params(base_q, tree))
  np.testing.assert_allclose(lora_q, oft_q, atol=1e-4, rtol=0)


def test_refusals(trained):
  _, _, base, adapted, adapter, _ = trained
  params = P.merge_params(base, adapter)
  with pytest.raises(ValueError, match="rank must be a positive integer"):
    L.lora_from_oft(params, adapted.geometries, adapted.config, 0)
  lora = dataclasses.replace(adapted.config, method="lora")
  with pytest.raises(ValueError, match="converts OFT adapters"):
    L.lora_from_oft(params, adapted.geometries, lora, 4)
