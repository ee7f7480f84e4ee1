"""Export: an oftjax adapter tree as a PEFT adapter folder that loads where the base does."""

from __future__ import annotations

import json
import os

import numpy as np
import safetensors.numpy

from oftjax import adapters, atomic
from oftjax import params as P
from oftjax.peft_io.fields import PEFT_VERSION
from oftjax.peft_io.naming import ModuleNaming


def unexportable_reason(config: adapters.AdapterConfig) -> str | None:
  """Why an adapter of `config` has no PEFT equivalent, or `None` when it exports."""
  if config.parameterization == "cayley_neumann" and config.num_terms < 4:
    return (
      f"num_terms={config.num_terms} has no PEFT equivalent (PEFT's n<=3 series "
      "differ); train with num_terms >= 4 or parameterization 'cayley' to export"
    )
  return None


def _tensors(adapter: dict, config: adapters.AdapterConfig, naming: ModuleNaming):
  """`({PEFT tensor name: array}, [layer paths])` of an adapter tree."""
  tensors, paths = {}, []
  for path, kind, leaves in P.adapter_nodes(adapter):
    arrays = {k: np.asarray(v, np.float32) for k, v in leaves.items()}
    lead = arrays["weight" if kind == "oft" else "a"].ndim - 2
    if lead not in (0, 1):
      raise ValueError(f"layer '{path}' has {lead} stacked axes; PEFT export expects 0 or 1")
    count = next(iter(arrays.values())).shape[0] if lead else None
    expected = naming.stack_size(path) if lead else None
    if expected is not None and count != expected:
      raise ValueError(
        f"layer '{path}' stacks {count} layers but the model has "
        f"{expected} there; export the adapter of this model"
      )
    paths.append(path)
    for i in range(count) if lead else [None]:
      pick = {k: (a[i] if lead else a) for k, a in arrays.items()}
      module = "base_model.model." + naming.module_name(path, i)
      if kind == "oft":  # PEFT's exact Cayley is cayley(-Q): negate (docs/DESIGN.md §1)
        weight = pick["weight"]
        tensors[f"{module}.oft_R.weight"] = (
          -weight if config.parameterization == "cayley" else weight
        )
      else:
        tensors[f"{module}.lora_A.weight"] = np.ascontiguousarray(pick["a"].T)
        tensors[f"{module}.lora_B.weight"] = np.ascontiguousarray(pick["b"].T)
  if not tensors:
    raise ValueError("adapter tree holds no OFT or LoRA leaves; nothing to export")
  return tensors, paths


def _config(config: adapters.AdapterConfig, target_modules: str, base_model: str | None) -> dict:
  """`adapter_config.json`: every field PEFT reads for this adapter, written explicitly."""
  common = {
    "base_model_name_or_path": base_model,
    "task_type": "CAUSAL_LM",
    "peft_version": PEFT_VERSION,
    "target_modules": target_modules,
    "exclude_modules": None,
    "bias": "none",
    "inference_mode": True,
    "modules_to_save": None,
    "fan_in_fan_out": False,
    "layers_to_transform": None,
    "layers_pattern": None,
  }
  if config.method == "lora":
    return {
      **common,
      "peft_type": "LORA",
      "r": config.lora_rank,
      "lora_alpha": config.lora_alpha,
      "use_rslora": False,
      "rank_pattern": {},
      "alpha_pattern": {},
      "lora_dropout": 0.0,
      "init_lora_weights": True,
      "use_dora": False,
      "lora_bias": False,
    }
  neumann = config.parameterization == "cayley_neumann"
  return {
    **common,
    "peft_type": "OFT",
    "r": 0,
    "oft_block_size": config.block_size,
    "module_dropout": config.block_dropout,  # training only: PEFT builds it, never applies it
    "coft": config.coft_eps is not None,
    "eps": config.coft_eps if config.coft_eps is not None else 6e-5,
    "block_share": config.block_share,
    "init_weights": True,
    "use_cayley_neumann": neumann,
    "num_cayley_neumann_terms": config.num_terms if neumann else 5,
  }


def export_peft(
  directory: str,
  adapter: dict,
  config: adapters.AdapterConfig,
  base_model: str | None = None,
  naming: ModuleNaming | None = None,
) -> None:
  """Writes `adapter_config.json` and `adapter_model.safetensors` atomically.

  The tensor names and `target_modules` follow `naming`, the module layout of the base
  the adapter is for: on a multimodal base the keys sit under
  `base_model.model.model.language_model.` and `target_modules` is a regex (PEFT
  `fullmatch`-es it) that matches exactly the adapted language-model modules, so PEFT
  wraps nothing in a vision or audio tower.

  Args:
    directory: output folder (replaced only once fully written).
    adapter: the adapter tree (`split_params(params)[1]`).
    config: the adapter config it was trained with.
    base_model: recorded as `base_model_name_or_path`.
    naming: the base's module layout; the text-only Gemma layout when `None`.

  Raises:
    ValueError: the adapter has no PEFT equivalent (see `unexportable_reason`), holds
      no adapter leaves, or does not fit `naming`.
  """
  reason = unexportable_reason(config)
  if reason:
    raise ValueError(reason)
  naming = naming or ModuleNaming()
  tensors, paths = _tensors(adapter, config, naming)
  meta = _config(config, naming.target_pattern(paths), base_model)
  with atomic.replace_folder(directory) as staging:
    safetensors.numpy.save_file(
      tensors, os.path.join(staging, "adapter_model.safetensors"), metadata={"format": "pt"}
    )
    with open(os.path.join(staging, "adapter_config.json"), "w") as f:
      json.dump(meta, f, indent=2)
