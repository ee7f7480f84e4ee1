"""PEFT as the oracle: adapters written by PEFT itself, and loading checked for silent drops."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings

import numpy as np
import peft
from peft.tuners.tuners_utils import BaseTunerLayer
import safetensors.numpy
import torch

_LOGGERS = ("", "peft", "transformers")


@contextlib.contextmanager
def captured_messages():
  """Collects every warning and every WARNING+ log record (root, peft, transformers)."""
  messages = []

  class _Handler(logging.Handler):
    def emit(self, record):
      messages.append(f"log {record.name}: {record.getMessage()}")

  handler = _Handler(logging.WARNING)
  loggers = [logging.getLogger(name) for name in _LOGGERS]
  for logger in loggers:
    logger.addHandler(handler)
  try:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      yield messages
    messages.extend(f"{w.category.__name__}: {w.message}" for w in caught)
  finally:
    for logger in loggers:
      logger.removeHandler(handler)


def key_messages(messages) -> list[str]:
  """The messages about adapter keys (missing, unexpected, unmatched targets)."""
  needles = ("key", "target module", "target_modules")
  return [m for m in messages if any(n in m.lower() for n in needles)]


def load_peft(base: torch.nn.Module, adapter_dir: str):
  """`PeftModel.from_pretrained` on `base`; asserts it loads every tensor and no other.

  Missing keys (PEFT warns) and unexpected keys (PEFT silently drops them) both fail, as
  does any warning or log line about keys or target modules.
  """
  with captured_messages() as messages:
    model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
  assert not key_messages(messages), key_messages(messages)
  saved = set(safetensors.numpy.load_file(os.path.join(adapter_dir, "adapter_model.safetensors")))
  held = set(peft.get_peft_model_state_dict(model, save_embedding_layers=False))
  assert saved == held, (
    f"file-only keys {sorted(saved - held)[:3]}, model-only keys {sorted(held - saved)[:3]}"
  )
  return model


def tuner_modules(model) -> list[str]:
  """Names of the modules PEFT wrapped with an adapter layer."""
  return [name for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def randomize_adapter_(model, seed: int, std: float) -> None:
  """Nonzero random adapter weights (PEFT initialises OFT to R = I and LoRA's B to zero)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "oft_R" in name or "lora_" in name:
        p.copy_(torch.randn(p.shape, generator=gen) * std)


def logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()
