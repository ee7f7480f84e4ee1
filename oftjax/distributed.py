"""Several hosts (processes) on one mesh, through JAX's own runtime (`jax.distributed`).

Every process runs the same program: it initialises the distributed runtime, builds the
global mesh over all processes' devices, computes the same global batch order, and feeds
only its own rows (`jax.make_array_from_process_local_data`). Collectives go over the
accelerator interconnect, or gloo on CPU. Only process 0 writes files other than orbax
checkpoints (which orbax coordinates across processes).
"""

from __future__ import annotations

import jax
from jax.experimental import multihost_utils
import numpy as np


def initialize(
  coordinator_address: str, num_processes: int, process_id: int, timeout_s: int = 300
) -> None:
  """Joins the run's processes; a no-op for a single process.

  Args:
    coordinator_address: `host:port` of process 0 (reachable by all processes).
    num_processes: number of processes (hosts) in the run; 0 lets JAX detect the cluster.
    process_id: this process's index, 0 ... num_processes - 1.
    timeout_s: how long to wait for every process to join before failing.

  Raises:
    ValueError: no coordinator for several processes, or `process_id` out of range.
  """
  if num_processes == 0:  # cluster auto-detection (TPU pod slices, SLURM, ...)
    jax.distributed.initialize(initialization_timeout=timeout_s)
    return
  if num_processes == 1:
    return
  if not coordinator_address:
    raise ValueError("num_processes > 1 needs coordinator_address HOST:PORT (process 0's)")
  if not 0 <= process_id < num_processes:
    raise ValueError(f"process_id {process_id} is not in [0, {num_processes})")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # used only by CPU clients
  jax.distributed.initialize(
    coordinator_address=coordinator_address,
    num_processes=num_processes,
    process_id=process_id,
    initialization_timeout=timeout_s,
  )


def is_main() -> bool:
  """Whether this process writes the run's files."""
  return jax.process_index() == 0


def local_rows(global_rows: int) -> slice:
  """This process's rows of a global batch (processes split the batch evenly).

  Raises:
    ValueError: `global_rows` is not a multiple of the process count.
  """
  count = jax.process_count()
  if global_rows % count:
    raise ValueError(f"global_rows {global_rows} is not divisible by the {count} processes")
  per = global_rows // count
  return slice(jax.process_index() * per, (jax.process_index() + 1) * per)


def global_batch(batch: dict, sharding, leading: int = 0) -> dict:
  """Builds global arrays from this process's rows of a host batch (same on every process)."""
  mine = local_rows(next(iter(batch.values())).shape[leading])
  index = (slice(None),) * leading + (mine,)
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v)[index])
    for k, v in batch.items()
  }


def to_host(tree):
  """Numpy copies of a tree.

  Global multi-process arrays are gathered (a collective: every process must call this);
  process-local ones are copied as they are.
  """

  def one(x):
    if getattr(x, "is_fully_addressable", True):
      return np.asarray(x)
    return multihost_utils.process_allgather(x, tiled=True)

  return jax.tree_util.tree_map(one, tree)


def scalar(x) -> float:
  """A replicated (possibly multi-process) scalar array as a Python float, without a collective."""
  return float(np.asarray(x.addressable_data(0)))


def smallest(value: int) -> int:
  """The smallest of every process's `value` (itself with one process): a choice all share."""
  if jax.process_count() == 1:
    return value
  return int(np.min(multihost_utils.process_allgather(np.asarray(value, np.int64))))


def barrier(name: str) -> None:
  """Waits until every process reaches this point (no-op for one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
