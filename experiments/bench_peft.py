"""Hugging Face PEFT side of the benchmark: the same Gemma config and batch in PyTorch (CPU).

`peft_oft`: `OFTConfig(r=0, oft_block_size=b, use_cayley_neumann=True)`;
`peft_lora16`: `LoraConfig(r=16)`; both on the same seven projections as oftjax,
fp32, one AdamW step (forward, backward, update) per `step()`.
"""

from __future__ import annotations

import time

from bench_jax import TARGET_NAMES, hf_config, peak_record
import numpy as np


def configure_threads(threads: int) -> dict:
  import torch

  torch.set_num_threads(threads)
  return {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}


class TorchRunner:
  """A PEFT-wrapped `Gemma3ForCausalLM` and its AdamW optimizer; `step()` = one update."""

  def __init__(self, name, model, tokens, device="cpu"):
    import torch

    self.name = name
    self.model = model.to(device)
    self.model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    self.optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)
    self.tokens = torch.from_numpy(np.asarray(tokens, np.int64)).to(device)
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


def _peft_config(name, block_size, num_terms):
  import peft

  if name == "peft_oft":
    return peft.OFTConfig(
      target_modules=TARGET_NAMES,
      r=0,
      oft_block_size=block_size,
      use_cayley_neumann=True,
      num_cayley_neumann_terms=num_terms,
    )
  if name == "peft_lora16":
    return peft.LoraConfig(target_modules=TARGET_NAMES, r=16, lora_alpha=16)
  raise ValueError(f"unknown PEFT method {name!r}")


def build_peft_runners(
  d_model,
  block_size,
  seq,
  tokens,
  methods,
  *,
  layers=1,
  num_terms=6,
  seed=0,
  log=print,
  dtype="float32",
  device="cpu",
):
  """PEFT runners on the config `bench_jax.hf_config` builds, fed the same `tokens`.

  `dtype` (a torch dtype name) is the base model's; the adapters get PEFT's default dtype.
  """
  import peft
  import torch
  import transformers

  cfg = hf_config(d_model, layers=layers, seq=seq)
  runners = {}
  for name in methods:
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    base = transformers.Gemma3ForCausalLM(cfg).to(getattr(torch, dtype))
    pcfg = _peft_config(name, block_size, num_terms)
    runners[name] = TorchRunner(name, peft.get_peft_model(base, pcfg), tokens, device)
    runners[name].stats["build_s"] = time.perf_counter() - t0
    log(f"  built {name:10s} in {time.perf_counter() - t0:5.1f}s")
  return runners


def build_peft_runners_on_folder(folder, shape, tokens, *, num_terms=6, log=print):
  """`peft_oft` on the Hugging Face folder `folder` (fp32), fed the same `tokens`."""
  import peft
  import torch
  import transformers

  t0 = time.perf_counter()
  base = transformers.Gemma3ForCausalLM.from_pretrained(folder, dtype=torch.float32)
  pcfg = _peft_config("peft_oft", shape["block_size"], num_terms)
  runner = TorchRunner("peft_oft", peft.get_peft_model(base, pcfg), tokens)
  runner.stats["build_s"] = time.perf_counter() - t0
  log(f"  built peft_oft   in {time.perf_counter() - t0:5.1f}s")
  return {"peft_oft": runner}


class TorchPeakRunner:
  """PyTorch's matmul throughput as a round-robin "method": one n x n x n product."""

  def __init__(self, n: int = 2048, dtype="float32", device="cpu"):
    import torch

    self.a = torch.randn(n, n, dtype=getattr(torch, dtype), device=device)
    self.b = self.a + 1.0
    self.cuda = device != "cpu"
    self.step()
    self.stats = {"n": n, "flops": 2.0 * n**3}
    self.loss = float("nan")

  def step(self):
    import torch

    torch.mm(self.a, self.b)
    if self.cuda:
      torch.cuda.synchronize()

  def close(self):
    self.a = self.b = None


def torch_matmul_peak(n: int = 2048, reps: int = 7) -> dict:
  """PyTorch's fp32 matmul throughput: median of `reps` n x n x n products (cf. XLA's)."""
  runner = TorchPeakRunner(n)
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    runner.step()
    times.append(time.perf_counter() - t0)
  return peak_record(n, times)
