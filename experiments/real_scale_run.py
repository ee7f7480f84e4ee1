"""The job on real-shaped checkpoints: load time, peak host RSS, tokens/s, phases, step memory.

    python experiments/real_scale_run.py                  # everything (about 30 min on 2 cores)
    python experiments/real_scale_run.py gemma-3-1b-pt    # one model
    python experiments/real_scale_run.py --memory-only    # compiled step memory only

For each model a random-weight folder with the real model's dimensions is made in a
temporary folder (`experiments/make_real_shaped.py`), and the job
(`experiments/finetune_gemma.py`, OFT b=32, a few steps of one 512-token row, merged export)
runs on it in a subprocess whose resident memory is sampled every 0.1 s. The job's own
`summary.json` gives the phase times and tokens/s; the samples give the peak RSS of each
phase. Separately, in a fresh process per configuration, the job's train step is compiled
on abstract shapes (no weights) with and without rematerialisation, in fp32 (what this
machine runs) and bf16 (what a GPU run uses), and `memory_analysis()` gives its bytes.
Writes `experiments/results/real_scale.json`; `experiments/render_docs.py` renders it into
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from oftjax import atomic  # noqa: E402

RESULT = os.path.join(ROOT, "experiments", "results", "real_scale.json")
JOB = os.path.join(ROOT, "experiments", "finetune_gemma.py")
MAKE = os.path.join(ROOT, "experiments", "make_real_shaped.py")
TASK = os.path.join(ROOT, "experiments", "assets", "task", "train.jsonl")

# name -> (make_real_shaped arguments, job dtype, why this cut). Gemma 4 E2B's full text
# decoder is ~4.6B parameters (its per-layer-embedding table alone 262144 x 35 x 256): fp32
# 18.6 GB, too much for a 24 GiB machine once training temporaries are added, and its bf16
# job does not fit either (BENCHMARKS.md). It runs depth-reduced in fp32: real widths, the
# first 10 layers (the same pattern, the last 4 KV-shared as in the real 35-layer model's
# proportion); the full model's step is compiled on shapes alone (MEMORY_MODELS).
MODELS = {
  "gemma-3-1b-pt": (["gemma-3-1b-pt"], "float32", "real dimensions, all 26 layers"),
  "gemma-4-E2B-10L": (
    ["gemma-4-E2B", "--layers", "10"],
    "float32",
    "real widths, first 10 of 35 layers, fp32",
  ),
}
# Two steps (the second is the steady-state one) and a 4-example eval set with no retention
# set: on 2 shared cores a 1B model's forward pass over one 512-token row takes minutes, and
# the job evaluates the held-out loss over every row of --eval-data, before and after.
STEPS, BATCH, SEQ, BLOCK, EVAL_ROWS = 2, 1, 512, 32, 4
JOB_FLAGS = [
  "--method",
  "oft",
  "--block-size",
  str(BLOCK),
  "--steps",
  str(STEPS),
  "--batch-size",
  str(BATCH),
  "--seq-len",
  str(SEQ),
  "--eval-limit",
  str(EVAL_ROWS),
  "--retention-data",
  "",
  "--log-every",
  "1",
  "--save-every",
  str(STEPS),
]
# (dtype, remat, batch, seq) of each compiled-memory figure.
MEMORY_CONFIGS = [
  ("float32", False, 1, 512),
  ("float32", True, 1, 512),
  ("bfloat16", False, 8, 1024),
  ("bfloat16", True, 8, 1024),
]
# Compiled memory needs only a config: the full Gemma 4 E2B is compiled too.
MEMORY_MODELS = {
  "gemma-3-1b-pt": ["gemma-3-1b-pt"],
  "gemma-4-E2B": ["gemma-4-E2B"],
}


def _env() -> dict:
  paths = [ROOT, os.path.join(ROOT, "experiments"), os.environ.get("PYTHONPATH", "")]
  return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p))


class RssSampler:
  """Samples a process's resident set size (with its children) every `interval` seconds."""

  def __init__(self, pid: int, interval: float = 0.1):
    import psutil

    self.process, self.interval = psutil.Process(pid), interval
    self.samples: list[tuple[float, int]] = []
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  def _run(self):
    import psutil

    while True:
      try:
        procs = [self.process] + self.process.children(recursive=True)
        rss = sum(p.memory_info().rss for p in procs)
      except psutil.NoSuchProcess:
        return
      self.samples.append((time.time(), rss))
      time.sleep(self.interval)

  def join(self):
    self._thread.join(timeout=5)

  def peak(self, start: float = 0.0, end: float = float("inf")) -> int:
    return max((r for t, r in self.samples if start <= t <= end), default=0)


def _make_folder(name: str, scratch: str) -> tuple[str, dict]:
  """Makes `name`'s random-weight folder under `scratch`: `(folder, what make_real_shaped said)`."""
  folder = os.path.join(scratch, name)
  t0 = time.time()
  made = subprocess.run(
    [sys.executable, MAKE, *MODELS[name][0], folder],
    env=_env(),
    check=True,
    capture_output=True,
    text=True,
  )
  info = json.loads(made.stdout.strip().splitlines()[-1])
  info["make_s"] = time.time() - t0
  return folder, info


def run_job(name: str, scratch: str, remat: str | None = None, unroll: str | None = None) -> dict:
  """Makes `name`'s folder, runs the job on it, returns the record.

  `remat` and `unroll`, if given, are passed as `--remat` and `--unroll-layers`.
  """
  _, dtype, why = MODELS[name]
  folder, folder_info = _make_folder(name, scratch)
  out, export = os.path.join(scratch, name + "-run"), os.path.join(scratch, name + "-merged")
  eval_data = os.path.join(scratch, "eval_head.jsonl")
  with open(os.path.join(ROOT, "experiments", "assets", "task", "eval.jsonl")) as fh:
    head = [next(fh) for _ in range(EVAL_ROWS)]
  with open(eval_data, "w") as fh:
    fh.writelines(head)
  flags = ["--model", folder, "--dtype", dtype, *JOB_FLAGS, "--output-dir", out]
  flags += ["--eval-data", eval_data]
  flags += ["--export-merged", export]
  flags += ["--remat", remat] if remat else []
  flags += ["--unroll-layers", unroll] if unroll else []
  env = dict(_env(), TQDM_DISABLE="1")
  load_start = os.getloadavg()[0]
  with open(os.path.join(scratch, name + ".log"), "w") as log:
    proc = subprocess.Popen(
      [sys.executable, JOB, *flags], cwd=scratch, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    sampler = RssSampler(proc.pid)
    rc = proc.wait()
    sampler.join()
  printed = open(os.path.join(scratch, name + ".log")).read()
  if rc != 0:
    raise RuntimeError(f"the job failed on {name} (exit {rc}):\n{printed[-3000:]}")
  load_end = os.getloadavg()[0]
  summary = json.load(open(os.path.join(out, "summary.json")))
  export_bytes = sum(
    os.path.getsize(os.path.join(export, f))
    for f in os.listdir(export)
    if f.endswith(".safetensors")
  )
  phases = {}
  for phase, entry in summary["phases"].items():
    start = entry["start"]
    phases[phase] = {
      "s": entry["s"],
      "sampled_peak_rss_bytes": sampler.peak(start, start + entry["s"]),
      "peak_rss_bytes_so_far": entry["peak_rss_bytes"],
    }
  shutil.rmtree(export)
  shutil.rmtree(out)
  shutil.rmtree(folder)
  fp32 = folder_info["fp32_bytes"]
  peak = max(summary["peak_rss_bytes"], sampler.peak())
  return {
    "why": why,
    "folder": folder_info,
    "flags": [f if not f.startswith(scratch) else os.path.relpath(f, scratch) for f in flags],
    "dtype": dtype,
    "frozen_weight_bytes": summary["frozen_weight_bytes"],
    "trainable_params": summary["trainable_params"],
    "total_params": summary["total_params"],
    "load_s": summary["phases"]["load"]["s"],
    "compile_s": summary["compile_s"],
    "train_steps_s": summary["train_steps_s"],
    "step_time_s": summary["step_time_s"],
    "remat": summary["remat"],
    "unroll_layers": summary["unroll_layers"],
    "train_step_temp_bytes": summary["train_step_temp_bytes"],
    "train_tokens_per_s": summary["train_tokens_per_s"],
    "wall_s": summary["wall_s"],
    "outside_train_steps_s": summary["wall_s"] - summary["train_steps_s"],
    "peak_rss_bytes": peak,
    "peak_rss_over_fp32_weights": peak / fp32,
    "peak_rss_over_frozen_weights": peak / summary["frozen_weight_bytes"],
    "export_bytes": export_bytes,
    "phases": phases,
    "final_loss": summary["final_loss"],
    "loadavg_start_end": [load_start, load_end],
  }


_LOAD_CHILD = r"""
import json, sys, time
import jax
from oftjax.models import gemma
from oftjax import params as P
t0 = time.time()
model, params = gemma.load(sys.argv[1])
jax.block_until_ready(params)
print(json.dumps({"load_s": time.time() - t0, "weight_bytes": P.tree_bytes(params)}))
"""


def load_only(name: str, scratch: str) -> dict:
  """Makes `name`'s folder and times `gemma.load` of it alone (RSS sampled), fp32."""
  why = MODELS[name][2]
  folder, folder_info = _make_folder(name, scratch)
  load_start = os.getloadavg()[0]
  proc = subprocess.Popen(
    [sys.executable, "-c", _LOAD_CHILD, folder], env=_env(), stdout=subprocess.PIPE, text=True
  )
  sampler = RssSampler(proc.pid)
  out, _ = proc.communicate()
  sampler.join()
  shutil.rmtree(folder)
  if proc.returncode != 0:
    raise RuntimeError(f"loading {name} failed (exit {proc.returncode})")
  loaded = json.loads(out.strip().splitlines()[-1])
  peak = sampler.peak()
  return {
    "why": why,
    "folder": folder_info,
    "load_only": True,
    **loaded,
    "peak_rss_bytes": peak,
    "peak_rss_over_fp32_weights": peak / folder_info["fp32_bytes"],
    "loadavg_start_end": [load_start, os.getloadavg()[0]],
  }


_MEMORY_CHILD = r"""
import json, sys
import jax, jax.numpy as jnp
from oftjax import adapt, data, sharding
from oftjax.models import gemma
from oftjax.train.config import RunConfig, adapter_config
from oftjax.train.objective import make_optimizer
from oftjax.train.run_model import build_run_model
from oftjax.train_step import make_train_step

folder, dtype, remat, batch_size, seq_len, block, task = sys.argv[1:8]
dtype = jnp.dtype(dtype)
model = gemma.load_model(folder, dtype=dtype, param_dtype=dtype, remat=remat == "1")
c = RunConfig(model=folder, block_size=int(block), batch_size=int(batch_size), seq_len=int(seq_len))
adapted = adapt(model, adapter_config(c), jnp.zeros((1, 8), jnp.int32))
frozen = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]
trainable = jax.eval_shape(adapted.init, jax.random.key(0))
job = build_run_model(model, frozen, adapted)
optimizer = make_optimizer(1e-3, 10, 1, 0.0, 1.0)
opt_state = jax.eval_shape(optimizer.init, trainable)
step = make_train_step(job.loss, optimizer, has_aux=True, weight_key="tokens")
tokenizer = data.load_tokenizer(folder)
train = data.load_dataset(task, tokenizer, int(seq_len))
batch = next(data.PackedBatches(train.examples, batch_size=int(batch_size), seq_len=int(seq_len), seed=0))
batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
compiled = step.lower(trainable, opt_state, frozen, batch).compile()
m = compiled.memory_analysis()
print(json.dumps({
  "temp_bytes": m.temp_size_in_bytes,
  "argument_bytes": m.argument_size_in_bytes,
  "output_bytes": m.output_size_in_bytes,
  "alias_bytes": m.alias_size_in_bytes,
  "flops": (compiled.cost_analysis() or {}).get("flops"),
}))
"""


def compiled_memory(name: str, scratch: str, configs=MEMORY_CONFIGS) -> list[dict]:
  """The job's train step compiled on `name`'s shapes, per `MEMORY_CONFIGS` (no weights read)."""
  make_args = MEMORY_MODELS[name]
  folder = os.path.join(scratch, name + "-config")
  # The config and tokenizer are all the compile needs: a folder with one layer's weights
  # would do, but the config must keep every layer, so make it and drop the weights.
  subprocess.run(
    [sys.executable, "-c", _CONFIG_ONLY, folder, *make_args],
    env=_env(),
    check=True,
    capture_output=True,
    text=True,
  )
  rows = []
  for dtype, remat, batch, seq in configs:
    args = [folder, dtype, "1" if remat else "0", str(batch), str(seq), str(BLOCK), TASK]
    done = subprocess.run(
      [sys.executable, "-c", _MEMORY_CHILD, *args],
      env=_env(),
      capture_output=True,
      text=True,
    )
    if done.returncode != 0:
      raise RuntimeError(f"compiling {name} {dtype} remat={remat} failed:\n{done.stderr[-3000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    rows.append({"dtype": dtype, "remat": remat, "batch": batch, "seq_len": seq, **figures})
    _store("compiled_memory", name, rows)  # each figure kept as it lands
    print(
      f"  {name} {dtype} remat={remat} {batch}x{seq}: temp {figures['temp_bytes'] / 2**30:.2f} GiB"
    )
  shutil.rmtree(folder)
  return rows


_CONFIG_ONLY = r"""
import os, shutil, sys
import make_real_shaped as M
folder, name, *rest = sys.argv[1:]
layers = int(rest[1]) if rest else None
config = M.config_for(name, layers)
os.makedirs(folder, exist_ok=True)
config.save_pretrained(folder)
for f in os.listdir(M.TOKENIZER):
  shutil.copy2(os.path.join(M.TOKENIZER, f), os.path.join(folder, f))
"""


def _machine() -> dict:
  import jax

  return {
    "platform": platform.platform(),
    "python": platform.python_version(),
    "jax": jax.__version__,
    "backend": jax.default_backend(),
    "cpu_count": os.cpu_count(),
  }


def _store(section: str, name: str, value) -> None:
  """Sets `result[section][name]` in the results file, re-read first (runs may overlap)."""
  result = json.load(open(RESULT)) if os.path.exists(RESULT) else {}
  result.setdefault(section, {})[name] = value
  result["machine"], result["job_flags"] = _machine(), JOB_FLAGS
  atomic.write_json(RESULT, result, indent=2, sort_keys=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  names = list(dict.fromkeys([*MODELS, *MEMORY_MODELS]))
  parser.add_argument("models", nargs="*", help=f"of {', '.join(names)} (default: all)")
  parser.add_argument("--memory-only", action="store_true", help="only the compiled memory")
  parser.add_argument("--runs-only", action="store_true", help="only the job runs")
  parser.add_argument(
    "--one-row", action="store_true", help="compiled memory of the 1 x 512 step only"
  )
  parser.add_argument(
    "--load-only", action="store_true", help="time the load alone instead of running the job"
  )
  parser.add_argument(
    "--remat",
    default=None,
    help="run the job with this --remat policy (recorded as 'NAME --remat P')",
  )
  parser.add_argument(
    "--unroll-layers",
    default=None,
    choices=("on", "off"),
    help="run the job with this --unroll-layers (recorded as 'NAME --unroll-layers V')",
  )
  args = parser.parse_args()
  if unknown := sorted(set(args.models) - set(names)):
    parser.error(f"unknown model {', '.join(unknown)}: choose from {', '.join(names)}")
  with tempfile.TemporaryDirectory(prefix="oftjax_real_scale_") as scratch:
    for name in args.models or names:
      if not args.runs_only and name in MEMORY_MODELS:
        configs = [m for m in MEMORY_CONFIGS if m[2] == 1] if args.one_row else MEMORY_CONFIGS
        compiled_memory(name, scratch, configs)
      if not args.memory_only and name in MODELS:
        if args.load_only:
          r = load_only(name, scratch)
          _store("loads", name, r)
          print(f"  {name}: load {r['load_s']:.1f} s, peak RSS {r['peak_rss_bytes'] / 1e9:.2f} GB")
          continue
        print(f"running the job on {name} ...", flush=True)
        r = run_job(name, scratch, args.remat, args.unroll_layers)
        label = name + (f" --remat {args.remat}" if args.remat else "")
        label += f" --unroll-layers {args.unroll_layers}" if args.unroll_layers else ""
        _store("runs", label, r)
        print(
          f"  load {r['load_s']:.1f} s, peak RSS {r['peak_rss_bytes'] / 1e9:.2f} GB "
          f"({r['peak_rss_over_fp32_weights']:.2f}x fp32 weights), "
          f"{r['train_tokens_per_s']:.1f} tokens/s, wall {r['wall_s']:.0f} s",
          flush=True,
        )


if __name__ == "__main__":
  main()
