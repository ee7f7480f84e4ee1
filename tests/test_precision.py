"""The adapter's own matmuls carry the chosen precision in the lowered program; the frozen ones do not.

JAX's default precision is true float32 on CPU only (TF32 on recent NVIDIA GPUs, one
bf16 pass on TPU), so numbers on this machine cannot show it: the lowered StableHLO
text can. Each `dot_general` there is classified by its operand shapes, chosen so that
no frozen matmul of the tiny model shares them: OFT blocks are `[.., 8, 8]` (head_dim
is 12), the weight-centric baseline's dense `R` is `[48, 48]` or `[64, 64]` and
LoRA's rank is 3.
Programs are lowered under the unset (backend) default precision, as the job runs; the
test suite's conftest otherwise makes every matmul `HIGHEST`.
"""

import re

import jax
import jax.numpy as jnp
import optax
import pytest
from tiny_models import TinyLM, next_token_loss

import oftjax
from oftjax.train.config import UsageError, adapter_config, parse_args

ADAPTER_SHAPES = {
  "oft": r"x8x8xf32>",
  "oftv1": r"x8x8xf32>|<48x48xf32>|<64x64xf32>",
  "lora": r"[<x]3x",
}
TOKENS = jnp.zeros((2, 16), jnp.int32)


def _setup(method, precision):
  config = oftjax.AdapterConfig(
    method=method, block_size=8, lora_rank=3, targets=r".*_proj", precision=precision
  )
  model = TinyLM(vocab=64, width=48, mlp=64, depth=1)
  wrapped = oftjax.Adapted(model, config)
  params = jax.jit(wrapped.init)(jax.random.key(0), TOKENS)["params"]
  return config, wrapped, params, dict(oftjax.adapt(model, config, TOKENS).geometries)


def _dots(text, method):
  """`(adapter, frozen)` lists of the precision names of every dot_general in `text`."""
  adapter, frozen = [], []
  for line in text.splitlines():
    if "dot_general" not in line:
      continue
    found = re.search(r"precision = \[(\w+), (\w+)\]", line)
    names = found.groups() if found else ("DEFAULT", "DEFAULT")
    types = line[line.rindex(": (") :]
    (adapter if re.search(ADAPTER_SHAPES[method], types) else frozen).append(names)
  return adapter, frozen


@pytest.mark.parametrize(
  "method,precision",
  [
    ("oft", "highest"),
    ("oft", "high"),
    ("oft", "default"),
    ("oftv1", "highest"),
    ("lora", "highest"),
  ],
)
def test_lowered_train_step_carries_the_adapter_precision(method, precision):
  _, wrapped, params, _ = _setup(method, precision)
  frozen, adapter = oftjax.split_params(params)
  optimizer = optax.sgd(0.1)
  step = oftjax.make_train_step(
    lambda p, b: next_token_loss(wrapped.apply({"params": p}, b), b), optimizer
  )
  with jax.default_matmul_precision(None):
    text = step.lower(adapter, optimizer.init(adapter), frozen, TOKENS).as_text()
  ours, theirs = _dots(text, method)
  # Forward and backward of every adapted layer (7 projections), Neumann powers for OFT.
  assert len(ours) >= 21, ours
  assert set(ours) == {(precision.upper(),) * 2}
  assert theirs and set(theirs) == {("DEFAULT", "DEFAULT")}  # frozen matmuls untouched


@pytest.mark.parametrize("method,precision", [("oft", "highest"), ("lora", "default")])
def test_lowered_fold_carries_the_adapter_precision(method, precision):
  config, _, params, geometries = _setup(method, precision)
  fold = jax.jit(lambda p: oftjax.fold_adapters(p, geometries, config))
  with jax.default_matmul_precision(None):
    text = fold.lower(params).as_text()
  ours, theirs = _dots(text, method)
  assert len(ours) >= 7 and set(ours) == {(precision.upper(),) * 2}, ours
  assert not theirs


def test_orthogonality_is_measured_at_highest_whatever_the_adapter_precision():
  with jax.default_matmul_precision(None):
    text = jax.jit(oftjax.orthogonality_error).lower(jnp.eye(8)[None]).as_text()
  assert "precision = [HIGHEST, HIGHEST]" in text


def test_job_flag_reaches_the_adapter_config():
  assert adapter_config(parse_args([])).precision == "highest"
  assert adapter_config(parse_args(["--adapter-precision", "default"])).precision == "default"
  with pytest.raises(UsageError, match="adapter-precision"):
    parse_args(["--adapter-precision", "tf32"])


def test_unknown_precision_is_an_error():
  with pytest.raises(ValueError, match="precision 'fast'.*highest"):
    oftjax.AdapterConfig(precision="fast")
