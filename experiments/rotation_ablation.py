"""Where OFTv2's time over the no-adapter floor goes: the blocks or the rotation.

    python experiments/rotation_ablation.py      # d_model 1024 and 2048, ~3 min on 2 cores

The bare benchmark step (`bench_jax`: one Gemma-3-shaped layer, 512 tokens, b=32, all
seven projections) is built four times in one process and timed round-robin
(`benchmark.round_robin`):

* `floor`: no adapter; `oft`: OFTv2 as shipped.
* `oft_no_neumann`: the rotation applied with `I` in place of the Cayley–Neumann blocks
  (the packed parameters still reach the loss through `0 · sum`), so the blocks' cost goes.
* `oft_no_rotation`: the blocks built as shipped, the activations left unrotated (the blocks
  still reach the loss through `0 · sum`), so the rotation's cost goes.

Each variant swaps one function of `oftjax.orthogonal` while its step is traced; the ratios
to the floor say what each part costs. Writes `experiments/results/rotation_ablation.json`,
which `render_docs.py` renders into BENCHMARKS.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))

import bench_jax  # noqa: E402
import benchmark  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from oftjax import atomic, orthogonal  # noqa: E402

RESULT = os.path.join(HERE, "results", "rotation_ablation.json")
D_MODELS, TOKENS, BLOCK = (1024, 2048), 512, 32


def _identity_blocks(packed, block_size, *args, **kwargs):
  return jnp.eye(block_size) + 0.0 * jnp.sum(packed, axis=-1)[..., None, None]


def _no_rotation(x, blocks, precision="highest"):
  return x + (0.0 * jnp.sum(blocks)).astype(x.dtype)


VARIANTS = {
  "oft_no_neumann": ("orthogonal_blocks", _identity_blocks),
  "oft_no_rotation": ("rotate", _no_rotation),
}


@contextlib.contextmanager
def _swapped(name, fn):
  original = getattr(orthogonal, name)
  setattr(orthogonal, name, fn)
  try:
    yield
  finally:
    setattr(orthogonal, name, original)


def ablate(d_model: int, log=print) -> dict:
  """Times floor, OFTv2 and both ablations at `d_model`; returns their stats and ratios."""
  runners, _ = bench_jax.build_jax_runners(
    d_model, TOKENS, BLOCK, TOKENS, ["floor", "oft"], log=log
  )
  for variant, (name, fn) in VARIANTS.items():
    with _swapped(name, fn):
      built, _ = bench_jax.build_jax_runners(d_model, TOKENS, BLOCK, TOKENS, ["oft"], log=log)
    runners[variant] = built["oft"]
  results = benchmark.round_robin(runners, 20.0, 6, 12, log)
  floor = results["floor"]
  return {
    "d_model": d_model,
    "tokens": TOKENS,
    "block_size": BLOCK,
    "methods": {k: {"step_s": v["step_s"], "flops": v["flops"]} for k, v in results.items()},
    "over_floor": {k: benchmark._time_ratio(v, floor) for k, v in results.items()},
  }


def main() -> None:
  t0 = time.perf_counter()
  configs = [ablate(d) for d in D_MODELS]
  machine = benchmark.lscpu()
  result = {
    "cpu_model": machine.get("cpu_model", ""),
    "configs": configs,
    "wall_s": time.perf_counter() - t0,
    "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
  }
  atomic.write_json(RESULT, result, indent=1)
  print(json.dumps({c["d_model"]: c["over_floor"] for c in configs}, indent=1))


if __name__ == "__main__":
  main()
