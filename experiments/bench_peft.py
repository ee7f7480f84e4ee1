"""Hugging Face PEFT side of the benchmark: the same Gemma config and batch in PyTorch (CPU).

`peft_oft`: `OFTConfig(r=0, oft_block_size=b, use_cayley_neumann=True)`;
`peft_lora16`: `LoraConfig(r=16)`; both on the same seven projections as oftjax,
fp32, one AdamW step (forward, backward, update) per `step()`.
"""

from __future__ import annotations

import time

from bench_jax import TARGET_NAMES, hf_config
import numpy as np


def configure_threads(threads: int) -> dict:
  import torch

  torch.set_num_threads(threads)
  return {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}


class TorchRunner:
  """A PEFT-wrapped `Gemma3ForCausalLM` and its AdamW optimizer; `step()` = one update."""

  def __init__(self, name, model, tokens):
    import torch

    self.name = name
    self.model = model
    self.model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    self.optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)
    self.tokens = torch.from_numpy(np.asarray(tokens, np.int64))
    self.stats = {"trainable_params": int(sum(p.numel() for p in trainable))}
    self.loss = float("nan")

  def step(self):
    out = self.model(input_ids=self.tokens, labels=self.tokens)
    out.loss.backward()
    self.optimizer.step()
    self.optimizer.zero_grad(set_to_none=True)
    self.loss = float(out.loss.detach())

  def close(self):
    self.model = self.optimizer = None


def build_peft_runners(
  d_model, block_size, seq, tokens, methods, *, layers=1, num_terms=6, seed=0, log=print
):
  """PEFT runners on the config `bench_jax.hf_config` builds, fed the same `tokens`."""
  import peft
  import torch
  import transformers

  cfg = hf_config(d_model, layers=layers, seq=seq)
  runners = {}
  for name in methods:
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    base = transformers.Gemma3ForCausalLM(cfg).to(torch.float32)
    if name == "peft_oft":
      pcfg = peft.OFTConfig(
        target_modules=TARGET_NAMES,
        r=0,
        oft_block_size=block_size,
        use_cayley_neumann=True,
        num_cayley_neumann_terms=num_terms,
      )
    elif name == "peft_lora16":
      pcfg = peft.LoraConfig(target_modules=TARGET_NAMES, r=16, lora_alpha=16)
    else:
      raise ValueError(f"unknown PEFT method {name!r}")
    runners[name] = TorchRunner(name, peft.get_peft_model(base, pcfg), tokens)
    runners[name].stats["build_s"] = time.perf_counter() - t0
    log(f"  built {name:10s} in {time.perf_counter() - t0:5.1f}s")
  return runners
