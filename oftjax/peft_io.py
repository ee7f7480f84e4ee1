"""Adapters in and out of Hugging Face PEFT's format (``adapter_config.json`` + safetensors).

Layer paths map to PyTorch module names by the stacked-decoder convention shared with
``oftjax.models.gemma``: ``layers/self_attn/q_proj`` with a leading layer axis becomes
``model.layers.{i}.self_attn.q_proj``. OFT leaves are stored as PEFT's ``oft_R.weight``
(``[r, b(b-1)/2]``, same packing); LoRA as ``lora_A.weight = aᵀ``, ``lora_B.weight = bᵀ``.

Conventions that differ (docs/DESIGN.md §1): PEFT's exact Cayley is ``cayley(-Q)``, so the
vector is negated in that mode; PEFT's Neumann series with ``n`` terms equals ours for
``n >= 4`` and its ``n = 3`` equals its ``n = 4``; our ``n = 2, 3`` have no PEFT twin.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

import numpy as np
import safetensors.numpy

from oftjax import adapters
from oftjax import orthogonal
from oftjax import params as P

_PREFIX = "base_model.model."
_STACK = "layers"


def _module_names(path: str, lead: int):
  """``[(torch_module_name, index into the leading axes or None)]`` for one layer path."""
  parts = path.split("/")
  if parts[0] == _STACK and lead == 1:
    return lambda i: "model." + ".".join([_STACK, str(i)] + parts[1:])
  if lead == 0:
    return lambda i: "model." + ".".join(parts)
  raise ValueError(f"layer '{path}' has {lead} stacked axes; PEFT export expects 0 or 1")


def unexportable_reason(config: adapters.AdapterConfig) -> str | None:
  """Why an adapter of ``config`` has no PEFT equivalent, or ``None`` when it exports."""
  if config.parameterization == "cayley_neumann" and config.num_terms < 4:
    return (f"num_terms={config.num_terms} has no PEFT equivalent (PEFT's n<=3 series "
            "differ); train with num_terms >= 4 or parameterization 'cayley' to export")
  return None


def export_peft(directory: str, adapter: dict, config: adapters.AdapterConfig,
                base_model: str | None = None) -> None:
  """Writes ``adapter_config.json`` and ``adapter_model.safetensors`` atomically.

  Args:
    directory: output folder (replaced only once fully written).
    adapter: the adapter tree (``split_params(params)[1]``).
    config: the adapter config it was trained with.
    base_model: recorded as ``base_model_name_or_path``.
  """
  reason = unexportable_reason(config)
  if reason:
    raise ValueError(reason)
  if config.method == "oftv1":
    config = adapters.AdapterConfig(**{**config.__dict__, "method": "oft"})
  tensors, modules = {}, set()
  for path, kind, leaves in P.adapter_nodes(adapter):
    arrays = {k: np.asarray(v, np.float32) for k, v in leaves.items()}
    lead = arrays["weight" if kind == "oft" else "a"].ndim - 2
    name_of = _module_names(path, lead)
    count = arrays[next(iter(arrays))].shape[0] if lead else 1
    modules.add(path.split("/")[-1])
    for i in range(count):
      pick = (lambda a: a[i]) if lead else (lambda a: a)  # noqa: E731
      module = _PREFIX + name_of(i)
      if kind == "oft":
        weight = pick(arrays["weight"])
        tensors[f"{module}.oft_R.weight"] = -weight if config.parameterization == "cayley" else weight
      else:
        tensors[f"{module}.lora_A.weight"] = np.ascontiguousarray(pick(arrays["a"]).T)
        tensors[f"{module}.lora_B.weight"] = np.ascontiguousarray(pick(arrays["b"]).T)
  if not tensors:
    raise ValueError("adapter tree holds no OFT or LoRA leaves; nothing to export")
  common = {"base_model_name_or_path": base_model, "task_type": "CAUSAL_LM",
            "target_modules": sorted(modules), "bias": "none", "inference_mode": True,
            "modules_to_save": None, "fan_in_fan_out": False, "layers_to_transform": None}
  if config.method == "lora":
    meta = {**common, "peft_type": "LORA", "r": config.lora_rank, "lora_alpha": config.lora_alpha,
            "lora_dropout": 0.0, "init_lora_weights": True}
  else:
    neumann = config.parameterization == "cayley_neumann"
    meta = {**common, "peft_type": "OFT", "r": 0, "oft_block_size": config.block_size,
            "module_dropout": 0.0, "coft": config.coft_eps is not None,
            "eps": config.coft_eps if config.coft_eps is not None else 6e-5,
            "block_share": config.block_share, "init_weights": True,
            "use_cayley_neumann": neumann,
            "num_cayley_neumann_terms": config.num_terms if neumann else 5}
  parent = os.path.dirname(os.path.abspath(directory))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=".peft-", dir=parent)
  try:
    safetensors.numpy.save_file(tensors, os.path.join(staging, "adapter_model.safetensors"))
    with open(os.path.join(staging, "adapter_config.json"), "w") as f:
      json.dump(meta, f, indent=2)
    if os.path.exists(directory):
      shutil.rmtree(directory)
    os.replace(staging, directory)
  finally:
    shutil.rmtree(staging, ignore_errors=True)


_KEY = re.compile(r"^base_model\.model\.model\.(?:layers\.(\d+)\.)?(.+)\."
                  r"(oft_R\.weight|lora_A\.weight|lora_B\.weight)$")


def import_peft(directory: str, targets: str | None = None) -> tuple[dict, adapters.AdapterConfig]:
  """Reads a PEFT OFT or LoRA adapter folder into ``(adapter tree, AdapterConfig)``.

  Raises:
    ValueError / FileNotFoundError: one line naming the file or key at fault.
  """
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
  kind = meta.get("peft_type")
  try:
    tensors = safetensors.numpy.load_file(weights)
  except Exception as e:  # safetensors raises its own error types for corrupt files
    raise ValueError(f"{weights}: unreadable safetensors file ({e})") from None
  for key, value in tensors.items():
    if value.dtype.kind == "f" and not np.isfinite(value).all():
      raise ValueError(f"{weights}: tensor '{key}' holds NaN or Inf")
  stacked: dict[tuple[str, str], dict[int, np.ndarray]] = {}
  for key, value in tensors.items():
    match = _KEY.match(key)
    if not match:
      raise ValueError(f"{weights}: tensor '{key}' is not an OFT/LoRA weight of a decoder layer")
    layer, module, leaf = match.groups()
    path = (f"{_STACK}/" if layer is not None else "") + module.replace(".", "/")
    stacked.setdefault((path, leaf), {})[int(layer) if layer is not None else -1] = value
  if kind == "OFT":
    config, tree = _import_oft(meta, stacked, cfg_path)
  elif kind == "LORA":
    config, tree = _import_lora(meta, stacked, cfg_path)
  else:
    raise ValueError(f"{cfg_path}: peft_type {kind!r} is not supported (use an OFT or LORA adapter)")
  if targets is not None:
    config = adapters.AdapterConfig(**{**config.__dict__, "targets": targets})
  return tree, config


def _stack(by_layer: dict[int, np.ndarray], key: str) -> np.ndarray:
  if -1 in by_layer:
    return by_layer[-1]
  order = sorted(by_layer)
  if order != list(range(len(order))):
    raise ValueError(f"adapter for '{key}' covers layers {order}; oftjax needs every layer")
  first = by_layer[order[0]].shape
  for i in order:
    if by_layer[i].shape != first:
      raise ValueError(f"adapter for '{key}': layer {i} has shape {list(by_layer[i].shape)}, "
                       f"layer {order[0]} has {list(first)}")
  return np.stack([by_layer[i] for i in order])


def _insert(tree: dict, path: str, kind: str, leaves: dict) -> None:
  node = tree
  for part in path.split("/"):
    node = node.setdefault(part, {})
  node[kind] = leaves


def _targets_regex(paths) -> str:
  names = sorted({p.split("/")[-1] for p in paths})
  return r".*/(" + "|".join(map(re.escape, names)) + ")"


def _import_oft(meta, stacked, cfg_path):
  neumann = bool(meta.get("use_cayley_neumann", False))
  terms = int(meta.get("num_cayley_neumann_terms", 5))
  if neumann and terms < 3:
    raise ValueError(f"{cfg_path}: num_cayley_neumann_terms={terms} (PEFT's I+2Q) has no "
                     "oftjax equivalent; use an adapter trained with >= 3 terms")
  tree, block = {}, None
  for (path, leaf), by_layer in stacked.items():
    if leaf != "oft_R.weight":
      raise ValueError(f"{cfg_path}: OFT adapter holds a LoRA tensor for '{path}'")
    weight = _stack(by_layer, path).astype(np.float32)
    b = orthogonal.block_size_from_packed(weight.shape[-1])
    if block not in (None, b):
      raise ValueError(f"{cfg_path}: layers use different block sizes ({block} and {b})")
    block = b
    _insert(tree, path, "oft", {"weight": weight if neumann else -weight})
  config = adapters.AdapterConfig(
      method="oft", targets=_targets_regex(p for p, _ in stacked), block_size=block,
      num_terms=max(terms, 4), parameterization="cayley_neumann" if neumann else "cayley",
      block_share=bool(meta.get("block_share", False)),
      coft_eps=float(meta["eps"]) if meta.get("coft") else None)
  return config, tree


def _import_lora(meta, stacked, cfg_path):
  tree, rank = {}, int(meta.get("r", 8))
  for path in {p for p, _ in stacked}:
    if (path, "lora_A.weight") not in stacked or (path, "lora_B.weight") not in stacked:
      raise ValueError(f"{cfg_path}: LoRA adapter for '{path}' lacks lora_A or lora_B")
    a = _stack(stacked[(path, "lora_A.weight")], path)
    b = _stack(stacked[(path, "lora_B.weight")], path)
    _insert(tree, path, "lora", {"a": np.swapaxes(a, -1, -2).astype(np.float32),
                                 "b": np.swapaxes(b, -1, -2).astype(np.float32)})
  config = adapters.AdapterConfig(method="lora", targets=_targets_regex(p for p, _ in stacked),
                                  lora_rank=rank, lora_alpha=float(meta.get("lora_alpha", rank)))
  return config, tree
