"""Runs the shipped job as `make finetune` does and commits what it printed and summarised.

    python experiments/record_runs.py            # both runs (about 1-2 minutes on 2 cores)
    python experiments/record_runs.py default    # one of them

Each run is `python experiments/finetune_gemma.py [flags]` in a fresh temporary working
directory (so its output folder is the default `runs/finetune`, as after `make finetune`);
`experiments/results/<name>.json` receives the flags, the machine, every line the job
printed, and its `summary.json` with absolute paths made relative to the repository.
`experiments/render_docs.py` quotes these files in the README; nothing else reads them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from oftjax import atomic  # noqa: E402

RESULTS = os.path.join(ROOT, "experiments", "results")
SCRIPT = os.path.join(ROOT, "experiments", "finetune_gemma.py")

# result name -> the job's flags (none: the shipped default run)
RUNS = {
  "default_run": [],
  "default_run_qoft_nf4": ["--quantize", "nf4"],
}


def _relative(value, scratch: str):
  """`value` with absolute paths under the repository or the scratch folder made relative."""
  if isinstance(value, dict):
    return {k: _relative(v, scratch) for k, v in value.items()}
  if isinstance(value, list):
    return [_relative(v, scratch) for v in value]
  if isinstance(value, str):
    for prefix in (scratch, ROOT):
      if value == prefix or value.startswith(prefix + os.sep):
        return os.path.relpath(value, prefix)
  return value


def record(name: str) -> dict:
  """Runs `RUNS[name]` and returns the result record (raises if the job fails)."""
  flags = RUNS[name]
  with tempfile.TemporaryDirectory(prefix="oftjax_record_") as scratch:
    scratch = os.path.realpath(scratch)
    proc = subprocess.run(
      [sys.executable, SCRIPT, *flags],
      cwd=scratch,
      capture_output=True,
      text=True,
      env={**os.environ, "PYTHONPATH": ROOT},
    )
    if proc.returncode != 0:
      raise RuntimeError(f"{name}: the job exited {proc.returncode}: {proc.stderr[-2000:]}")
    with open(os.path.join(scratch, "runs", "finetune", "summary.json")) as f:
      summary = json.load(f)
    return {
      "command": ["python", "experiments/finetune_gemma.py", *flags],
      "machine": {
        "cpus": os.cpu_count(),
        "processor": platform.processor(),
        "python": platform.python_version(),
      },
      "stdout": proc.stdout.splitlines(),
      "summary": _relative(summary, scratch),
    }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("names", nargs="*", default=list(RUNS), help=f"any of {', '.join(RUNS)}")
  args = parser.parse_args(argv)
  unknown = [n for n in args.names if n not in RUNS]
  if unknown:
    print(f"error: unknown run {unknown[0]!r}; choose from {', '.join(RUNS)}", file=sys.stderr)
    return 2
  os.makedirs(RESULTS, exist_ok=True)
  for name in args.names:
    result = record(name)
    path = os.path.join(RESULTS, f"{name}.json")
    atomic.write_json(path, result, indent=1, sort_keys=True, trailing_newline=True)
    print(f"{name}: wrote {os.path.relpath(path, ROOT)}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
