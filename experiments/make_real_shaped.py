"""Makes a random-weight Hugging Face folder with the dimensions of a real Gemma checkpoint.

The folder has the real model's `config.json` (built with transformers' own config class),
bf16 safetensors shards with every tensor the real checkpoint has, at its real shape
(names and shapes from the transformers model built on the meta device, so nothing is
allocated), and the small shipped tokenizer (its ids are all below the real vocabulary, so
a run works; only its text is unlike the real tokenizer's). Weights are drawn in row blocks
and streamed into each shard (`oftjax.models.gemma.safetensors_file`): making a 5-billion
parameter folder needs a few hundred MB of memory.

  python experiments/make_real_shaped.py gemma-3-1b-pt /tmp/gemma-3-1b-shaped
  python experiments/make_real_shaped.py gemma-4-E2B /tmp/e2b-shaped --layers 10
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import zlib

import ml_dtypes
import numpy as np

from oftjax.models.gemma import safetensors_file

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
TOKENIZER = os.path.join(ASSETS, "tokenizer")
_S, _F = "sliding_attention", "full_attention"

# The text configs of the released checkpoints (their `config.json`, as published).
REAL_CONFIGS = {
  "gemma-3-1b-pt": (
    "Gemma3TextConfig",
    dict(
      vocab_size=262144,
      hidden_size=1152,
      intermediate_size=6912,
      num_hidden_layers=26,
      num_attention_heads=4,
      num_key_value_heads=1,
      head_dim=256,
      hidden_activation="gelu_pytorch_tanh",
      max_position_embeddings=32768,
      rms_norm_eps=1e-6,
      query_pre_attn_scalar=256,
      sliding_window=512,
      layer_types=[_F if (i + 1) % 6 == 0 else _S for i in range(26)],
      rope_parameters={
        _F: {"rope_type": "default", "rope_theta": 1_000_000.0},
        _S: {"rope_type": "default", "rope_theta": 10_000.0},
      },
      attn_logit_softcapping=None,
      final_logit_softcapping=None,
      tie_word_embeddings=True,
    ),
  ),
  "gemma-4-E2B": (
    "Gemma4TextConfig",
    dict(
      vocab_size=262144,
      hidden_size=1536,
      intermediate_size=6144,
      num_hidden_layers=35,
      num_attention_heads=8,
      num_key_value_heads=1,
      head_dim=256,
      global_head_dim=512,
      hidden_activation="gelu_pytorch_tanh",
      max_position_embeddings=131072,
      rms_norm_eps=1e-6,
      sliding_window=512,
      layer_types=[_S, _S, _S, _S, _F] * 7,
      num_kv_shared_layers=20,
      use_double_wide_mlp=True,
      hidden_size_per_layer_input=256,
      vocab_size_per_layer_input=262144,
      attention_k_eq_v=False,
      enable_moe_block=False,
      final_logit_softcapping=30.0,
      tie_word_embeddings=True,
      rope_parameters={
        _S: {"rope_type": "default", "rope_theta": 10_000.0},
        _F: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6},
      },
    ),
  ),
}

_BLOCK_ELEMENTS = 16 * 1024 * 1024
_SHARD_BYTES = 2 * 1024**3


def config_for(name: str, layers: int | None = None):
  """The transformers config of `name`, optionally cut to its first `layers` layers.

  A depth-reduced Gemma 4 keeps the real widths and the layer pattern, and shares KV in the
  same fraction of its last layers (the per-layer-embedding table shrinks with the depth).
  """
  import transformers

  class_name, kwargs = REAL_CONFIGS[name]
  kwargs = dict(kwargs)
  if layers is not None:
    full = kwargs["num_hidden_layers"]
    kwargs["layer_types"] = kwargs["layer_types"][:layers]
    if "num_kv_shared_layers" in kwargs:
      kwargs["num_kv_shared_layers"] = kwargs["num_kv_shared_layers"] * layers // full
    kwargs["num_hidden_layers"] = layers
  tokenizer = transformers.AutoTokenizer.from_pretrained(TOKENIZER)
  ids = dict(
    pad_token_id=tokenizer.pad_token_id,
    eos_token_id=tokenizer.eos_token_id,
    bos_token_id=tokenizer.bos_token_id,
  )
  return getattr(transformers, class_name)(**kwargs, **ids)


def tensor_shapes(config) -> dict[str, tuple]:
  """`{name: shape}` of every tensor `save_pretrained` would write (tied head left out)."""
  import torch
  import transformers

  with torch.device("meta"):
    model = transformers.AutoModelForCausalLM.from_config(config)
  shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  if config.tie_word_embeddings:
    shapes.pop("lm_head.weight", None)
  return shapes


def _blocks(name: str, shape: tuple, one_d_value: float):
  """Row blocks of a random tensor: N(0, 0.02) matrices, constant vectors (norms, scalars)."""

  def blocks():
    if len(shape) <= 1:
      yield np.full(shape, one_d_value, ml_dtypes.bfloat16)
      return
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    row = int(np.prod(shape[1:]))
    step = max(1, _BLOCK_ELEMENTS // row)
    for start in range(0, shape[0], step):
      rows = min(step, shape[0] - start)
      part = rng.standard_normal((rows,) + shape[1:], dtype=np.float32) * np.float32(0.02)
      yield part.astype(ml_dtypes.bfloat16)

  return blocks


def make_folder(name: str, out: str, layers: int | None = None) -> dict:
  """Writes the folder; returns `{"model", "layers", "params", "bf16_bytes", "fp32_bytes"}`."""
  config = config_for(name, layers)
  shapes = tensor_shapes(config)
  # Gemma 1-3 norms scale by (1 + w): zero is the identity. Gemma 4 scales by w itself.
  one_d = 1.0 if config.model_type.startswith("gemma4") else 0.0
  if os.path.exists(out):
    shutil.rmtree(out)
  os.makedirs(out)
  config.architectures = [type(config).__name__.replace("TextConfig", "ForCausalLM")]
  config.dtype = "bfloat16"
  config.save_pretrained(out)
  shards, current, size = [], [], 0
  for tensor, shape in shapes.items():
    nbytes = int(np.prod(shape)) * 2
    if current and size + nbytes > _SHARD_BYTES:
      shards.append(current)
      current, size = [], 0
    current.append(tensor)
    size += nbytes
  shards.append(current)
  weight_map, total = {}, 0
  for i, shard in enumerate(shards):
    file = (
      "model.safetensors"
      if len(shards) == 1
      else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    )
    entries = [(t, shapes[t], ml_dtypes.bfloat16, _blocks(t, shapes[t], one_d)) for t in shard]
    total += safetensors_file.write(os.path.join(out, file), entries, metadata={"format": "pt"})
    weight_map.update({t: file for t in shard})
  if len(shards) > 1:
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as fh:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
  for f in os.listdir(TOKENIZER):
    shutil.copy2(os.path.join(TOKENIZER, f), os.path.join(out, f))
  params = int(sum(np.prod(s) for s in shapes.values()))
  return {
    "model": name,
    "layers": config.num_hidden_layers,
    "params": params,
    "bf16_bytes": 2 * params,
    "fp32_bytes": 4 * params,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("name", choices=sorted(REAL_CONFIGS))
  parser.add_argument("out", help="folder to create (replaced if it exists)")
  parser.add_argument("--layers", type=int, default=None, help="keep only the first N layers")
  args = parser.parse_args()
  print(json.dumps(make_folder(args.name, args.out, args.layers)))


if __name__ == "__main__":
  main()
