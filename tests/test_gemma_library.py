"""OFT and LoRA on the google-deepmind/gemma library's own `gm.nn.Transformer` (optional).

Skipped unless `gemma` imports: the library pulls tensorflow and ~100 packages, so it is
an optional extra (`pip install oftjax[gemma-lib]`), not a test dependency. The main
suite covers the same layer forms with a stand-in (tests/test_layer_kinds.py).

Run (both cases pass) in a separate venv, /work/gemma-venv (Python 3.11.7); its full
`pip freeze` is experiments/gemma_library_venv.txt. `pip install gemma==3.3.0` with jax
pinned to 0.10.2 did not resolve in 35 min, so the packages went in `--no-deps`, one by
one as imports asked: gemma 3.3.0; kauldron 1.3.0 (1.4.x dropped
`kd.ckpts.AbstractPartialLoader`, which gemma 3.3.0 subclasses); jax/jaxlib 0.10.1
(kauldron 1.3.0 patches `jax._src.random._check_prng_key`, gone in 0.10.2); typeguard
4.4.1 (kauldron's type checks fail on 4.6); flax 0.12.8, optax 0.2.8, chex 0.1.92,
orbax-checkpoint 0.12.8, numpy 2.4.6, safetensors 0.8.0, pytest 9.2; and the import-time
rest (etils, einops, jaxtyping, sentencepiece, treescope, clu, grain, tensorflow 2.21,
keras 3.15, tensorflow-datasets 4.9.10, matplotlib, IPython, ...). Command:
`JAX_PLATFORMS=cpu PYTHONPATH=$PWD /work/gemma-venv/bin/python -m pytest -p no:cacheprovider
tests/test_gemma_library.py`.
"""

import os
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import oftjax

gm = pytest.importorskip("gemma.gm")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments"))
from finetune_gemma_library import TARGETS, tiny_model  # noqa: E402  (the example's model)

TOKENS = jax.random.randint(jax.random.key(0), (2, 7), 1, 128)
CONFIGS = {
  "oft": oftjax.AdapterConfig(block_size=8, targets=TARGETS),
  "lora": oftjax.AdapterConfig(method="lora", lora_rank=4, targets=TARGETS),
}


def random_adapter(adapted, seed, scale=0.1):
  leaves, treedef = jax.tree_util.tree_flatten(jax.eval_shape(adapted.init, jax.random.key(1)))
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([scale * jax.random.normal(k, s.shape) for k, s in zip(keys, leaves)])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["oft", "lora"])
def test_gemma_library_transformer_adapts_folds_and_trains(method):
  model = tiny_model()
  base = model.init(jax.random.key(1), TOKENS)["params"]
  adapted = oftjax.adapt(model, CONFIGS[method], TOKENS)
  assert "layer_0/mlp/gating_einsum" in adapted.geometries
  assert "layer_0/attn/kv_einsum/w" in adapted.geometries
  run = lambda module, params: jax.jit(module.apply)({"params": params}, TOKENS).logits
  y0 = run(model, base)
  # zero init: the base logits exactly
  zero = oftjax.merge_params(base, adapted.init(jax.random.key(2)))
  np.testing.assert_array_equal(np.asarray(run(adapted.module, zero)), np.asarray(y0))
  # a nonzero adapter folds into the model's own weights; a second call still adapts
  for seed in (3, 4):
    params = oftjax.merge_params(base, random_adapter(adapted, seed))
    y = adapted.apply(params, TOKENS).logits
    assert float(jnp.abs(y - y0).max()) > 1e-2
    folded = adapted.fold(params)
    chex.assert_trees_all_equal_structs(folded, base)
    chex.assert_trees_all_close(run(model, folded), y, atol=2e-5)
  # a few steps lower the loss; the frozen weights stay bit-identical
  frozen_copy = jax.tree_util.tree_map(np.array, base)
  tokens = jax.random.randint(jax.random.key(5), (4, 9), 1, 128)

  def loss_fn(params, batch):
    out = adapted.module.apply({"params": params}, batch[:, :-1]).logits
    return optax.softmax_cross_entropy_with_integer_labels(out, batch[:, 1:]).mean()

  optimizer = optax.adam({"oft": 3e-2, "lora": 1e-2}[method])
  step = oftjax.make_train_step(loss_fn, optimizer)
  trainable = adapted.init(jax.random.key(6))
  opt_state = optimizer.init(trainable)
  losses = []
  for _ in range(4):
    trainable, opt_state, loss, _ = step(trainable, opt_state, base, tokens)
    losses.append(float(loss))
  assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 1e-3, losses
  chex.assert_trees_all_equal(jax.tree_util.tree_map(np.asarray, base), frozen_copy)
