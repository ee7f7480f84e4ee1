"""Tiny random Hugging Face Gemma 4 models for the Gemma 4 tests (built locally, no hub).

Every config has sequences longer than its sliding window in the tests, head widths that
differ between sliding and full layers, and every weight (norms, `layer_scalar` buffers
and the MoE router scales included) drawn at random away from its init value.
"""

from __future__ import annotations

import numpy as np
import torch
import transformers

VOCAB = 128  # as gemma_helpers.VOCAB, so its padded_batch / hf_logits apply
torch.set_num_threads(1)

_SLIDING, _FULL = "sliding_attention", "full_attention"
_BASE = dict(
  vocab_size=VOCAB,
  pad_token_id=0,
  eos_token_id=None,
  bos_token_id=2,
  attn_implementation="eager",
  num_attention_heads=4,
  num_key_value_heads=2,
)


def _ropes(full_partial: float, full_theta: float, sliding: dict | None = None) -> dict:
  """`rope_parameters`: proportional rope on full layers; default rope (theta 100) on
  sliding ones unless `sliding` says otherwise."""
  return {
    _SLIDING: sliding or {"rope_type": "default", "rope_theta": 100.0},
    _FULL: {
      "rope_type": "proportional",
      "partial_rotary_factor": full_partial,
      "rope_theta": full_theta,
    },
  }


# name -> Gemma4TextConfig kwargs.
CONFIGS = {
  # Top-level schema (global_head_dim / num_global_key_value_heads), k_eq_v on full layers,
  # proportional rope, PLE, KV sharing in the last 3 layers with a double-wide MLP, softcap.
  "shared": dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=6,
    head_dim=8,
    global_head_dim=16,
    num_global_key_value_heads=1,
    attention_k_eq_v=True,
    sliding_window=3,
    layer_types=[_SLIDING, _SLIDING, _FULL] * 2,
    hidden_size_per_layer_input=8,
    vocab_size_per_layer_input=VOCAB,
    num_kv_shared_layers=3,
    use_double_wide_mlp=True,
    final_logit_softcapping=6.0,
    rope_parameters=_ropes(0.5, 1000.0),
  ),
  # per_layer_config schema, linear rope on sliding layers, no PLE, untied head, no sharing.
  "per_layer": dict(
    hidden_size=32,
    intermediate_size=40,
    num_hidden_layers=4,
    head_dim=8,
    sliding_window=4,
    layer_types=[_SLIDING, _FULL, _SLIDING, _FULL],
    per_layer_config={
      "1": {"head_dim": 12, "num_key_value_heads": 4},
      "3": {"head_dim": 12, "num_key_value_heads": 4},
    },
    hidden_size_per_layer_input=0,
    tie_word_embeddings=False,
    rope_parameters=_ropes(0.25, 1e4, {"rope_type": "linear", "factor": 4.0, "rope_theta": 500.0}),
  ),
  # A repeating group, scanned: [sliding, full] x 2, then the same group x 2 KV-shared.
  "pattern": dict(
    hidden_size=48,
    intermediate_size=64,
    num_hidden_layers=8,
    head_dim=12,
    global_head_dim=24,
    sliding_window=3,
    layer_types=[_SLIDING, _FULL] * 4,
    hidden_size_per_layer_input=4,
    vocab_size_per_layer_input=VOCAB,
    num_kv_shared_layers=4,
    use_double_wide_mlp=True,
    rope_parameters=_ropes(0.25, 1e4),
  ),
  # 26B-A4B-like: every layer has the MoE branch beside its dense MLP.
  "moe": dict(
    hidden_size=32,
    intermediate_size=32,
    num_hidden_layers=3,
    head_dim=8,
    global_head_dim=16,
    num_global_key_value_heads=1,
    attention_k_eq_v=True,
    sliding_window=3,
    layer_types=[_SLIDING, _SLIDING, _FULL],
    hidden_size_per_layer_input=0,
    enable_moe_block=True,
    num_experts=4,
    top_k_experts=2,
    moe_intermediate_size=16,
    final_logit_softcapping=8.0,
    rope_parameters=_ropes(0.5, 1e4),
  ),
}
# Small vision and audio towers for multimodal folders.
VISION = dict(
  hidden_size=8,
  intermediate_size=16,
  num_hidden_layers=1,
  num_attention_heads=2,
  num_key_value_heads=2,
  head_dim=4,
)
AUDIO = dict(
  hidden_size=8,
  num_hidden_layers=1,
  num_attention_heads=2,
  output_proj_dims=8,
  subsampling_conv_channels=[4, 4],
)


def text_config(name: str, **changes) -> transformers.Gemma4TextConfig:
  """The transformers text config of a tiny test model, with some fields changed."""
  return transformers.Gemma4TextConfig(**{**_BASE, **CONFIGS[name], **changes})


def multimodal_config(name: str, **changes) -> transformers.Gemma4Config:
  """A multimodal config around the text config `name` (some fields changed), with tiny
  vision and audio towers."""
  text = {
    k: v for k, v in {**_BASE, **CONFIGS[name], **changes}.items() if k != "attn_implementation"
  }
  return transformers.Gemma4Config(
    text_config=text, vision_config=VISION, audio_config=AUDIO, attn_implementation="eager"
  )


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
  """Gives every weight and the `layer_scalar` buffers random values keeping activations O(1).

  Norm weights, scales and `layer_scalar` are drawn in [0.5, 1.5] (Gemma 4 norms multiply
  by their weight, whose init is one); matrices are normal with variance 1 / fan-in.
  """
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim <= 1:
        p.copy_(0.5 + torch.rand(p.shape, generator=gen))
      elif "embed_tokens" in name:
        p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
      else:
        p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(p.shape[-1]))
    for name, b in model.named_buffers():
      if name.endswith("layer_scalar"):
        b.copy_(0.5 + torch.rand(b.shape, generator=gen))


def make_hf_model(name: str, seed: int = 0, multimodal: bool = False, **changes):
  """A random fp32 eager `Gemma4ForCausalLM` (or `Gemma4ForConditionalGeneration`), its
  text config `name` with fields `changes`."""
  torch.manual_seed(seed)
  if multimodal:
    model = transformers.Gemma4ForConditionalGeneration(multimodal_config(name, **changes))
  else:
    model = transformers.Gemma4ForCausalLM(text_config(name, **changes))
  model = model.eval()
  randomize_(model, seed)
  return model


def save_hf_model(name: str, folder, seed: int = 0, multimodal: bool = False, **changes):
  """Builds and `save_pretrained`s a random model; returns the torch model."""
  model = make_hf_model(name, seed, multimodal, **changes)
  model.save_pretrained(folder)
  return model
