"""One-command GPU benchmark: oftjax against Hugging Face PEFT in bf16 on H200-sized layers.

    python experiments/gpu_benchmark.py                  # on the GPU machine (<= ~8 min)
    python experiments/gpu_benchmark.py --tiny --out-dir /tmp/gpu_dry   # CPU dry run, seconds

Writes `gpu_benchmark.json` and PNG plots into `--out-dir` (default `$OUT`, else
`gpu_benchmark_results`). Per d_model (one Gemma-3-shaped decoder layer, 8192 tokens per
step, b=32, all 7 projections): the floor, OFTv2, LoRA r=16, the original OFT (up to
d_model 4096) and, where PEFT and a CUDA PyTorch are installed, PEFT's OFT and LoRA, timed
round-robin in one process, each against its own framework's bf16 matmul peak measured in
the same rounds (`benchmark.round_robin`, `benchmark.add_ratios`).

Setting up: if JAX sees no GPU, `pip install "jax[cuda12]==<the installed jax version>"`
runs first (the pinned version stays pinned); a CUDA PyTorch is installed only if torch
is absent or has no CUDA (`--no-install` skips both). `--tiny` never installs: it runs
tiny shapes on whatever backend JAX has (the CPU here), to check the script end to end.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

GPU_GRID = [  # (d_model, tokens per step, seq, methods)
  (2048, 8192, 2048, ("floor", "oft", "lora16", "oftv1")),
  (4096, 8192, 2048, ("floor", "oft", "lora16", "oftv1")),
  (8192, 8192, 2048, ("floor", "oft", "lora16")),
]
TINY_GRID = [(64, 64, 32, ("floor", "oft", "lora16", "oftv1")), (128, 64, 32, ("oft", "lora16"))]
PEFT_OF = {"oft": "peft_oft", "lora16": "peft_lora16"}


def _probe(code: str) -> str:
  """Runs `code` in a fresh interpreter (no import here can be undone) and returns stdout."""
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  return out.stdout.strip()


def ensure_gpu_stack(log, find_links: str = "") -> None:
  """Installs JAX's CUDA plugin (same jax version) and a CUDA PyTorch where they are missing.

  With `find_links` pip installs from that folder of wheels only (a machine without a
  package index).
  """
  pip = [sys.executable, "-m", "pip", "install", "-q"]
  if find_links:
    pip += ["--no-index", "--find-links", find_links]
  backend = _probe("import jax; print(jax.default_backend())")
  if backend != "gpu":
    version = importlib.metadata.version("jax")
    log(f"JAX backend is {backend or 'unavailable'}: installing jax[cuda12]=={version}")
    subprocess.run(pip + [f"jax[cuda12]=={version}"], check=True)
  has_torch_cuda = _probe("import torch; print(torch.cuda.is_available())")
  if has_torch_cuda != "True":
    log("no CUDA PyTorch: installing torch from the CUDA 12 index")
    subprocess.run(
      pip
      + ["torch>=2.4,<=2.14.1"]
      + ([] if find_links else ["--index-url", "https://download.pytorch.org/whl/cu128"]),
      check=False,  # PEFT rows are skipped if this fails; oftjax's still run
    )


def _peft_available(device: str) -> bool:
  try:
    import peft  # noqa: F401
    import torch
  except ImportError:
    return False
  return device == "cpu" or torch.cuda.is_available()


def run(args, log) -> dict:
  import bench_jax
  import bench_report
  import benchmark
  import jax
  import jax.numpy as jnp

  backend = jax.default_backend()
  device = "cuda" if backend == "gpu" else "cpu"
  with_peft = not args.no_peft and _peft_available(device)
  if with_peft:
    import bench_peft

    bench_peft.configure_threads(len(os.sched_getaffinity(0)))
  dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[args.dtype]
  grid = TINY_GRID if args.tiny else GPU_GRID
  timing = (0.5, 2, 3) if args.tiny else (args.seconds, 5, 40)
  peak_n = 256 if args.tiny else 8192
  configs = []
  t_start = time.perf_counter()
  for d_model, tokens, seq, methods in grid:
    log(f"config d_model={d_model} tokens={tokens} ({args.dtype}, {backend})")
    runners, info = bench_jax.build_jax_runners(
      d_model, tokens, 32 if d_model >= 256 else 16, seq, methods, log=log, dtype=dtype
    )
    peft_methods = [PEFT_OF[m] for m in methods if m in PEFT_OF] if with_peft else []
    if peft_methods:
      toks = runners["oft"].tokens
      runners.update(
        bench_peft.build_peft_runners(
          d_model,
          info["block_size"],
          seq,
          jax.device_get(toks),
          peft_methods,
          log=log,
          dtype=args.dtype,
          device=device,
        )
      )
      runners["torch_matmul_peak"] = bench_peft.TorchPeakRunner(peak_n, args.dtype, device)
    runners["matmul_peak"] = bench_jax.PeakRunner(peak_n, dtype)
    results = benchmark.round_robin(runners, *timing, log)
    entry = {"sweep": "d_model", "config": info, "methods": results}
    entry["matmul_peak"] = results.pop("matmul_peak")
    if "torch_matmul_peak" in results:
      entry["torch_matmul_peak"] = results.pop("torch_matmul_peak")
    benchmark.add_ratios(entry, entry["matmul_peak"]["flops_per_s"])
    configs.append(entry)
  result = {
    "mode": "tiny" if args.tiny else "gpu",
    "machine": _machine(backend, args.dtype),
    "matmul_peak": {"flops_per_s": max(e["matmul_peak"]["flops_per_s"] for e in configs)},
    "configs": configs,
    "targets": benchmark.targets(configs),
    "wall_s": time.perf_counter() - t_start,
    "plot_title": f"1 Gemma-3-shaped layer, {args.dtype}, {_machine(backend, args.dtype)['device']}",
  }
  os.makedirs(args.out_dir, exist_ok=True)
  path = os.path.join(args.out_dir, "gpu_benchmark.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  log(bench_report.markdown(result))
  for png in bench_report.plots(result, args.out_dir):
    log(f"wrote {png}")
  log(f"wrote {path} ({result['wall_s']:.0f}s)")
  return result


def _machine(backend: str, dtype: str) -> dict:
  import jax

  info = {
    "jax": jax.__version__,
    "jax_backend": backend,
    "device": str(jax.devices()[0].device_kind),
    "dtype": dtype,
    "threads": len(os.sched_getaffinity(0)),
    "cpus": os.cpu_count(),
  }
  try:
    import torch

    info["torch"] = torch.__version__
    if torch.cuda.is_available():
      info["torch_device"] = torch.cuda.get_device_name(0)
  except ImportError:
    pass
  return info


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--tiny", action="store_true", help="tiny shapes, no install (dry run)")
  parser.add_argument(
    "--out-dir",
    default=os.environ.get("OUT") or "gpu_benchmark_results",
    help="where gpu_benchmark.json and the plots go (default $OUT)",
  )
  parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  parser.add_argument("--seconds", type=float, default=4.0, help="timed seconds per method")
  parser.add_argument("--no-install", action="store_true", help="never pip install anything")
  parser.add_argument("--no-peft", action="store_true", help="oftjax only")
  parser.add_argument("--find-links", default="", help="install from this wheel folder only")
  args = parser.parse_args(argv)
  log = lambda *a: print(*a, flush=True)
  if not args.tiny and not args.no_install:
    ensure_gpu_stack(log, args.find_links)
  return run(args, log)


if __name__ == "__main__":
  main()
