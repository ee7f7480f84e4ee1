"""Benchmarks OFTv2 against the original OFT, LoRA, full finetuning, the floor and PEFT.

One process, one machine, one run: every ratio in the output compares numbers measured
side by side. Per configuration all methods are compiled first, then their steps are
timed round-robin (one step of each method per round), so a slow drift in machine load
hits every method alike. Figures per method: XLA's compiled flops and temp/argument
bytes (deterministic), compile time, median step time after one warm-up step, trainable
params, achieved FLOP/s as a fraction of XLA's fp32 matmul peak measured in the same run.

Usage:
  python experiments/benchmark.py --quick --out results.json --plots experiments/benchmark_plots
  python experiments/benchmark.py                 # full grid (~35 min on 2 shared cores)
  python experiments/benchmark.py --smoke --out /tmp/smoke.json   # seconds, for the tests
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

JAX_METHODS = ("floor", "oft", "oftv1", "lora16", "lora_match", "full")
PEFT_METHODS = ("peft_oft", "peft_lora16")
ALL = JAX_METHODS + PEFT_METHODS


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
    return [cfg("d_model", d, 512, 32) for d in (512, 1024, 2048)]
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
  # The matmul peak takes part in the round-robin too, so it sees the same machine load.
  runners["matmul_peak"] = bench_jax.PeakRunner(256 if mode == "smoke" else 2048)
  budget, min_steps, max_steps = _timing(mode)
  planned, times = {}, {name: [] for name in runners}
  for name, r in runners.items():  # warm-up: first execution, page faults, allocator
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
      framework="torch" if name in PEFT_METHODS else "jax",
    )
    results[name] = stats
    log(
      f"  {name:11s} {stats['step_s']:8.3f}s/step (x{len(times[name])})"
      + (
        f" {stats['flops'] / 1e9:9.1f} GFLOP temp {stats['temp_bytes'] / 2**20:8.1f} MiB"
        if "temp_bytes" in stats
        else ""
      )
    )
    r.close()
  del runners
  gc.collect()
  peak = results.pop("matmul_peak")
  peak["flops_per_s"] = peak["flops"] / peak["step_s"]
  log(f"  matmul peak interleaved with these steps: {peak['flops_per_s'] / 1e9:.1f} GFLOP/s")
  return {"sweep": spec["sweep"], "config": info, "methods": results, "matmul_peak": peak}


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
  ref = m.get("oft")
  for s in m.values():
    if "flops" in s:
      s["achieved_flops_per_s"] = s["flops"] / s["step_s"]
      s["fraction_of_peak"] = s["achieved_flops_per_s"] / peak_flops
    if ref is None:
      continue
    s["time_vs_oft"] = _time_ratio(s, ref)
    if "flops" in s:
      s["flops_vs_oft"] = s["flops"] / ref["flops"]
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
  entry["ratios"] = ratios


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
    met = (
      None if value is None else (value >= float(bound) if op == ">=" else value <= float(bound))
    )
    out[name] = {"value": value, "target": f"{op} {bound}", "met": met}
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
  info["loadavg_start"] = os.getloadavg()
  return info


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument("--quick", action="store_true", help="a small subset (<= ~5 min, 2 cores)")
  mode.add_argument("--smoke", action="store_true", help="one tiny config (seconds; tests)")
  parser.add_argument("--out", default="benchmark_results.json", help="JSON results file")
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
  args = parser.parse_args(argv)
  args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  unknown = sorted(set(args.methods) - set(ALL))
  if unknown:
    parser.error(f"unknown methods {unknown}; choose from {','.join(ALL)}")
  mode_name = "smoke" if args.smoke else "quick" if args.quick else "full"
  t_start = time.perf_counter()
  log = lambda *a: print(*a, flush=True)

  import bench_jax

  info = machine(args.threads)
  if any(m in PEFT_METHODS for m in args.methods):
    import bench_peft

    info.update(bench_peft.configure_threads(args.threads))
  n = 256 if args.smoke else 2048
  peaks = [bench_jax.matmul_peak(n)]
  log(f"matmul peak (n={n}): {peaks[0]['flops_per_s'] / 1e9:.1f} GFLOP/s")
  configs = []
  for spec in _grid(mode_name):
    configs.append(run_config(spec, mode_name, args, log))
  peaks.append(bench_jax.matmul_peak(n))
  log(f"matmul peak again: {peaks[1]['flops_per_s'] / 1e9:.1f} GFLOP/s")
  peak = max(p["flops_per_s"] for p in peaks)
  for entry in configs:
    add_ratios(entry, peak)
  info["loadavg_end"] = os.getloadavg()
  result = {
    "mode": mode_name,
    "machine": info,
    "matmul_peak": {"flops_per_s": peak, "measurements": peaks},
    "configs": configs,
    "targets": targets(configs),
    "wall_s": time.perf_counter() - t_start,
  }
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  import bench_report

  log(bench_report.markdown(result))
  if args.plots:
    for path in bench_report.plots(result, args.plots):
      log(f"wrote {path}")
  log(f"wrote {args.out} ({result['wall_s']:.0f}s)")
  return result


if __name__ == "__main__":
  main()
