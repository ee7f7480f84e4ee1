"""Sharded training on 8 simulated CPU devices equals the 1-device run; FSDP splits weights."""

import json
import os
import subprocess
import sys

import numpy as np
from process_group import free_port, run_group
import pytest

from oftjax import sharding

HERE = os.path.dirname(os.path.abspath(__file__))


def _cpu_env(devices: int | None = None) -> dict:
  """The environment of a JAX-on-CPU subprocess, with `devices` simulated devices if given."""
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", ""),
  }
  if devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def _run_steps(script: str, meshes, devices: int | None = None, timeout: int = 600) -> dict:
  """Runs a steps script (`sharded_steps.py`, ...) over `meshes`; returns its JSON line."""
  proc = subprocess.run(
    [sys.executable, os.path.join(HERE, script), *meshes],
    capture_output=True,
    text=True,
    timeout=timeout,
    env=_cpu_env(devices),
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_same_training(got: dict, want: dict) -> None:
  """Equal losses and adapter weights (fp32 reduction order aside)."""
  np.testing.assert_allclose(got["losses"], want["losses"], atol=1e-5)
  for g, w in zip(got["adapter"], want["adapter"]):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5)


def test_mesh_spec_errors():
  import jax

  with pytest.raises(ValueError, match="needs 3 devices"):
    sharding.make_mesh("data=3", jax.devices()[:1])
  with pytest.raises(ValueError, match="AXIS=N"):
    sharding.make_mesh("pipeline=1", jax.devices()[:1])
  assert sharding.make_mesh("", jax.devices()[:1]).shape["data"] == 1


@pytest.mark.slow
def test_meshes_match_single_device_and_fsdp_shards_weights():
  meshes = ["single", "data=8", "fsdp=8", "data=2,fsdp=4"]
  results = _run_steps("sharded_steps.py", meshes, devices=8)
  for spec in meshes[1:]:
    _assert_same_training(results[spec], results["single"])
  fsdp = results["fsdp=8"]
  assert fsdp["max_device_bytes"] <= fsdp["frozen_bytes"] / 8 + 16 * 1024, fsdp
  assert results["data=8"]["max_device_bytes"] == results["data=8"]["frozen_bytes"]


def _start_processes(spec, kill_one_after=None, bound=240):
  """2 processes x 2 simulated devices running multihost_steps.py on one mesh."""
  port = free_port()
  commands = [
    [sys.executable, os.path.join(HERE, "multihost_steps.py"), str(port), "2", str(i), spec]
    for i in range(2)
  ]
  return run_group(commands, _cpu_env(devices=2), bound, kill_last_after=kill_one_after)


@pytest.mark.slow
def test_two_processes_on_loopback_equal_single_process():
  codes, out, _ = _start_processes("data=2,fsdp=2")
  assert codes == [0, 0], codes
  multi = json.loads(out.strip().splitlines()[-1])
  single = _run_steps("sharded_steps.py", ["single"], timeout=300)["single"]
  _assert_same_training(multi, single)


@pytest.mark.slow
def test_dead_peer_fails_instead_of_hanging():
  codes, _, seconds = _start_processes("data=4", kill_one_after=2.0, bound=120)
  assert codes[1] != 0 and codes[0] != 0, codes
  assert seconds < 120


@pytest.mark.slow  # ~75 s on 2 loaded cores: 3 meshes of a Gemma 4 with MoE
def test_gemma4_parameters_shard_and_sharded_steps_match():
  """Every Gemma 4 parameter the FSDP rule can split is split on 8 devices: the embeddings,
  the per-layer-embedding table, the MoE expert kernels, every projection. Vectors of
  fewer than 1024 entries (norm scales, `layer_scalar`) stay replicated by the rule."""
  meshes = ["single", "fsdp=8", "data=2,fsdp=4"]
  results = _run_steps("sharded_gemma4_steps.py", meshes, devices=8)
  ref = results["single"]
  for spec in meshes[1:]:
    _assert_same_training(results[spec], ref)
  assert ref["losses"][-1] < ref["losses"][0]
  fsdp = results["fsdp=8"]
  specs, shapes = fsdp["specs"], fsdp["shapes"]
  for path, shape in shapes.items():
    assert specs[path] == str(sharding.fsdp_spec(tuple(shape), 8)), path
    if np.prod(shape) >= 1024:
      assert "fsdp" in specs[path], (path, shape, specs[path])
  big = [
    "embed_tokens/embedding",
    "embed_tokens_per_layer/embedding",
    "per_layer_model_projection/kernel",
    "layers/segment_0/slot_0/experts/gate_up_proj",
    "layers/segment_0/slot_0/experts/down_proj",
    "layers/segment_0/slot_0/router/proj/kernel",
    "layers/segment_0/slot_0/self_attn/q_proj/kernel",
    "layers/segment_0/slot_0/mlp/down_proj/kernel",
  ]
  for path in big:
    assert "fsdp" in specs[path], (path, specs[path])
  assert fsdp["max_device_bytes"] <= fsdp["frozen_bytes"] / 8 + 16 * 1024, fsdp
