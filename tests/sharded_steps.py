"""Runs 3 OFT training steps of a tiny Gemma 3 under several meshes; prints JSON results.

Started by test_sharding.py in a subprocess with 8 simulated CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=8` must be set before jax loads).
"""

import json
import sys

import jax
import numpy as np
import optax
import transformers

import oftjax
from oftjax import sharding
from oftjax.models import gemma
from oftjax.train.objective import masked_xent

jax.config.update("jax_default_matmul_precision", "highest")


def build():
  """Tiny Gemma 3, OFT adapters, one 8-row batch, loss and optimizer (same on every process)."""
  hf = transformers.Gemma3TextConfig(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    sliding_window=8,
  )
  model = gemma.from_hf_config(hf)
  base = gemma.init_params(model, jax.random.key(0))
  config = oftjax.AdapterConfig(
    block_size=16, targets=r".*(q_proj|v_proj|o_proj|up_proj|down_proj)"
  )
  wrapped = oftjax.Adapted(model, config)
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (8, 17), 0, 128))
  batch = {
    "inputs": tokens[:, :-1],
    "targets": tokens[:, 1:],
    "loss_mask": np.ones((8, 16), np.float32),
  }
  adapter = oftjax.split_params(wrapped.init(jax.random.key(2), batch["inputs"])["params"])[1]

  def loss_fn(params, b):
    return masked_xent(wrapped.apply({"params": params}, b["inputs"]), b)

  # SGD, not Adam: Adam's g/sqrt(v) turns reduction-order rounding of near-zero gradient
  # entries into O(lr) differences, which says nothing about the sharding being right.
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.5))
  return base, adapter, batch, loss_fn, optimizer


def train(mesh, base, adapter, batch, loss_fn, optimizer, steps=3):
  """`steps` steps on `mesh`; each process feeds only its rows of the global batch."""
  frozen = jax.device_put(base, sharding.param_shardings(base, mesh))
  trainable = jax.device_put(adapter, sharding.param_shardings(adapter, mesh, shard=False))
  batch_sharding = sharding.batch_sharding(mesh, 2)
  rows = len(batch["inputs"]) // jax.process_count()
  mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
  data = {
    k: jax.make_array_from_process_local_data(batch_sharding, v[mine]) for k, v in batch.items()
  }
  state = optimizer.init(trainable)
  shardings = jax.tree_util.tree_map(lambda x: x.sharding, (trainable, state))
  step = oftjax.make_train_step(
    loss_fn, optimizer, has_aux=True, donate=False, state_shardings=shardings
  )
  losses = []
  for _ in range(steps):
    trainable, state, loss, _ = step(trainable, state, frozen, data)
    losses.append(float(np.asarray(loss.addressable_data(0))))
  local = lambda x: np.asarray(x.addressable_data(0))
  total = sum(x.nbytes for x in jax.tree_util.tree_leaves(frozen))
  per_device = max(
    sum(
      s.data.nbytes
      for x in jax.tree_util.tree_leaves(frozen)
      for s in x.addressable_shards
      if s.device == d
    )
    for d in jax.local_devices()
  )
  return {
    "losses": losses,
    "frozen_bytes": total,
    "max_device_bytes": per_device,
    "adapter": [local(x).tolist() for x in jax.tree_util.tree_leaves(trainable)],
  }


def run_meshes(meshes, setup, more=lambda mesh: {}) -> dict:
  """`{spec: train(mesh, *setup) and more(mesh)}` per mesh spec ('single': one device)."""
  results = {}
  for spec in meshes:
    devices = jax.devices()[:1] if spec == "single" else jax.devices()
    mesh = sharding.make_mesh("" if spec == "single" else spec, devices)
    results[spec] = {**train(mesh, *setup), **more(mesh)}
  return results


def main(meshes):
  print(json.dumps(run_meshes(meshes, build())))


if __name__ == "__main__":
  main(sys.argv[1:])
