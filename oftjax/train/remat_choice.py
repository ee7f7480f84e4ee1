"""`--remat auto`: the least recomputation whose compiled train step fits the memory budget.

The step is compiled with each policy of `CANDIDATES` in turn (`none` first, recomputing
nothing) and XLA's `memory_analysis()` gives its temporary (activation) bytes; the first
within the budget is the one the loop runs, so a step that fits costs no extra compile and
one that does not costs one compile per policy tried.

The budget (`budget_bytes`):
- On a GPU/TPU, 90% of the device memory still free once the weights, adapters and
  optimizer state are placed (`Device.memory_stats()`).
- On CPU the host is the device, and the budget is the weights' own bytes, at least
  `CPU_FLOOR_BYTES` and at most 80% of the host memory now available. Temporaries within
  the weights' size keep the job's peak host memory near twice its weights; below the
  floor, recomputing would cost compute to save memory no machine misses.

A temp figure is per device; on CPU all local devices share the host, so their sum is
compared.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import os

import jax

from oftjax import layer
from oftjax.models.gemma.config_fields import DecoderFields

CANDIDATES = ("none", "dots_no_batch", "full")
CPU_FLOOR_BYTES = 1 << 30
CPU_SHARE, DEVICE_SHARE = 0.8, 0.9


def with_remat(module, policy: str):
  """`module` with its Gemma decoder's remat set to `policy`, through any oftjax wrappers.

  Raises:
    TypeError: `module` holds no Gemma decoder config (nothing to rematerialise).
  """
  return with_decoder_config(module, remat=policy)


def with_decoder_config(module, **changes):
  """`module` with its Gemma decoder's config fields `changes` replaced, through wrappers.

  Through any oftjax wrappers (`Adapted`, `Dequantized`): e.g. `remat=` or `unroll_layers=`.

  Raises:
    TypeError: `module` holds no Gemma decoder config.
  """
  if isinstance(module, layer.InterceptingWrapper):
    field = next(
      f.name for f in dataclasses.fields(module) if getattr(module, f.name) is module.wrapped
    )
    return module.clone(**{field: with_decoder_config(module.wrapped, **changes)})
  config = getattr(module, "config", None)
  if not isinstance(config, DecoderFields):
    raise TypeError(f"{type(module).__name__} holds no Gemma decoder config to change")
  return module.clone(config=config.replace(**changes))


def temp_bytes(compiled) -> int | None:
  """A compiled step's temp bytes per device, or `None` where the backend has no memory analysis."""
  try:
    analysis = compiled.memory_analysis()
  except NotImplementedError:
    return None
  return None if analysis is None else int(analysis.temp_size_in_bytes)


def _host_available_bytes() -> int:
  """The host memory available now (`MemAvailable`; free pages where /proc is absent)."""
  try:
    with open("/proc/meminfo") as fh:
      for line in fh:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def budget_bytes(weight_bytes: int) -> int | None:
  """The temp bytes a step may take on this backend (module docstring), or `None` if unknown.

  Args:
    weight_bytes: the weights' bytes on this process's devices (frozen and trained).
  """
  device = jax.local_devices()[0]
  if device.platform == "cpu":
    return int(min(max(weight_bytes, CPU_FLOOR_BYTES), CPU_SHARE * _host_available_bytes()))
  stats = device.memory_stats() or {}
  if "bytes_limit" not in stats:
    return None
  return int(DEVICE_SHARE * (stats["bytes_limit"] - stats.get("bytes_in_use", 0)))


@dataclasses.dataclass(frozen=True)
class Choice:
  """What `compile_within_budget` chose.

  Attributes:
    policy: the remat policy of `compiled`.
    compiled: the compiled step.
    temp_bytes: its temp bytes per device (`None`: not reported).
    note: one line saying what was tried and why this policy.
  """

  policy: str
  compiled: object
  temp_bytes: int | None
  note: str


def _gb(n: int) -> str:
  return f"{n / 1e9:.2f} GB"


def compile_within_budget(
  build: Callable[[str], Callable], args: tuple, budget: int | None
) -> Choice:
  """Compiles `build(policy)` on `args` for each of `CANDIDATES` until one fits `budget`.

  Args:
    build: the jitted train step of a policy.
    args: the step's arguments (arrays or `jax.ShapeDtypeStruct`s).
    budget: the temp bytes allowed (summed over local devices on CPU), `None` for any.

  Returns:
    The first policy whose temp fits, or else the last one (the least memory), with a
    note saying it still exceeds the budget.
  """
  share = jax.local_device_count() if jax.local_devices()[0].platform == "cpu" else 1
  tried = []
  for policy in CANDIDATES:
    compiled = build(policy).lower(*args).compile()
    temp = temp_bytes(compiled)
    if temp is None or budget is None:
      return Choice(
        policy, compiled, temp, f"--remat auto: {policy} (no memory figure to choose by)"
      )
    tried.append(f"{policy} {_gb(temp * share)}")
    if temp * share <= budget:
      return Choice(
        policy,
        compiled,
        temp,
        f"--remat auto: {policy} (step temp: {', '.join(tried)}; budget {_gb(budget)})",
      )
  return Choice(
    policy,
    compiled,
    temp,
    f"--remat auto: {policy}, still over budget (step temp: {', '.join(tried)}; budget "
    f"{_gb(budget)}): lower --batch-size or --seq-len (--grad-accum keeps the batch) if it "
    "runs out of memory",
  )
