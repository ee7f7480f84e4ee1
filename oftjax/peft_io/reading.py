"""Import: a PEFT OFT or LoRA adapter folder as an oftjax adapter tree, exactly.

What PEFT computes is what oftjax computes afterwards (checked with PEFT itself as the
oracle in tests/test_peft_interop.py):
- OFT: the block size comes from the tensors; PEFT's exact Cayley is `cayley(-Q)`, so the
  vector is negated; its `n = 3` Neumann series equals its `n = 4`.
- LoRA: oftjax holds one rank and one scale per adapter. PEFT's per-module scale
  (`lora_alpha / r`, `/ sqrt(r)` with `use_rslora`, per-module values from
  `alpha_pattern` and `rank_pattern`) is folded into `B` where it differs, and
  modules of a smaller rank (`rank_pattern`) get zero columns in `A` and zero rows in
  `B` up to the largest rank, which adds exactly nothing (and those entries get zero
  gradients, so further training stays within the original rank).
- The copy of an adapted `lm_head`'s frozen base weight that PEFT saves beside it is
  skipped: it is the base's own weight (a base of another vocabulary fails the shape
  checks when the adapter is applied).
- Layers an adapter does not cover (`layers_to_transform`, or a `target_modules`
  that skips layers) get identity adapters (zero OFT vector, zero LoRA `A` and `B`):
  PEFT leaves those layers as they are, and so do these.
"""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import safetensors.numpy

from oftjax import adapters, orthogonal
from oftjax.peft_io import fields
from oftjax.peft_io.naming import ModuleNaming

_KEY = re.compile(r"^base_model\.model\.(.+)\.(oft_R|lora_A|lora_B)\.weight$")
# PEFT also saves the frozen base weight of an adapted lm_head / embedding ("in case the
# vocabulary was resized"): a copy of the base, not part of the adapter.
_BASE_COPY = re.compile(r"^base_model\.model\.(.+)\.base_layer\.weight$")


def import_peft(
  directory: str, targets: str | None = None, naming: ModuleNaming | None = None
) -> tuple[dict, adapters.AdapterConfig]:
  """Reads a PEFT OFT or LoRA adapter folder into `(adapter tree, AdapterConfig)`.

  Args:
    directory: the folder with `adapter_config.json` and `adapter_model.safetensors`.
    targets: the `targets` regex of the returned config; by default exactly the
      adapted layer paths.
    naming: the module layout of the base the adapter is for (text-only or multimodal);
      the text-only Gemma layout, with no layer count, when `None`. With
      `naming.stacks` set, layers the adapter skips get identity adapters.

  Returns:
    The adapter tree (merge it into the base with `oftjax.merge_params`) and the config
    to wrap the model with.

  Raises:
    FileNotFoundError: a file is missing.
    ValueError: one line naming the file, field or tensor oftjax cannot represent exactly.
  """
  naming = naming or ModuleNaming()
  cfg_path = os.path.join(directory, "adapter_config.json")
  weights = os.path.join(directory, "adapter_model.safetensors")
  for path in (cfg_path, weights):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"PEFT adapter file missing: {path}")
  try:
    with open(cfg_path) as f:
      meta = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{cfg_path}: not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
  if not isinstance(meta, dict):
    raise ValueError(f"{cfg_path}: not a JSON object")
  kind = meta.get("peft_type")
  if kind not in ("OFT", "LORA"):
    raise ValueError(
      f"{cfg_path}: peft_type {kind!r} is not supported (use an OFT or LORA adapter)"
    )
  settings = fields.resolve(meta, kind, cfg_path)
  try:
    tensors = safetensors.numpy.load_file(weights)
  except Exception as e:  # safetensors raises its own error types for corrupt files
    raise ValueError(f"{weights}: unreadable safetensors file ({e})") from None
  for key, value in tensors.items():
    if value.dtype.kind == "f" and not np.isfinite(value).all():
      raise ValueError(f"{weights}: tensor '{key}' holds NaN or Inf")
  by_path = _group(tensors, naming, weights)
  if not by_path:
    raise ValueError(f"{weights}: holds no OFT or LoRA tensors")
  if kind == "OFT":
    tree, config = _import_oft(settings, by_path, naming, cfg_path)
  else:
    tree, config = _import_lora(settings, by_path, naming, cfg_path)
  if targets is not None:
    config = adapters.AdapterConfig(**{**config.__dict__, "targets": targets})
  return tree, config


def _group(tensors: dict, naming: ModuleNaming, weights: str) -> dict:
  """`{(path, leaf): {layer index or None: (module name, array)}}`."""
  by_path, copies, adapted = {}, {}, set()
  for key, value in tensors.items():
    match = _KEY.match(key)
    if not match and _BASE_COPY.match(key):
      copies[_BASE_COPY.match(key).group(1)] = key
      continue
    if not match:
      raise ValueError(f"{weights}: tensor '{key}' is not an OFT/LoRA weight of a linear layer")
    module, leaf = match.groups()
    adapted.add(module)
    try:
      path, layer = naming.path_of(module)
    except ValueError as e:
      raise ValueError(f"{weights}: tensor '{key}': {e}") from None
    by_path.setdefault((path, leaf), {})[layer] = (module, value)
  for module, key in copies.items():
    if module not in adapted:
      raise ValueError(
        f"{weights}: tensor '{key}' replaces a base weight of a module the "
        "adapter does not adapt; oftjax imports adapters, not base weights"
      )
  return by_path


def _layers(by_layer: dict, path: str, naming: ModuleNaming, settings: dict, cfg_path: str) -> list:
  """The stacked-axis indices a stacked leaf spans (`[None]` when not stacked)."""
  if None in by_layer:
    return [None]
  present = sorted(by_layer)
  size = naming.stack_size(path)
  if size is not None:
    return list(range(size))
  if present != list(range(len(present))):
    cause = (
      f" (layers_to_transform={settings['layers_to_transform']})"
      if settings["layers_to_transform"] is not None
      else ""
    )
    raise ValueError(
      f"{cfg_path}: the adapter covers layers {present} of '{path}'{cause}; "
      "give the model's naming (its stacks) so the others get identity adapters"
    )
  return present


def _stack(by_layer: dict, layers: list, convert, cfg_path: str) -> np.ndarray:
  """Stacks `convert`-ed per-layer arrays over `layers`; absent layers get zeros."""
  if layers == [None]:
    return convert(by_layer[None])
  parts = {i: convert(by_layer[i]) for i in layers if i in by_layer}
  first = min(parts)
  for i, part in parts.items():
    if part.shape != parts[first].shape:
      raise ValueError(
        f"{cfg_path}: '{by_layer[i][0]}' has shape {list(by_layer[i][1].shape)}, "
        f"'{by_layer[first][0]}' has {list(by_layer[first][1].shape)}; "
        "oftjax stacks layers and needs one shape"
      )
  zeros = np.zeros_like(parts[first])
  return np.stack([parts.get(i, zeros) for i in layers])


def _targets_regex(paths) -> str:
  return "(?:" + "|".join(re.escape(p) for p in sorted(set(paths))) + ")"


def _import_oft(settings, by_path, naming, cfg_path):
  neumann = bool(settings["use_cayley_neumann"])
  terms = int(settings["num_cayley_neumann_terms"])
  if neumann and terms < 3:
    same = "R = I (no adaptation)" if terms < 2 else "I + 2Q"
    raise ValueError(
      f"{cfg_path}: num_cayley_neumann_terms={terms} (PEFT's {same}) has no "
      "oftjax equivalent; use an adapter trained with >= 3 terms"
    )
  tree, block = {}, None
  for (path, leaf), by_layer in by_path.items():
    if leaf != "oft_R":
      raise ValueError(f"{cfg_path}: OFT adapter holds a LoRA tensor for '{path}'")
    for module, value in by_layer.values():
      if value.ndim != 2:
        raise ValueError(
          f"{cfg_path}: OFT tensor of '{module}' has shape {list(value.shape)}, "
          "expected [blocks, b(b-1)/2]"
        )
      b = orthogonal.block_size_from_packed(value.shape[-1])
      if block not in (None, b):
        raise ValueError(
          f"{cfg_path}: modules use different block sizes ({block} and {b}); "
          "oftjax holds one block size per adapter"
        )
      block = b
    layers = _layers(by_layer, path, naming, settings, cfg_path)
    weight = _stack(by_layer, layers, lambda mv: mv[1].astype(np.float32), cfg_path)
    _insert(tree, path, "oft", {"weight": weight if neumann else -weight})
  coft = bool(settings["coft"])
  config = adapters.AdapterConfig(
    method="oft",
    targets=_targets_regex(p for p, _ in by_path),
    block_size=block,
    num_terms=max(terms, 4),
    parameterization="cayley_neumann" if neumann else "cayley",
    block_share=bool(settings["block_share"]),
    coft_eps=float(settings["eps"]) if coft else None,
    block_dropout=float(settings["module_dropout"]),
  )
  return tree, config


def _import_lora(settings, by_path, naming, cfg_path):
  r, alpha, rslora = int(settings["r"]), float(settings["lora_alpha"]), bool(settings["use_rslora"])
  paths = sorted({p for p, _ in by_path})
  ranks, scales = {}, {}
  for path in paths:
    if (path, "lora_A") not in by_path or (path, "lora_B") not in by_path:
      raise ValueError(f"{cfg_path}: LoRA adapter for '{path}' lacks lora_A or lora_B")
    a_layers, b_layers = by_path[(path, "lora_A")], by_path[(path, "lora_B")]
    if set(a_layers) != set(b_layers):
      raise ValueError(f"{cfg_path}: '{path}' has lora_A and lora_B for different layers")
    for layer, (module, a) in a_layers.items():
      b = b_layers[layer][1]
      rank = int(fields.pattern_value(settings["rank_pattern"], module, r))
      alpha_m = float(fields.pattern_value(settings["alpha_pattern"], module, alpha))
      if a.ndim != 2 or b.ndim != 2 or a.shape[0] != rank or b.shape[1] != rank:
        raise ValueError(
          f"{cfg_path}: '{module}' has lora_A {list(a.shape)} and lora_B "
          f"{list(b.shape)}, but r / rank_pattern give it rank {rank}"
        )
      ranks[module] = rank
      scales[module] = fields.lora_scale(rank, alpha_m, rslora)
  top = max(ranks.values())
  # One scale for the whole adapter, lora_alpha / lora_rank: PEFT's scale of a module with
  # the default r and lora_alpha. Modules whose scale differs carry the ratio in B.
  lora_alpha = alpha * top / (math.sqrt(r) if rslora else r)
  scale = lora_alpha / top
  tree = {}
  for path in paths:
    layers = _layers(by_path[(path, "lora_A")], path, naming, settings, cfg_path)

    def a_of(mv):
      return _pad(mv[1].T.astype(np.float32), 1, top)

    def b_of(mv):
      module, value = mv
      ratio = scales[module] / scale
      b = value.T.astype(np.float32)
      return _pad(b if ratio == 1.0 else (b * np.float32(ratio)), 0, top)

    a = _stack(by_path[(path, "lora_A")], layers, a_of, cfg_path)
    b = _stack(by_path[(path, "lora_B")], layers, b_of, cfg_path)
    _insert(tree, path, "lora", {"a": a.astype(np.float32), "b": b.astype(np.float32)})
  config = adapters.AdapterConfig(
    method="lora", targets=_targets_regex(paths), lora_rank=top, lora_alpha=float(lora_alpha)
  )
  return tree, config


def _pad(x: np.ndarray, axis: int, size: int) -> np.ndarray:
  """Zero-pads `axis` of `x` up to `size` (exact for a LoRA rank axis)."""
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return np.pad(x, widths)


def _insert(tree: dict, path: str, kind: str, leaves: dict) -> None:
  node = tree
  for part in path.split("/"):
    node = node.setdefault(part, {})
  node[kind] = leaves
