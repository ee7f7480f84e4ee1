"""PEFT as the oracle: adapters written by PEFT itself, and loading checked for silent drops."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings

import gemma_helpers as H
import jax.numpy as jnp
import numpy as np
import peft
from peft.tuners.tuners_utils import BaseTunerLayer
import safetensors.numpy
import torch

import oftjax
from oftjax import peft_io

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


class OneLinear(torch.nn.Module):
  """A PyTorch model of one `nn.Linear(d_in, d_out)` named `lin`."""

  def __init__(self, d_in: int, d_out: int):
    super().__init__()
    self.lin = torch.nn.Linear(d_in, d_out)

  def forward(self, x):
    return self.lin(x)


def peft_oft_linear(d_in: int, d_out: int, **oft_fields):
  """PEFT's OFT on a fresh `OneLinear`: `(peft model, its wrapped layer lin)`.

  Args:
    d_in: input width.
    d_out: output width.
    **oft_fields: `peft.OFTConfig` fields besides `target_modules` and `r=0`.
  """
  config = peft.OFTConfig(target_modules=["lin"], r=0, **oft_fields)
  model = peft.get_peft_model(OneLinear(d_in, d_out), config)
  return model, model.base_model.model.lin


def make_oft(**kw):
  """`make_config(target_modules)`: a PEFT OFT config of block size 8 with fields `kw`."""
  return lambda targets: peft.OFTConfig(target_modules=targets, r=0, oft_block_size=8, **kw)


def make_lora(**kw):
  """`make_config(target_modules)`: a PEFT LoRA config (rank 4, alpha 8 unless `kw` says)."""
  return lambda targets: peft.LoraConfig(target_modules=targets, **{"r": 4, "lora_alpha": 8, **kw})


def peft_adapter(base, make_config, std: float, folder, seed: int = 0, targets=None):
  """A PEFT model on `base.torch_model()` with random adapter weights, saved to `folder`.

  Args:
    base: a test base with `torch_model()` and `targets` (the default target modules).
    make_config: `make_config(target_modules) -> peft config` (`make_oft`, `make_lora`).
    std: standard deviation of the random adapter weights.
    folder: where `save_pretrained` writes.
    seed: seed of the adapter weights.
    targets: target modules instead of `base.targets`.
  """
  model = peft.get_peft_model(base.torch_model(), make_config(targets or base.targets)).eval()
  randomize_adapter_(model, seed, std)
  model.save_pretrained(folder)
  return model


def oftjax_logits(model, params, tokens, adapter=None, config=None) -> np.ndarray:
  """oftjax's logits of `tokens`, with `adapter` (trained with `config`) when given."""
  params = oftjax.merge_params(params, adapter) if adapter else params
  module = oftjax.Adapted(model, config) if config else model
  return np.asarray(H.forward(module, params, jnp.asarray(tokens, jnp.int32)))


def assert_round_trip(base, make_config, std, folder, tokens, towers, tol, min_change):
  """PEFT's adapter imports with PEFT's logits, and oftjax's export loads back in PEFT.

  Args:
    base: a test base with `torch_model()`, `targets`, `naming` and `ours(adapter,
      config)` (oftjax's logits of `tokens`).
    make_config: `make_config(target_modules) -> peft config`.
    std: standard deviation of the random adapter weights.
    folder: a `pathlib.Path` to write both adapters under.
    tokens: `[batch, time]` token ids.
    towers: module-name parts PEFT must not wrap (the other towers of a multimodal base).
    tol: absolute tolerance on logits.
    min_change: the adapter moves some logit by more than this (it is not a no-op).
  """
  theirs_model = peft_adapter(base, make_config, std, folder / "peft")
  wrapped = tuner_modules(theirs_model)
  assert wrapped and not [m for m in wrapped if any(t in m for t in towers)]
  theirs = logits(theirs_model, tokens)
  assert np.abs(theirs - base.ours(None, None)).max() > min_change  # the adapter changes the model

  adapter, config = peft_io.import_peft(str(folder / "peft"), naming=base.naming)
  np.testing.assert_allclose(base.ours(adapter, config), theirs, atol=tol)

  peft_io.export_peft(str(folder / "ours"), adapter, config, naming=base.naming)
  meta = json.loads((folder / "ours" / "adapter_config.json").read_text())
  assert meta["peft_version"] == peft_io.PEFT_VERSION and isinstance(meta["target_modules"], str)
  back = load_peft(base.torch_model(), str(folder / "ours"))
  assert sorted(tuner_modules(back)) == sorted(wrapped)
  np.testing.assert_allclose(logits(back, tokens), theirs, atol=tol)
