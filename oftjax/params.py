"""Parameter trees: base vs adapter split/merge, Optax masks, counting, folding adapters.

An adapter sub-tree sits beside the weight it adapts, keyed by its kind and that weight
(`adapter_key`): `'oft'` / `'lora'` beside a flax `kernel`, `'oft_<weight>'`
/ `'lora_<weight>'` beside any other weight, so two layers that share one scope (the
gemma library's MLP einsums `gating_einsum` and `linear`) keep separate adapters.
The geometries of an adapted model are keyed the same way (`weight_key`): by the
layer's path for a `kernel`, by `<layer path>/<weight>` otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from oftjax import adapters, orthogonal
from oftjax import geometry as geo

ADAPTER_KEYS = ("oft", "lora")
# The leaves each kind's sub-tree holds (`adapters.init_oft`, `adapters.init_lora`): a
# prefixed key counts as an adapter only when it holds exactly these arrays, so a model's own
# submodule that happens to be named `lora_proj` is never taken for one (and trained).
ADAPTER_LEAVES = {"oft": frozenset({"weight"}), "lora": frozenset({"a", "b"})}
PLAIN_WEIGHT = geo.PLAIN_WEIGHT

Params = Mapping[str, Any]


def adapter_key(kind: str, weight: str = PLAIN_WEIGHT) -> str:
  """Name of the adapter sub-tree of `kind` (`'oft'` / `'lora'`) beside `weight`."""
  return kind if weight == PLAIN_WEIGHT else f"{kind}_{weight}"


def adapter_kind(key: str, value: Any = None) -> str | None:
  """`'oft'` / `'lora'` when `key` names an adapter sub-tree, else `None`.

  `oft_<weight>` / `lora_<weight>` count only as sub-trees holding exactly that kind's
  leaves (`ADAPTER_LEAVES`), never as a base model's own array or submodule of that name.
  """
  if key in ADAPTER_KEYS:
    return key
  prefixed = next((k for k in ADAPTER_KEYS if key.startswith(k + "_")), None)
  if prefixed is None or not isinstance(value, Mapping):
    return None
  holds_leaves = set(value) == ADAPTER_LEAVES[prefixed] and not any(
    isinstance(v, Mapping) for v in value.values()
  )
  return prefixed if holds_leaves else None


def is_adapter_key(key: str, value: Any = None) -> bool:
  """Whether `key` (holding `value`) is an adapter sub-tree (`adapter_kind`)."""
  return adapter_kind(key, value) is not None


def weight_key(layer_path: str, weight: str = PLAIN_WEIGHT) -> str:
  """How geometries key an adapted weight: the layer path for a `kernel`, else `path/weight`."""
  if weight == PLAIN_WEIGHT:
    return layer_path
  return f"{layer_path}/{weight}" if layer_path else weight


def layer_path_of(key: str, geom: geo.LayerGeometry) -> str:
  """Inverse of `weight_key`: the path of the layer (scope) holding the weight."""
  if geom.weight == PLAIN_WEIGHT:
    return key
  return key[: -len(geom.weight)].rstrip("/")


def _is_adapter_path(params: Params, path) -> bool:
  """Whether the leaf at `path` lies in an adapter sub-tree of `params` (`is_adapter_key`)."""
  node = params
  for entry in path:
    key = getattr(entry, "key", None)
    if not isinstance(node, Mapping) or key not in node:
      return False
    if isinstance(key, str) and is_adapter_key(key, node[key]):
      return True
    node = node[key]
  return False


def split_params(params: Params) -> tuple[dict, dict]:
  """Splits a tree into `(base, adapters)`: two nested dicts with disjoint leaves."""
  base, adapter = {}, {}
  for key, value in params.items():
    if is_adapter_key(key, value):
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
  """Inverse of `split_params`: deep-merges two trees (adapter wins no conflicts)."""
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
  """A tree of bools, True exactly on adapter leaves (for `optax.masked`)."""
  return jax.tree_util.tree_map_with_path(lambda p, _: _is_adapter_path(params, p), params)


def adapter_only(
  optimizer: optax.GradientTransformation, params: Params
) -> optax.GradientTransformation:
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
  """The sub-tree at a '/'-joined layer path (`''` is the root)."""
  node = tree
  for name in filter(None, path.split("/")):
    if name not in node:
      raise KeyError(f"parameter path '{path}' not found (missing '{name}')")
    node = node[name]
  return node


def copy_containers(tree: Params) -> dict:
  """New nested dicts sharing the same leaves (so a fold can replace leaves in place)."""
  return {k: copy_containers(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def edit_layers(tree: Params, geometries: Mapping[str, geo.LayerGeometry]):
  """A copy of `tree` to edit layer by layer (folds, quantization), and its layers.

  Returns:
    `(copy, layers)`: `copy` has new containers and shares `tree`'s leaves;
    `layers` is `[(key, geometry, node)]` in the order of `geometries`, `node`
    being the copy's dict of the layer holding the weight `geometry.weight` (replacing
    a leaf in it leaves `tree` as it was).

  Raises:
    KeyError: a layer of `geometries` is not in `tree`.
  """
  out = copy_containers(tree)
  return out, [
    (key, geom, node_at(out, layer_path_of(key, geom))) for key, geom in geometries.items()
  ]


def over_stacked_axes(fn, lead: int):
  """`fn` of one layer's arrays, mapped over `lead` leading stacked axes.

  Every argument carries the same `lead` axes (layers stacked by `nn.scan`); `fn`
  itself is returned when `lead` is 0.
  """
  for _ in range(lead):
    fn = jax.vmap(fn)
  return fn


def adapter_nodes(tree: Params, prefix: tuple[str, ...] = ()):
  """Yields `(weight key, 'oft' | 'lora', leaves)` for every adapter in `tree`.

  The key is the one geometries use (`weight_key`): the layer path for an adapter
  of a `kernel`, `<layer path>/<weight>` for one of another weight.
  """
  for key, value in tree.items():
    kind = adapter_kind(key, value)
    if kind is not None:
      weight = key[len(kind) + 1 :] or PLAIN_WEIGHT
      yield weight_key("/".join(prefix), weight), kind, value
    elif isinstance(value, Mapping):
      yield from adapter_nodes(value, prefix + (key,))


def fold_adapters(
  params: Params,
  geometries: Mapping[str, geo.LayerGeometry],
  config: adapters.AdapterConfig,
  unfold: bool = False,
) -> dict:
  """Folds (or, with `unfold`, unfolds) every adapter into its kernel.

  Args:
    params: adapted tree (base + adapter leaves).
    geometries: `oftjax.adapt(...).geometries` of the same model.
    config: the adapter config the leaves were trained with.
    unfold: apply the inverse fold instead (recovers the base kernels).

  Returns:
    A base-shaped tree (no adapter leaves) whose weights include the adapters, each
    under its own name (`kernel`, or e.g. the gemma library's `w`).
  """
  base, adapter = split_params(params)
  base, layers = edit_layers(base, geometries)
  for key, geom, node in layers:
    name = adapter_key(config.leaf_name, geom.weight)
    leaves = node_at(adapter, layer_path_of(key, geom))[name]
    lead = node[geom.weight].ndim - len(geom.kernel_shape)
    fold = _layer_fold(key, geom, config, unfold)
    node[geom.weight] = over_stacked_axes(fold, lead)(node[geom.weight], leaves)
  return base


def _layer_fold(path: str, geom: geo.LayerGeometry, config: adapters.AdapterConfig, unfold: bool):
  """`f(kernel, leaves) -> kernel` that folds (or unfolds) one layer's adapter."""
  if config.method == "lora":
    lora = adapters.unfold_lora if unfold else adapters.fold_lora
    return lambda kernel, leaves: lora(kernel, geom, leaves, config)
  if unfold:
    return lambda kernel, leaves: adapters.unfold_oft(
      kernel, geom, adapters.oft_blocks(leaves, config, path)
    )
  return lambda kernel, leaves: adapters.fold_oft(
    kernel, geom, adapters.oft_blocks(leaves, config, path), config.precision
  )


def project_adapters(tree: Params, config: adapters.AdapterConfig) -> dict:
  """COFT: `tree` with every OFT layer's blocks projected into its ball (per layer).

  This is the value PEFT writes back into each OFT weight before every forward; the
  train step applies it after every update so the stored parameter always is the
  projected one. Non-OFT leaves (and every leaf without COFT) are returned unchanged.
  """

  def walk(node):
    return {
      key: adapters.project_oft(value, config)
      if adapter_kind(key, value) == "oft"
      else walk(value)
      if isinstance(value, Mapping)
      else value
      for key, value in node.items()
    }

  return walk(tree) if config.coft_eps is not None else dict(tree)


def adapter_health(adapter: Params, config: adapters.AdapterConfig, per_layer: bool = True) -> dict:
  """How far each OFT layer is from the region where its blocks are rotations.

  The Cayley–Neumann series only approximates an orthogonal `R` while `‖Q‖ < 1`,
  and COFT keeps each block's `‖Q‖_F` within `eps / sqrt(r)`; training logs the
  summaries so a drift is seen, not guessed. Every figure is taken per layer: a layer
  stacked by `nn.scan` (`[num_layers, r, b(b-1)/2]` leaves) counts as
  `num_layers` layers, each with its own `r` blocks and COFT radius.

  Args:
    adapter: a tree holding adapter leaves (other leaves are ignored).
    config: the adapter config the leaves are used with.
    per_layer: also return the per-layer figures (`'layers'`). The job logs the
      summaries only: a jitted health returning every per-layer figure hung on 4 virtual
      CPU devices with 7 adapted paths (cause not found).

  Returns:
    `{}` without OFT adapters; otherwise `{'layers': {path: figures}}` where
    `figures` holds `q_norm` (largest spectral norm of a block's `Q` as the
    forward uses it, i.e. after COFT's projection) and `orthogonality_error`
    (largest `max|RᵀR - I|` of a block), each shaped like the layer's stacked axes
    (`()` unstacked), and with COFT `coft_radius` (the layer's `eps / sqrt(r)`)
    and `coft_ratio` (largest stored `‖Q‖_F` over that radius: 1 on the sphere,
    above 1 for a weight that was never projected, such as PEFT's saved one), plus the
    summaries over all layers: `max_q_norm`, `mean_q_norm`, `orthogonality_error`
    (max), `mean_orthogonality_error` and with COFT `max_coft_ratio`.
  """
  layers = {}
  for path, kind, leaves in adapter_nodes(adapter):
    if kind != "oft":
      continue
    stored = leaves["weight"].astype(jnp.float32)
    lead, r = stored.ndim - 2, stored.shape[-2]  # stacked axes (nn.scan), blocks per layer
    used = adapters.project_oft({"weight": stored}, config)["weight"]  # what the forward uses
    q = orthogonal.skew_symmetric(used, config.block_size)
    blocks = adapters.oft_blocks({"weight": used}, config, path)
    figures = {
      "q_norm": over_stacked_axes(lambda x: jnp.max(orthogonal.spectral_norm(x)), lead)(q),
      "orthogonality_error": over_stacked_axes(orthogonal.orthogonality_error, lead)(blocks),
    }
    if config.coft_eps is not None:
      radius = config.coft_eps / math.sqrt(r)
      figures["coft_radius"] = jnp.asarray(radius, jnp.float32)
      figures["coft_ratio"] = (
        over_stacked_axes(  # of the stored weight: > 1 if never projected
          lambda x: jnp.max(jnp.linalg.norm(x, axis=(-2, -1))), lead
        )(orthogonal.skew_symmetric(stored, config.block_size))
        / radius
      )
    layers[path] = figures
  if not layers:
    return {}
  every = lambda name: jnp.concatenate([jnp.ravel(f[name]) for f in layers.values()])
  summary = {
    "max_q_norm": jnp.max(every("q_norm")),
    "mean_q_norm": jnp.mean(every("q_norm")),
    "orthogonality_error": jnp.max(every("orthogonality_error")),
    "mean_orthogonality_error": jnp.mean(every("orthogonality_error")),
  }
  if config.coft_eps is not None:
    summary["max_coft_ratio"] = jnp.max(every("coft_ratio"))
  return {"layers": layers, **summary} if per_layer else summary
