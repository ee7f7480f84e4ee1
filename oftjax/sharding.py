"""Device meshes from `"data=2,fsdp=4"` strings and the shardings of batches and parameters.

Axes: `data` (batch split, parameters replicated), `fsdp` (batch split, frozen
weights sharded on their largest divisible axis), optional `tensor`. One device is the
trivial mesh `data=1`.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as PS
import numpy as np

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def make_mesh(spec: str = "", devices=None) -> Mesh:
  """Builds a mesh from `"data=2,fsdp=4"`; empty puts every device on `data`.

  Raises:
    ValueError: unknown axis, malformed size, or a product that is not the device count.
  """
  devices = list(devices if devices is not None else jax.devices())
  sizes = {"data": len(devices), "fsdp": 1, "tensor": 1}
  if spec:
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    for part in spec.split(","):
      name, _, value = part.partition("=")
      name = name.strip()
      if name not in AXES or not value.strip().isdigit() or int(value) < 1:
        raise ValueError(f"mesh entry {part!r} is not AXIS=N with AXIS in {AXES} and N >= 1")
      sizes[name] = int(value)
  if math.prod(sizes.values()) != len(devices):
    raise ValueError(
      f"mesh {spec or 'default'} needs {math.prod(sizes.values())} devices "
      f"but {len(devices)} are available; make the axis sizes multiply to {len(devices)}"
    )
  grid = np.asarray(devices).reshape([sizes[a] for a in AXES])
  return Mesh(grid, AXES)


def batch_sharding(mesh: Mesh, ndim: int, leading: int = 0) -> NamedSharding:
  """Splits the batch axis (after `leading` micro-batch axes) over `data` and `fsdp`."""
  spec = [None] * ndim
  spec[leading] = BATCH_AXES
  return NamedSharding(mesh, PS(*spec))


def fsdp_spec(shape: tuple[int, ...], fsdp: int) -> PS:
  """Shards the largest axis divisible by `fsdp`; replicates small or indivisible arrays."""
  if fsdp == 1 or math.prod(shape) < 1024:
    return PS()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % fsdp == 0:
      spec = [None] * len(shape)
      spec[axis] = "fsdp"
      return PS(*spec)
  return PS()


def replicated(mesh: Mesh) -> NamedSharding:
  """The same full copy on every device of `mesh`."""
  return NamedSharding(mesh, PS())


def onto_mesh(tree, mesh: Mesh):
  """Puts a tree on `mesh`: sharded leaves stay, the others are replicated.

  Leaves already on `mesh` keep their sharding (e.g. Adam moments of sharded params);
  the others (e.g. a step counter XLA left on one device) are replicated over it.
  """
  devices = set(mesh.devices.flat)

  def place(x):
    return x if set(x.sharding.device_set) == devices else jax.device_put(x, replicated(mesh))

  return jax.tree_util.tree_map(place, tree)


def param_shardings(tree, mesh: Mesh, shard: bool = True):
  """NamedShardings for a parameter tree: FSDP-sharded when `shard`, else replicated."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree_util.tree_map(
    lambda x: NamedSharding(mesh, fsdp_spec(x.shape, fsdp) if shard else PS()), tree
  )


def train_state_shardings(init_fn, trainable, mesh: Mesh, shard: bool = True):
  """Shardings of `(trainable, init_fn(trainable))` from their shapes alone.

  The optimizer state is never built to learn its layout: `jax.eval_shape` gives its
  leaves' shapes and `param_shardings`' rule places each, so a moment lies as its
  parameter does and a scalar (a step count) is replicated. Pass both to `jax.jit(...,
  out_shardings=...)`: of `init_fn` to build the state in place, of the train step to
  keep it there.

  Args:
    init_fn: e.g. `optimizer.init`.
    trainable: the trainable tree (arrays or `jax.ShapeDtypeStruct` leaves).
    mesh: the device mesh.
    shard: FSDP-shard the leaves (full finetuning) or replicate them (adapters).

  Returns:
    `(trainable shardings, init_fn(trainable) shardings)`.

  References:
    flax examples/lm1b `train.py` and MaxText `get_abstract_state`: `jax.eval_shape`
    of the init, then `jit(init, out_shardings=...)`.
  """
  abstract = jax.eval_shape(init_fn, trainable)
  return param_shardings(trainable, mesh, shard), param_shardings(abstract, mesh, shard)
