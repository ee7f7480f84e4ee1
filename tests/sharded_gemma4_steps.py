"""Runs 3 OFT training steps of a tiny Gemma 4 (PLE table, MoE experts) under several meshes.

Started by test_sharding.py in a subprocess with 8 simulated CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=8` must be set before jax loads).
Prints one JSON line: per mesh the training results of `sharded_steps.train` and the
sharding spec of every frozen parameter.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sharded_steps import run_meshes
import transformers

import oftjax
from oftjax import sharding
from oftjax.models import gemma
from oftjax.train.objective import masked_xent

jax.config.update("jax_default_matmul_precision", "highest")
S, F = "sliding_attention", "full_attention"


def build():
  """Tiny Gemma 4 with every parameter kind: PLE, KV sharing, k_eq_v, MoE beside the MLP."""
  hf = transformers.Gemma4TextConfig(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    global_head_dim=32,
    num_global_key_value_heads=1,
    attention_k_eq_v=True,
    sliding_window=4,
    layer_types=[S, F, S, F],
    hidden_size_per_layer_input=16,
    vocab_size_per_layer_input=128,
    num_kv_shared_layers=2,
    enable_moe_block=True,
    num_experts=16,
    top_k_experts=2,
    moe_intermediate_size=16,
    final_logit_softcapping=30.0,
    pad_token_id=0,
    rope_parameters={
      S: {"rope_type": "default", "rope_theta": 100.0},
      F: {"rope_type": "proportional", "partial_rotary_factor": 0.5, "rope_theta": 1e4},
    },
  )
  model = gemma.from_hf_config(hf)
  model = model.clone(config=model.config.replace(moe_implementation="dense"))
  base = gemma.init_params(model, jax.random.key(0))
  config = oftjax.AdapterConfig(
    block_size=16, targets=r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
  )
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (8, 17), 0, 128))
  batch = {
    "inputs": tokens[:, :-1],
    "targets": tokens[:, 1:],
    "loss_mask": np.ones((8, 16), np.float32),
  }
  adapted = oftjax.adapt(model, config, jnp.asarray(batch["inputs"]))
  # Random adapter weights so the rotation (and its gradient) is not the identity's.
  adapter = jax.tree_util.tree_map(
    lambda x: 0.05 * jax.random.normal(jax.random.key(3), x.shape), adapted.init(jax.random.key(2))
  )

  def loss_fn(params, b):
    return masked_xent(adapted.apply(params, b["inputs"]), b)

  # SGD as in sharded_steps.py; a smaller step than there, since the adapters start away
  # from zero and each update of 0.5 turned fp32 reduction-order rounding into 2e-5.
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1))
  return base, adapter, batch, loss_fn, optimizer


def _flat(tree) -> dict:
  """`{'/'-joined key path: leaf}` of a tree."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(k.key for k in path): v for path, v in leaves}


def specs(base, mesh) -> dict:
  """`{parameter path: its PartitionSpec as a string}` under `param_shardings`."""
  return {k: str(s.spec) for k, s in _flat(sharding.param_shardings(base, mesh)).items()}


def main(meshes):
  setup = build()
  base = setup[0]
  shapes = {k: list(v.shape) for k, v in _flat(base).items()}
  sharded = lambda mesh: {"specs": specs(base, mesh), "shapes": shapes}
  print(json.dumps(run_meshes(meshes, setup, sharded)))


if __name__ == "__main__":
  main(sys.argv[1:])
