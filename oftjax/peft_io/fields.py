"""The `adapter_config.json` fields oftjax reads, with PEFT's own defaults.

A field missing from the file takes the default of PEFT's config dataclass (checked against
peft 0.21.2's `OFTConfig` / `LoraConfig`; note `use_cayley_neumann` defaults to True).
Every other field either cannot change what the adapter computes at inference (dropout,
init schemes that leave the base untouched, bookkeeping) or is refused by name when set,
so an adapter oftjax cannot represent exactly never loads as something else.

References:
  Hugging Face PEFT 0.21.2, `peft/tuners/oft/config.py` and `peft/tuners/lora/config.py`.
"""

from __future__ import annotations

import math
import numbers
import re

PEFT_VERSION = "0.21.2"  # the release whose format (and defaults) this package follows

OFT_DEFAULTS = {
  "r": 0,
  "oft_block_size": 32,
  "use_cayley_neumann": True,
  "num_cayley_neumann_terms": 5,
  "coft": False,
  "eps": 6e-5,
  "block_share": False,
  "bias": "none",
  "fan_in_fan_out": False,
  "layers_to_transform": None,
  "module_dropout": 0.0,  # training only (PEFT never applies it); read as block_dropout
}
LORA_DEFAULTS = {
  "r": 8,
  "lora_alpha": 8,
  "use_rslora": False,
  "rank_pattern": {},
  "alpha_pattern": {},
  "init_lora_weights": True,
  "bias": "none",
  "fan_in_fan_out": False,
  "layers_to_transform": None,
}

# Fields that never change the adapted function once the weights are trained.
_INERT = {
  "peft_type",
  "task_type",
  "base_model_name_or_path",
  "revision",
  "inference_mode",
  "auto_mapping",
  "peft_version",
  "target_modules",
  "exclude_modules",
  "layers_pattern",
  "modules_to_save",  # a set value is refused in resolve()
}
_INERT_OFT = {"init_weights"}
_INERT_LORA = {
  "lora_dropout",
  "megatron_core",
  "qalora_group_size",
  "runtime_config",
  "loftq_config",
  "eva_config",
  "corda_config",
  "lora_ga_config",
  "ensure_weight_tying",
}
# init_lora_weights values that only choose how A and B start (the base weight is untouched).
_PLAIN_LORA_INITS = (True, False, "gaussian", "orthogonal", "eva")


def resolve(meta: dict, kind: str, source: str) -> dict:
  """PEFT's settings for an adapter config: the file's values over PEFT's defaults.

  Args:
    meta: the parsed `adapter_config.json`.
    kind: `"OFT"` or `"LORA"` (its `peft_type`).
    source: the file, for messages.

  Returns:
    Every field of `OFT_DEFAULTS` / `LORA_DEFAULTS`, resolved.

  Raises:
    ValueError: one line naming a field oftjax cannot represent, or a value of the wrong type.
  """
  defaults = OFT_DEFAULTS if kind == "OFT" else LORA_DEFAULTS
  known = set(defaults) | _INERT | (_INERT_OFT if kind == "OFT" else _INERT_LORA)
  for key, value in meta.items():
    if key not in known and value not in (None, False, {}, [], ""):
      raise ValueError(
        f"{source}: field '{key}' = {value!r} changes what the adapter computes "
        "and oftjax cannot represent it; use an adapter without it"
      )
  if meta.get("modules_to_save"):
    raise ValueError(
      f"{source}: modules_to_save={meta['modules_to_save']!r} stores whole "
      "modules, which oftjax cannot represent; use an adapter without it"
    )
  settings = {**defaults, **{k: meta[k] for k in defaults if k in meta}}
  if settings["bias"] != "none":
    raise ValueError(
      f"{source}: bias={settings['bias']!r} trains biases, which oftjax "
      "adapters do not hold; use an adapter made with bias='none'"
    )
  if settings["fan_in_fan_out"]:
    raise ValueError(
      f"{source}: fan_in_fan_out=true is for Conv1D (GPT-2 style) weights, "
      "not this model's linear layers; use an adapter made for this model"
    )
  for key in ("r", "num_cayley_neumann_terms") if kind == "OFT" else ("r",):
    value = settings[key]
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0:
      raise ValueError(f"{source}: {key}={value!r} is not a non-negative integer")
  for key in (("eps",) if settings["coft"] else ()) if kind == "OFT" else ("lora_alpha",):
    if not _finite_number(settings[key]):
      raise ValueError(f"{source}: {key}={settings[key]!r} is not a finite number")
  if kind == "OFT":
    dropout = settings["module_dropout"]
    if not (_finite_number(dropout) and 0 <= dropout < 1):
      raise ValueError(f"{source}: module_dropout={dropout!r} is not a probability in [0, 1)")
  if kind == "LORA":
    _check_lora(settings, source)
  return settings


def _finite_number(x) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _check_lora(settings: dict, source: str) -> None:
  init = settings["init_lora_weights"]
  if not any(init is v or (isinstance(v, str) and init == v) for v in _PLAIN_LORA_INITS):
    raise ValueError(
      f"{source}: init_lora_weights={init!r} changes the base weights or the "
      "LoRA forward (PiSSA/OLoRA/CorDA/LoftQ/MiCA...), which oftjax cannot "
      "represent; convert the adapter to a plain LoRA first"
    )
  for key in ("rank_pattern", "alpha_pattern"):
    pattern = settings[key] if settings[key] is not None else {}
    if not isinstance(pattern, dict):
      raise ValueError(f"{source}: {key} must be an object of regex -> number")
    for name, value in pattern.items():
      try:
        re.compile(name)
      except re.error as e:
        raise ValueError(f"{source}: {key} key {name!r} is not a valid regex ({e})") from None
      is_rank = _finite_number(value) and float(value).is_integer() and value >= 1
      if not (is_rank if key == "rank_pattern" else _finite_number(value)):
        raise ValueError(
          f"{source}: {key}[{name!r}]={value!r} is not a valid "
          f"{'rank' if key == 'rank_pattern' else 'alpha'}"
        )
    settings[key] = pattern
  if settings["r"] < 1:
    raise ValueError(f"{source}: r={settings['r']} (LoRA needs a rank >= 1)")


def pattern_value(pattern: dict, module: str, default):
  r"""PEFT's `rank_pattern` / `alpha_pattern` lookup for one module (first key wins).

  A key matches when it matches a dot-separated suffix of the module name
  (`re.match(rf"(.*\.)?({key})$", module)`, as `peft.utils.other.get_pattern_key`).
  """
  for key, value in pattern.items():
    if re.match(rf"(.*\.)?({key})$", module):
      return value
  return default


def lora_scale(rank: int, alpha: float, use_rslora: bool) -> float:
  """PEFT's LoRA scale: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA."""
  return alpha / math.sqrt(rank) if use_rslora else alpha / rank
