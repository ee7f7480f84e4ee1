"""Parameter trees: base vs adapter split/merge, Optax masks, counting, folding adapters.

Adapter sub-trees are the ``'oft'`` and ``'lora'`` entries that sit beside a kernel.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from oftjax import adapters
from oftjax import geometry as geo
from oftjax import orthogonal

ADAPTER_KEYS = ("oft", "lora")

Params = Mapping[str, Any]


def _is_adapter_path(path) -> bool:
  return any(getattr(k, "key", None) in ADAPTER_KEYS for k in path)


def split_params(params: Params) -> tuple[dict, dict]:
  """Splits a tree into ``(base, adapters)``: two nested dicts with disjoint leaves."""
  base, adapter = {}, {}
  for key, value in params.items():
    if key in ADAPTER_KEYS:
      adapter[key] = value
    elif isinstance(value, Mapping):
      b, a = split_params(value)
      if b:
        base[key] = b
      if a:
        adapter[key] = a
    else:
      base[key] = value
  return base, adapter


def merge_params(base: Params, adapter: Params) -> dict:
  """Inverse of :func:`split_params`: deep-merges two trees (adapter wins no conflicts)."""
  merged = dict(base)
  for key, value in adapter.items():
    if key in merged and isinstance(value, Mapping) and isinstance(merged[key], Mapping):
      merged[key] = merge_params(merged[key], value)
    elif key in merged:
      raise ValueError(f"adapter tree and base tree both define leaf '{key}'")
    else:
      merged[key] = value
  return merged


def trainable_mask(params: Params) -> Any:
  """A tree of bools, True exactly on adapter leaves (for ``optax.masked``)."""
  return jax.tree_util.tree_map_with_path(lambda p, _: _is_adapter_path(p), params)


def adapter_only(optimizer: optax.GradientTransformation,
                 params: Params) -> optax.GradientTransformation:
  """Optimizer that updates adapter leaves and leaves every other leaf exactly unchanged."""
  labels = jax.tree_util.tree_map(lambda t: "adapter" if t else "frozen", trainable_mask(params))
  return optax.multi_transform({"adapter": optimizer, "frozen": optax.set_to_zero()}, labels)


def count_params(params: Params) -> int:
  """Number of scalars in a tree."""
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params))


def tree_bytes(params: Params) -> int:
  """Bytes of all leaves as stored."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))


def node_at(tree: Params, path: str) -> Mapping:
  """The sub-tree at a '/'-joined layer path (``''`` is the root)."""
  node = tree
  for name in filter(None, path.split("/")):
    if name not in node:
      raise KeyError(f"parameter path '{path}' not found (missing '{name}')")
    node = node[name]
  return node


def copy_containers(tree: Params) -> dict:
  """New nested dicts sharing the same leaves (so a fold can replace leaves in place)."""
  return {k: copy_containers(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def adapter_nodes(tree: Params, prefix: tuple[str, ...] = ()):
  """Yields ``(layer path, 'oft' | 'lora', leaves)`` for every adapter in ``tree``."""
  for key, value in tree.items():
    if key in ADAPTER_KEYS:
      yield "/".join(prefix), key, value
    elif isinstance(value, Mapping):
      yield from adapter_nodes(value, prefix + (key,))


def _stacked(fn, kernel, geom, *leaves):
  """Applies a per-layer fold over leading stacked axes (e.g. from ``nn.scan``)."""
  lead = kernel.ndim - len(geom.kernel_shape)
  for _ in range(lead):
    fn = jax.vmap(fn)
  return fn(kernel, *leaves)


def fold_adapters(params: Params, geometries: Mapping[str, geo.LayerGeometry],
                  config: adapters.AdapterConfig, unfold: bool = False) -> dict:
  """Merges (or, with ``unfold``, un-merges) every adapter into its kernel.

  Args:
    params: adapted tree (base + adapter leaves).
    geometries: ``oftjax.adapt(...).geometries`` of the same model.
    config: the adapter config the leaves were trained with.
    unfold: apply the inverse fold instead (recovers the base kernels).

  Returns:
    A base-shaped tree (no adapter leaves) whose kernels include the adapters.
  """
  base, adapter = split_params(params)
  base = copy_containers(base)
  for path, geom in geometries.items():
    leaves = node_at(adapter, path)[config.leaf_name]
    node = node_at(base, path)
    if config.method == "lora":
      fold = adapters.unmerge_lora if unfold else adapters.merge_lora
      fn = lambda k, l: fold(k, geom, l, config)  # noqa: E731
    else:
      fold = adapters.unmerge_oft if unfold else adapters.merge_oft
      fn = lambda k, l: fold(k, geom, adapters.oft_blocks(l, config, path))  # noqa: E731
    node["kernel"] = _stacked(fn, node["kernel"], geom, leaves)
  return base


def adapter_health(adapter: Params, config: adapters.AdapterConfig) -> dict:
  """Largest spectral norm of any OFT block's ``Q`` and largest ``max|RᵀR - I|``.

  The Cayley–Neumann series only approximates an orthogonal ``R`` while ``‖Q‖ < 1``;
  training logs both figures so a drift out of that region is seen, not guessed.
  """
  nodes = [leaves["weight"] for _, kind, leaves in adapter_nodes(adapter) if kind == "oft"]
  if not nodes:
    return {}
  q_norms, errors = [], []
  for packed in nodes:
    packed = packed.reshape(-1, packed.shape[-1]).astype(jnp.float32)
    q = orthogonal.skew_symmetric(packed, config.block_size)
    q_norms.append(jnp.max(jnp.linalg.norm(q, ord=2, axis=(-2, -1))))
    errors.append(orthogonal.orthogonality_error(adapters.oft_blocks({"weight": packed}, config)))
  return {"max_q_norm": jnp.max(jnp.stack(q_norms)),
          "orthogonality_error": jnp.max(jnp.stack(errors))}

