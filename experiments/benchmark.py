"""Benchmarks OFTv2 against the original OFT, LoRA, full finetuning, the floor and PEFT.

One process, one machine, one run: every ratio in the output compares numbers measured
side by side. Per configuration all methods are compiled first, then their steps are
timed round-robin (one step of each method per round), so a slow drift in machine load
hits every method alike. Figures per method: XLA's compiled flops and temp/argument
bytes (deterministic), compile time, median step time after one warm-up step, trainable
params, achieved FLOP/s as a fraction of XLA's fp32 matmul peak measured in the same run.

PEFT's rows get PyTorch's own fp32 matmul peak, timed in the same rounds, and oftjax's
compiled flops of the same math, so every oftjax/PEFT comparison has a wall-clock ratio and
each framework's fraction of its own peak. `--job` adds the main job's step beside the bare
step and PEFT on one Hugging Face folder (`bench_job`); `--flops-at` compiles (never runs)
OFT v1 and OFTv2 at a large d_model. Flops are scan-aware (`bench_jax.compiled_costs`).

Usage:
  python experiments/benchmark.py --quick --job --xla-variants eigen   # this machine's row
  python experiments/benchmark.py --out experiments/benchmark_plots/results_full.json \
      --plots experiments/benchmark_plots       # full grid (~35 min on 2 shared cores)
  python experiments/benchmark.py --smoke --out /tmp/smoke.json   # seconds, for the tests
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_must_hold import V1_SWEEP, check, must_hold  # noqa: E402 (needs HERE on sys.path)

JAX_METHODS = ("floor", "oft", "oftv1", "lora16", "lora_match", "full")
PEFT_METHODS = ("peft_oft", "peft_lora16")
ALL = JAX_METHODS + PEFT_METHODS
# The oftjax method whose compiled flops a PEFT method's step computes (same model, adapter
# and batch), for its fraction of PyTorch's matmul peak.
SAME_MATH = {"peft_oft": "oft", "peft_lora16": "lora16"}
JOB_SHAPES = {
  # Gemma-3-shaped (head_dim 128, GQA 2:1), the shape issue 17 measured the job on.
  "default": dict(
    d_model=1024,
    ffn=4096,
    layers=4,
    vocab=4096,
    heads=8,
    kv_heads=4,
    head_dim=128,
    batch=4,
    seq=256,
    block_size=32,
  ),
  "smoke": dict(
    d_model=64,
    ffn=128,
    layers=2,
    vocab=128,
    heads=2,
    kv_heads=1,
    head_dim=32,
    batch=2,
    seq=32,
    block_size=16,
  ),
}


def _grid(mode: str) -> list[dict]:
  """Configurations per mode: `sweep` names the axis a plot runs along."""

  def cfg(sweep, d, tokens, b, methods=ALL, seq=512):
    return dict(
      sweep=sweep, d_model=d, tokens=tokens, block_size=b, seq=min(seq, tokens), methods=methods
    )

  if mode == "smoke":
    return [cfg("d_model", 256, 64, 16, seq=64)]
  few = ("floor", "oft", "oftv1", "lora16", "lora_match", "peft_oft")
  if mode == "quick":
    # d_model 4096 times only what issue 17's OFT v1 claim needs (one OFT v1 step: ~30 s).
    return [cfg("d_model", d, 512, 32) for d in (512, 1024, 2048)] + [
      cfg(V1_SWEEP, 4096, 512, 32, ("floor", "oft", "oftv1"))
    ]
  return (
    [cfg("d_model", d, 512, 32) for d in (512, 1024, 2048, 4096)]
    + [cfg("tokens", 1024, t, 32) for t in (2048, 4096)]
    + [cfg("block_size", 1024, 512, b, few) for b in (16, 64, 128)]
  )


def _timing(mode):
  # (seconds of timed steps each method may spend per config, min steps, max steps)
  return {"smoke": (1.0, 1, 1), "quick": (8.0, 2, 3), "full": (30.0, 1, 6)}[mode]


def run_config(spec, mode, args, log):
  import bench_jax

  methods = [m for m in spec["methods"] if m in args.methods]
  jax_methods = [m for m in methods if m in JAX_METHODS]
  log(
    f"config {spec['sweep']}: d_model={spec['d_model']} tokens={spec['tokens']} "
    f"b={spec['block_size']}"
  )
  runners, info = bench_jax.build_jax_runners(
    spec["d_model"],
    spec["tokens"],
    spec["block_size"],
    spec["seq"],
    jax_methods,
    layers=args.layers,
    log=log,
  )
  peft_methods = [m for m in methods if m in PEFT_METHODS]
  if peft_methods:
    import bench_peft

    tokens = np.asarray(next(iter(runners.values())).tokens)
    runners.update(
      bench_peft.build_peft_runners(
        spec["d_model"],
        spec["block_size"],
        spec["seq"],
        tokens,
        peft_methods,
        layers=args.layers,
        log=log,
      )
    )
  # The matmul peaks take part in the round-robin too, so they see the same machine load.
  n = 256 if mode == "smoke" else 2048
  runners["matmul_peak"] = bench_jax.PeakRunner(n)
  if peft_methods:
    runners["torch_matmul_peak"] = bench_peft.TorchPeakRunner(n)
  results = round_robin(runners, *_timing(mode), log)
  peak = results.pop("matmul_peak")
  torch_peak = results.pop("torch_matmul_peak", None)
  log(f"  matmul peak interleaved with these steps: {peak['flops_per_s'] / 1e9:.1f} GFLOP/s")
  entry = {"sweep": spec["sweep"], "config": info, "methods": results, "matmul_peak": peak}
  if torch_peak is not None:
    entry["torch_matmul_peak"] = torch_peak
  return entry


def round_robin(runners, budget, min_steps, max_steps, log):
  """Times every runner's `step()` in rounds (one step of each per round).

  A warm-up step first (first execution, page faults, allocator) sets how many timed steps
  each may take within `budget` seconds. Runners named `*matmul_peak` get
  `flops_per_s`.

  Returns:
    `{name: stats}` with `step_s` (median), `step_times_s`, `steps_timed`,
    `final_loss` and `framework`; every runner is closed.
  """
  planned, times = {}, {name: [] for name in runners}
  for name, r in runners.items():
    t0 = time.perf_counter()
    r.step()
    warm = time.perf_counter() - t0
    r.stats["warmup_s"] = warm
    planned[name] = int(np.clip(budget // max(warm, 1e-6), min_steps, max_steps))
  for i in range(max(planned.values())):
    for name, r in runners.items():
      if i < planned[name]:
        t0 = time.perf_counter()
        r.step()
        times[name].append(time.perf_counter() - t0)
  results = {}
  for name, r in runners.items():
    stats = dict(r.stats)
    stats.update(
      step_s=float(np.median(times[name])),
      step_times_s=times[name],
      steps_timed=len(times[name]),
      final_loss=r.loss,
      framework="torch" if name.startswith(("peft", "torch")) else "jax",
    )
    if name.endswith("matmul_peak"):
      stats["flops_per_s"] = stats["flops"] / stats["step_s"]
    results[name] = stats
    log(
      f"  {name:17s} {stats['step_s']:8.3f}s/step (x{len(times[name])})"
      + (
        f" {stats['flops'] / 1e9:9.1f} GFLOP temp {stats['temp_bytes'] / 2**20:8.1f} MiB"
        if "temp_bytes" in stats
        else ""
      )
    )
    r.close()
  del runners
  gc.collect()
  return results


def _time_ratio(a, b):
  """Median over rounds of `a`'s step time / `b`'s in the same round.

  Robust to load drift (both ran back to back); the ratio of medians when a method has one
  timed step.
  """
  n = min(len(a["step_times_s"]), len(b["step_times_s"]))
  if n < 2:
    return a["step_s"] / b["step_s"]
  return float(np.median([x / y for x, y in zip(a["step_times_s"][:n], b["step_times_s"][:n])]))


def add_ratios(entry, peak_flops):
  """Ratios to OFTv2, and FLOP/s as a fraction of the matmul peak.

  The peak is the one measured round-robin with this config's steps (`peak_flops`, the
  start/end-of-run peak, only if that is missing).
  """
  m = entry["methods"]
  if "matmul_peak" in entry:
    peak_flops = entry["matmul_peak"]["flops_per_s"]
  torch_peak = entry.get("torch_matmul_peak", {}).get("flops_per_s")
  ref = m.get(entry.get("reference", "oft"))
  for name, s in m.items():
    source = entry.get("same_math", SAME_MATH).get(name)
    if "flops" not in s and source in m:  # PyTorch has no compiled count: the same math's
      s["flops"], s["flops_from"] = m[source]["flops"], source
    own_peak = torch_peak if s.get("framework") == "torch" else peak_flops
    if "flops" in s and own_peak:
      s["achieved_flops_per_s"] = s["flops"] / s["step_s"]
      s["fraction_of_peak"] = s["achieved_flops_per_s"] / own_peak
    if ref is None:
      continue
    s["time_vs_oft"] = _time_ratio(s, ref)
    if "flops" in s:
      s["flops_vs_oft"] = s["flops"] / ref["flops"]
    if "temp_bytes" in s:
      s["temp_vs_oft"] = s["temp_bytes"] / max(ref["temp_bytes"], 1)
  ratios = {}

  def ratio(key, a, b, field="step_s"):
    if a in m and b in m:
      ratios[key] = (
        _time_ratio(m[a], m[b]) if field == "step_s" else m[a][field] / max(m[b][field], 1e-12)
      )

  ratio("oftv1_over_oft_time", "oftv1", "oft")
  ratio("oftv1_over_oft_temp", "oftv1", "oft", "temp_bytes")
  ratio("oftv1_over_oft_flops", "oftv1", "oft", "flops")
  ratio("oft_over_lora16_time", "oft", "lora16")
  ratio("oft_over_floor_time", "oft", "floor")
  ratio("oft_over_floor_flops", "oft", "floor", "flops")
  ratio("lora16_over_floor_time", "lora16", "floor")
  ratio("lora16_over_full_time", "lora16", "full")
  ratio("peft_oft_over_oft_time", "peft_oft", "oft")
  ratio("peft_lora16_over_lora16_time", "peft_lora16", "lora16")
  ratio("job_over_bare_time", "job", "bare")
  ratio("job_over_bare_flops", "job", "bare", "flops")
  ratio("peft_oft_over_job_time", "peft_oft", "job")
  ratio("peft_oft_over_bare_time", "peft_oft", "bare")
  # Each framework against its own matmul library: > 1 means oftjax's step gets more of
  # XLA's peak than PEFT's gets of PyTorch's (the same model flops on both sides).
  for ours, theirs in (("oft", "peft_oft"), ("lora16", "peft_lora16"), ("job", "peft_oft")):
    ratio(f"{ours}_over_{theirs}_peak_fraction", ours, theirs, "fraction_of_peak")
  entry["ratios"] = ratios


def run_job(shape, mode, variants, log):
  """The job's step beside the bare step and PEFT's OFT on one folder (`bench_job`)."""
  import tempfile

  import bench_job

  log(f"job: {', '.join(f'{k}={v}' for k, v in shape.items())}")
  with tempfile.TemporaryDirectory(prefix="oftjax_bench_job_") as folder:
    bench_job.make_folder(folder, shape)
    runners, info = bench_job.build_job_runners(folder, shape, log=log)
    for name in variants:
      runners[f"bare[{name}]"] = bench_job.BareRunner(
        runners["job"], runners["bare"].tokens, XLA_VARIANTS[name]
      )
      log(f"  built bare[{name}] (compiler options {XLA_VARIANTS[name]})")
    results = round_robin(runners, *_job_timing(mode), log)
  peak, torch_peak = results.pop("matmul_peak"), results.pop("torch_matmul_peak")
  entry = {
    "sweep": "job",
    "config": info,
    "methods": results,
    "matmul_peak": peak,
    "torch_matmul_peak": torch_peak,
    "reference": "bare",
    "same_math": {"peft_oft": "bare"},
  }
  job = results["job"]
  job["real_tokens_per_step"] = float(np.mean(job["real_tokens_per_step"]))
  job["tokens_per_s"] = job["real_tokens_per_step"] / job["step_s"]
  for name in results:
    if name.startswith("bare["):
      results[name]["time_vs_default"] = _time_ratio(results[name], results["bare"])
  return entry


def _job_timing(mode):
  # (seconds of timed steps each runner may spend, min steps, max steps)
  return {"smoke": (1.0, 2, 2), "quick": (25.0, 3, 6), "full": (60.0, 4, 10)}[mode]


# XLA CPU compiler options the job mode can A/B on the bare step (`--xla-variants`): the
# default sends dots to YNNPACK; "eigen" keeps them in XLA's own (Eigen) kernels;
# "ynn_all" also hands elementwise ops and reductions to YNNPACK.
XLA_VARIANTS = {
  "eigen": {"xla_cpu_experimental_ynn_fusion_type": ""},
  "ynn_all": {
    "xla_cpu_experimental_ynn_fusion_type": (
      "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_REDUCE"
    )
  },
  "onednn": {"xla_cpu_experimental_ynn_fusion_type": "", "xla_cpu_use_onednn": True},
}


def flops_check(d_model, log):
  """OFT v1 against OFTv2 at `d_model` from compiled figures alone (nothing is run)."""
  import bench_jax

  log(f"compiled flops at d_model={d_model} (compile only)")
  costs = bench_jax.compile_only(d_model, 512, 32, 512, ("oft", "oftv1"), log=log)
  return {
    "d_model": d_model,
    "tokens": 512,
    "block_size": 32,
    "methods": costs,
    "oftv1_over_oft_flops": costs["oftv1"]["flops"] / costs["oft"]["flops"],
    "oftv1_over_oft_temp": costs["oftv1"]["temp_bytes"] / costs["oft"]["temp_bytes"],
  }


def targets(configs):
  """Targets from the issue, judged on the largest d_model of the d_model sweep."""
  sweep = [c for c in configs if c["sweep"] == "d_model"] or configs
  big = max(sweep, key=lambda c: (c["config"]["d_model"], c["config"]["tokens"]))
  r, m = big["ratios"], big["methods"]
  checks = {
    "oftv1_over_oft_time >= 10": r.get("oftv1_over_oft_time"),
    "oftv1_over_oft_temp >= 3": r.get("oftv1_over_oft_temp"),
    "oft_over_lora16_time <= 1.05": r.get("oft_over_lora16_time"),
    "oft_over_floor_time <= 1.10": r.get("oft_over_floor_time"),
    "peft_oft_over_oft_time >= 1.5": r.get("peft_oft_over_oft_time"),
    "oft_fraction_of_peak >= 0.6": m.get("oft", {}).get("fraction_of_peak"),
  }
  out = {}
  for key, value in checks.items():
    name, op, bound = key.split()
    out[name] = {k: v for k, v in check(name, value, op, float(bound)).items() if k != "name"}
  return {"config": big["config"], "checks": out}


def machine(threads):
  import jax

  info = {
    "python": platform.python_version(),
    "platform": platform.platform(),
    "processor": platform.processor() or platform.machine(),
    "cpus": os.cpu_count(),
    "threads": threads,
    "jax": jax.__version__,
    "jax_backend": jax.default_backend(),
    "dtype": "float32",
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }
  try:
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    info["cpu_model"] = names[0] if names else ""
  except OSError:
    pass
  info.update(lscpu())
  info["loadavg_start"] = os.getloadavg()
  return info


def lscpu() -> dict:
  """The CPU as `lscpu` names it (model, cores, caches, the ISA extensions that matter)."""
  import subprocess

  try:
    text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
  except (OSError, subprocess.SubprocessError):
    return {}
  fields = dict(
    (k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in text.splitlines()) if v
  )
  flags = set(fields.get("Flags", "").split())
  keep = ("Model name", "Vendor ID", "CPU(s)", "Thread(s) per core", "L2 cache", "L3 cache")
  out = {"lscpu": {k: fields[k] for k in keep if k in fields}}
  out["lscpu"]["isa"] = sorted(
    f for f in flags if f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
  )
  if fields.get("Model name"):
    out["cpu_model"] = fields["Model name"]
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument("--quick", action="store_true", help="a small subset (<= ~5 min, 2 cores)")
  mode.add_argument("--smoke", action="store_true", help="one tiny config (seconds; tests)")
  parser.add_argument(
    "--out",
    default=None,
    help="JSON results file (default: experiments/results/benchmark/<cpu>_<mode>.json, "
    "the per-machine runs that render_docs.py quotes)",
  )
  parser.add_argument("--plots", default=None, help="folder for PNG plots (none if unset)")
  parser.add_argument(
    "--methods", default=",".join(ALL), help=f"comma-separated subset of {','.join(ALL)}"
  )
  parser.add_argument("--layers", type=int, default=1, help="decoder layers per stack")
  parser.add_argument(
    "--threads",
    type=int,
    default=len(os.sched_getaffinity(0)),
    help="torch threads (XLA uses all cores it sees)",
  )
  parser.add_argument(
    "--job",
    action="store_true",
    help="also time the main job's step against the bare step and PEFT on one HF folder",
  )
  parser.add_argument(
    "--no-grid", action="store_true", help="skip the method grid (e.g. with --job or --flops-at)"
  )
  parser.add_argument(
    "--job-shape",
    default="",
    help="job folder shape overrides, e.g. d_model=2048,layers=2 (keys of JOB_SHAPES)",
  )
  parser.add_argument(
    "--xla-variants",
    default="",
    help=f"A/B the job's bare step under XLA CPU compiler options: {','.join(XLA_VARIANTS)}",
  )
  parser.add_argument(
    "--flops-at",
    type=int,
    default=None,
    help="compile-only OFT v1 vs OFTv2 flops at this d_model (default 4096; 0: skip)",
  )
  args = parser.parse_args(argv)
  args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  unknown = sorted(set(args.methods) - set(ALL))
  if unknown:
    parser.error(f"unknown methods {unknown}; choose from {','.join(ALL)}")
  variants = [v.strip() for v in args.xla_variants.split(",") if v.strip()]
  if sorted(set(variants) - set(XLA_VARIANTS)):
    parser.error(f"unknown --xla-variants; choose from {','.join(XLA_VARIANTS)}")
  mode_name = "smoke" if args.smoke else "quick" if args.quick else "full"
  shape = dict(JOB_SHAPES["smoke" if args.smoke else "default"])
  for item in filter(None, args.job_shape.split(",")):
    key, _, value = item.partition("=")
    if key not in shape:
      parser.error(f"--job-shape: unknown key {key!r}; choose from {','.join(shape)}")
    shape[key] = int(value)
  flops_at = args.flops_at if args.flops_at is not None else (0 if args.smoke else 4096)
  t_start = time.perf_counter()
  log = lambda *a: print(*a, flush=True)

  import bench_jax
  import bench_peft

  info = machine(args.threads)
  info.update(bench_peft.configure_threads(args.threads))
  n = 256 if args.smoke else 2048
  peaks = [bench_jax.matmul_peak(n)]
  torch_peaks = [bench_peft.torch_matmul_peak(n)]
  log(
    f"matmul peak (n={n}): XLA {peaks[0]['flops_per_s'] / 1e9:.1f} GFLOP/s, torch "
    f"{torch_peaks[0]['flops_per_s'] / 1e9:.1f} GFLOP/s"
  )
  configs = []
  if not args.no_grid:
    for spec in _grid(mode_name):
      configs.append(run_config(spec, mode_name, args, log))
  job = run_job(shape, mode_name, variants, log) if args.job else None
  check = flops_check(flops_at, log) if flops_at else None
  peaks.append(bench_jax.matmul_peak(n))
  torch_peaks.append(bench_peft.torch_matmul_peak(n))
  log(
    f"matmul peak again: XLA {peaks[1]['flops_per_s'] / 1e9:.1f} GFLOP/s, torch "
    f"{torch_peaks[1]['flops_per_s'] / 1e9:.1f} GFLOP/s"
  )
  peak = max(p["flops_per_s"] for p in peaks)
  for entry in configs + ([job] if job else []):
    add_ratios(entry, peak)
  info["loadavg_end"] = os.getloadavg()
  result = {
    "mode": mode_name,
    "machine": info,
    "matmul_peak": {"flops_per_s": peak, "measurements": peaks},
    "torch_matmul_peak": {
      "flops_per_s": max(p["flops_per_s"] for p in torch_peaks),
      "measurements": torch_peaks,
    },
    "configs": configs,
    "wall_s": time.perf_counter() - t_start,
    "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
  }
  if configs:
    result["targets"] = targets(configs)
  if job:
    result["job"] = job
  if mode_name == "quick":
    result["must_hold"] = must_hold(configs, job)
  if check:
    result["flops_check"] = check
  if args.out is None:
    slug = re.sub(r"[^a-z0-9]+", "-", info.get("cpu_model", "cpu").lower()).strip("-")
    # A run with the grid is this machine's row; a partial one gets a file of its own.
    parts = [] if not args.no_grid else ["job"] * args.job + ["flops"] * bool(flops_at)
    kind = "_".join([mode_name] + parts)
    args.out = os.path.join(HERE, "results", "benchmark", f"{slug}_{kind}.json")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  import bench_report

  log(bench_report.markdown(result))
  if "must_hold" in result:
    import bench_must_hold

    log(bench_must_hold.markdown(result))
  if args.plots:
    for path in bench_report.plots(result, args.plots):
      log(f"wrote {path}")
  log(f"wrote {args.out} ({result['wall_s']:.0f}s)")
  return result


if __name__ == "__main__":
  main()
