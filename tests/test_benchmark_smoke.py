"""experiments/benchmark.py --smoke: the JSON has every method and field, with sane values.

No timing assertions: speed lives in the benchmark itself (docs/DESIGN.md §4).
"""

import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("peft")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JAX_METHODS = ("floor", "oft", "oftv1", "lora16", "full")
PEFT_METHODS = ("peft_oft", "peft_lora16")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
  folder = tmp_path_factory.mktemp("bench")
  out, plots = folder / "smoke.json", folder / "plots"
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, "experiments", "benchmark.py"),
      "--smoke",
      "--out",
      str(out),
      "--plots",
      str(plots),
      "--threads",
      "1",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(out) as f:
    data = json.load(f)
  data["_plots"] = sorted(os.listdir(plots))
  return data


def _finite_positive(x):
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_every_method_has_its_fields(result):
  assert result["mode"] == "smoke"
  (entry,) = result["configs"]
  methods = entry["methods"]
  assert set(JAX_METHODS + PEFT_METHODS) <= set(methods)
  if "lora_match" not in methods:  # dropped only when r=16 already has >= OFT's params
    assert entry["config"]["lora_match_rank"] <= 16
  for name in JAX_METHODS:
    s = methods[name]
    for key in (
      "step_s",
      "flops",
      "argument_bytes",
      "compile_s",
      "trainable_params",
      "achieved_flops_per_s",
      "fraction_of_peak",
      "time_vs_oft",
      "flops_vs_oft",
    ):
      assert _finite_positive(s[key]), (name, key, s.get(key))
    assert s["temp_bytes"] > 0
    assert math.isfinite(s["final_loss"])
  for name in PEFT_METHODS:
    assert _finite_positive(methods[name]["step_s"]) and methods[name]["framework"] == "torch"
  assert _finite_positive(result["matmul_peak"]["flops_per_s"])
  assert result["machine"]["threads"] == 1 and result["machine"]["torch_threads"] == 1


@pytest.mark.slow
def test_values_are_sane(result):
  (entry,) = result["configs"]
  m, cfg = entry["methods"], entry["config"]
  # The weight-centric OFT forms R·W every step: more flops and memory than OFTv2.
  assert m["oft"]["flops"] < m["oftv1"]["flops"]
  assert m["oft"]["temp_bytes"] < m["oftv1"]["temp_bytes"]
  # Adapter-only steps skip every weight gradient that full finetuning computes.
  assert m["oft"]["flops"] < m["full"]["flops"] and m["floor"]["flops"] < m["full"]["flops"]
  # Same adapters on both sides: PEFT and oftjax agree on the trainable parameter counts.
  assert m["oft"]["trainable_params"] == m["oftv1"]["trainable_params"]
  assert m["oft"]["trainable_params"] == m["peft_oft"]["trainable_params"]
  assert m["lora16"]["trainable_params"] == m["peft_lora16"]["trainable_params"]
  assert m["full"]["trainable_params"] == cfg["base_params"]
  assert m["floor"]["trainable_params"] == cfg["d_model"]
  b = cfg["block_size"]
  assert m["oft"]["trainable_params"] % (b * (b - 1) // 2) == 0
  for key, value in entry["ratios"].items():
    assert _finite_positive(value), (key, value)
  checks = result["targets"]["checks"]
  assert set(checks) == {
    "oftv1_over_oft_time",
    "oftv1_over_oft_temp",
    "oft_over_lora16_time",
    "oft_over_floor_time",
    "peft_oft_over_oft_time",
    "oft_fraction_of_peak",
  }
  assert all(isinstance(c["met"], bool) for c in checks.values())
  assert "fraction_of_peak.png" in result["_plots"]


def _bench_module(name):
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  try:
    return __import__(name)
  finally:
    sys.path.pop(0)


def test_scan_aware_flops_count_every_layer():
  """XLA CPU counts a scanned body once; `compiled_costs` counts it once per trip."""
  import jax
  import jax.numpy as jnp

  bench_jax = _bench_module("bench_jax")

  def loss(x, w):
    return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)[0].sum()

  matmul = 2.0 * 64**3
  counted = {}
  for layers in (2, 4):
    x, w = jnp.ones((64, 64)), jnp.ones((layers, 64, 64))
    compiled = jax.jit(jax.grad(loss, 1)).lower(x, w).compile()
    costs = bench_jax.compiled_costs(compiled)
    counted[layers] = costs["xla_cost_analysis_flops"]
    # forward, input gradient and weight gradient: three matmuls per layer (+ tanh etc.)
    assert 3 * layers <= costs["flops"] / matmul < 3 * layers + 0.1, (layers, costs)
  assert counted[2] == counted[4]  # what the correction is for


@pytest.fixture(scope="module")
def job_result(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench_job") / "job.json"
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, "experiments", "benchmark.py"),
      "--smoke",
      "--no-grid",
      "--job",
      "--xla-variants",
      "eigen",
      "--out",
      str(out),
      "--threads",
      "1",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(out) as f:
    return json.load(f)


@pytest.mark.slow
def test_job_mode_times_the_jobs_step_beside_bare_and_peft(job_result):
  job = job_result["job"]
  m, r = job["methods"], job["ratios"]
  assert set(m) == {"job", "bare", "bare[scan]", "peft_oft", "bare[eigen]"}
  assert job_result["configs"] == [] and "targets" not in job_result
  # The job's compiled step is the bare step plus small reductions (masks, metrics, clipping).
  assert 1.0 <= r["job_over_bare_flops"] < 1.05
  # On CPU the job unrolls its layers; `bare[scan]` is the same step with the layer scan.
  assert m["bare"]["unroll_layers"] is True and m["bare[scan]"]["unroll_layers"] is False
  # Two scanned layers: the scan-aware count adds the second layer's dots, and then equals
  # the unrolled step's count (which XLA's cost analysis gets whole) up to the loop's
  # uncounted elementwise flops.
  scan = m["bare[scan]"]
  assert scan["flops"] > 1.5 * scan["xla_cost_analysis_flops"]
  assert m["bare"]["flops"] == m["bare"]["xla_cost_analysis_flops"]
  assert abs(scan["flops"] / m["bare"]["flops"] - 1) < 0.02
  assert _finite_positive(scan["time_vs_default"])
  assert m["job"]["trainable_params"] == m["bare"]["trainable_params"]
  assert m["peft_oft"]["flops_from"] == "bare" and m["peft_oft"]["framework"] == "torch"
  for name in m:
    assert _finite_positive(m[name]["step_s"]) and _finite_positive(m[name]["fraction_of_peak"])
  for key in ("job_over_bare_time", "peft_oft_over_job_time", "job_over_peft_oft_peak_fraction"):
    assert _finite_positive(r[key]), key
  assert 0 < m["job"]["real_tokens_per_step"] <= job["config"]["batch"] * job["config"]["seq"]
  assert m["bare[eigen]"]["compiler_options"] == {"xla_cpu_experimental_ynn_fusion_type": ""}
  assert _finite_positive(job_result["torch_matmul_peak"]["flops_per_s"])
  assert job_result["machine"]["lscpu"]["Model name"]


@pytest.mark.slow
def test_gpu_benchmark_dry_run_on_cpu(tmp_path):
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, "experiments", "gpu_benchmark.py"),
      "--tiny",
      "--out-dir",
      str(tmp_path),
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(tmp_path / "gpu_benchmark.json") as f:
    result = json.load(f)
  assert result["mode"] == "tiny" and result["machine"]["dtype"] == "bfloat16"
  first = result["configs"][0]["methods"]
  assert {"floor", "oft", "lora16", "oftv1", "peft_oft", "peft_lora16"} <= set(first)
  for name in ("oft", "peft_oft"):
    assert _finite_positive(first[name]["fraction_of_peak"]), name
  assert "step_time_vs_d_model.png" in os.listdir(tmp_path)
