"""`unroll_layers`: the layer scan traced unrolled keeps parameters, loss and gradients."""

import gemma4_helpers as G4
import gemma_helpers as H
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oftjax
from oftjax.models import gemma
from oftjax.train import config as job_config


def _with_unroll(model, unroll: bool):
  return model.clone(config=model.config.replace(unroll_layers=unroll))


@pytest.mark.parametrize(
  "hf_config",
  [H.deep_gemma3_config(4), G4.text_config("shared")],
  ids=["gemma3", "gemma4"],
)
def test_unrolled_layers_keep_params_loss_and_oft_gradients(hf_config):
  """Scanned and unrolled: one parameter tree, the same loss and adapter gradients (fp32,
  random non-identity rotations), and only the scanned step keeps a `while` loop."""
  model = gemma.from_hf_config(hf_config)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 24)))
  rng = np.random.default_rng(1)
  shapes = jax.eval_shape(lambda: gemma.init_params(model, jax.random.key(0)))
  frozen = H.random_like(shapes, rng, 0.2)
  acfg = oftjax.AdapterConfig(method="oft", targets=r".*(q_proj|down_proj)", block_size=8)
  results, trainable = {}, None
  for unroll in (False, True):
    adapted = oftjax.adapt(_with_unroll(model, unroll), acfg, tokens[:, :8])
    own = jax.eval_shape(lambda a=adapted: gemma.init_params(a.module.wrapped, jax.random.key(0)))
    assert jax.tree_util.tree_structure(own) == jax.tree_util.tree_structure(shapes)
    if trainable is None:  # non-zero rotations
      trainable = H.random_like(adapted.init(jax.random.key(2)), rng, 0.05)
    loss = H.adapter_loss_of(adapted.module)
    compiled = jax.jit(jax.value_and_grad(loss)).lower(trainable, frozen, tokens).compile()
    assert (" while(" in compiled.as_text()) is not unroll, unroll
    results[unroll] = compiled(trainable, frozen, tokens)
  (v0, g0), (v1, g1) = results[False], results[True]
  np.testing.assert_allclose(v1, v0, rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0)):
    scale = float(jnp.abs(b).max())
    assert scale > 0
    # fp32 reassociation only: XLA fuses the unrolled layers differently (1e-5 of the scale).
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale)


SMALL, LARGE = job_config.UNROLL_MAX_BYTES, job_config.UNROLL_MAX_BYTES + 1


@pytest.mark.parametrize(
  "flag, backend, weight_bytes, expected",
  [("auto", "cpu", SMALL, True), ("auto", "cpu", LARGE, False), ("auto", "gpu", SMALL, False)]
  + [("auto", "tpu", SMALL, False), ("on", "gpu", LARGE, True), ("off", "cpu", SMALL, False)],
)
def test_the_job_unrolls_small_decoders_on_cpu_by_default(flag, backend, weight_bytes, expected):
  c = job_config.RunConfig(unroll_layers=flag)
  assert job_config.unrolls_layers(c, backend, weight_bytes) is expected


def test_the_bound_the_docs_state_is_the_code_s():
  """README, the design doc and `--help` quote `UNROLL_MAX_BYTES` as written there."""
  import dataclasses
  import pathlib

  quoted = f"{job_config.UNROLL_MAX_BYTES >> 30} GiB"
  assert job_config.UNROLL_MAX_BYTES == (job_config.UNROLL_MAX_BYTES >> 30) << 30
  root = pathlib.Path(__file__).resolve().parents[1]
  help_text = next(
    f.metadata["help"]
    for f in dataclasses.fields(job_config.RunConfig)
    if f.name == "unroll_layers"
  )
  docs = [(root / name).read_text() for name in ("README.md", "BENCHMARKS.md", "docs/DESIGN.md")]
  for text in [help_text, *docs]:
    assert f"at most {quoted}" in text
