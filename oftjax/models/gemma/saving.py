"""Write our Gemma parameters as a Hugging Face folder that `transformers` loads.

The folder is written to a temporary sibling and renamed into place at the end, so a crash
never leaves a folder that looks complete. A model loaded from a multimodal folder (Gemma 3
or Gemma 4) is written as one again: the whole multimodal config, the text decoder under
the layout transformers writes, and the other towers copied byte for byte (`towers`). Tensors are streamed into each file one
at a time (large ones in row blocks, see `safetensors_file`), so saving holds no second copy.
"""

from __future__ import annotations

import copy
import json
import os
import shutil

import jax
import numpy as np

from oftjax import atomic
from oftjax.models.gemma import gemma4_names, hf_names, safetensors_file, towers
from oftjax.models.gemma.gemma4_config import Gemma4Config

TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer.model",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "added_tokens.json",
  "chat_template.jinja",
  "chat_template.json",
  "generation_config.json",
)
_ARCHITECTURES = {1: "GemmaForCausalLM", 2: "Gemma2ForCausalLM", 3: "Gemma3ForCausalLM"}
_MULTIMODAL_ARCHITECTURES = {3: "Gemma3ForConditionalGeneration"}


def _flat(params) -> dict:
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return {tuple(str(getattr(k, "key", k)) for k in path): v for path, v in leaves}


def _family(cfg):
  """`(architecture, tensor specs, names)` of a Gemma 1-3 or Gemma 4 config.

  `names` is the family's naming module: `file_name(name, cfg)`, `is_tower_tensor(name, cfg)`.
  """
  if isinstance(cfg, Gemma4Config):
    arch = "Gemma4ForConditionalGeneration" if cfg.multimodal else "Gemma4ForCausalLM"
    return arch, gemma4_names.tensor_specs(cfg), gemma4_names
  arch = (_MULTIMODAL_ARCHITECTURES if cfg.multimodal else _ARCHITECTURES)[cfg.generation]
  return arch, hf_names.tensor_specs(cfg), hf_names


def _write_config(folder: str, cfg, architecture: str, dtype_name: str) -> None:
  """Writes `config.json`: the whole config of a multimodal model, else the text one."""
  if cfg.hf_config is None:
    raise ValueError("model.config.hf_config is None: build the model with from_hf_config or load")
  hf = copy.deepcopy(cfg.hf_multimodal_config if cfg.multimodal else cfg.hf_config)
  hf.architectures = [architecture]
  hf.dtype = dtype_name
  hf.save_pretrained(folder)


def _shards(specs, flat, max_shard_bytes: int):
  shards, current, size = [], [], 0
  for spec in specs:
    leaf = flat[spec.path]
    nbytes = int(np.prod(spec.hf_shape)) * np.dtype(leaf.dtype).itemsize
    if current and size + nbytes > max_shard_bytes:
      shards.append(current)
      current, size = [], 0
    current.append(spec)
    size += nbytes
  shards.append(current)
  return shards


_BLOCK_BYTES = 64 * 1024 * 1024


def _hf_blocks(spec, flat):
  """`blocks()` of one HF tensor: one layer's slice, or row blocks of a large 2-D tensor.

  Only one block is converted to NumPy (and transposed) at a time, so a save never holds
  a second copy of the model, nor even of the embedding.
  """
  leaf = flat[spec.path]

  def blocks():
    if spec.layer is not None:
      yield hf_names.to_hf(np.asarray(leaf[spec.layer]), spec.kind)
      return
    if leaf.ndim != 2 or spec.kind not in ("id", "T"):
      yield hf_names.to_hf(np.asarray(leaf), spec.kind)
      return
    rows, row_bytes = spec.hf_shape[0], spec.hf_shape[1] * np.dtype(leaf.dtype).itemsize
    step = max(1, _BLOCK_BYTES // max(row_bytes, 1))
    for start in range(0, rows, step):
      stop = min(rows, start + step)
      part = leaf[start:stop] if spec.kind == "id" else leaf[:, start:stop]
      yield hf_names.to_hf(np.asarray(part), spec.kind)

  return blocks


def save(
  path,
  model,
  params,
  tokenizer_dir=None,
  max_shard_bytes: int = 2 * 1024**3,
  overwrite: bool = False,
):
  """Writes a Hugging Face Gemma folder: `config.json`, safetensors weights, tokenizer files.

  A model loaded from a multimodal folder (`Gemma3ForConditionalGeneration`,
  `Gemma4ForConditionalGeneration`) is written as one again, with the same config: its
  vision (and audio) tensors are copied byte for byte from the source folder (`towers`).

  Args:
    path: the folder to create.
    model: a `Gemma` or `Gemma4` module whose `config.hf_config` is set (from `load` or
      `from_hf_config`).
    params: its parameter tree (base weights only; merge adapters first).
    tokenizer_dir: folder to copy tokenizer files (and `generation_config.json`) from;
      when None or not a folder (e.g. a hub id), `model.config.source_dir` (the folder or
      hub snapshot the model was loaded from) is used.
    max_shard_bytes: above this size the weights are split into
      `model-0000i-of-0000n.safetensors` with a `model.safetensors.index.json`.
    overwrite: replace an existing folder at `path` (otherwise it is an error).

  Returns:
    The path written.

  Raises:
    FileExistsError: `path` exists and `overwrite` is False.
    ValueError: params hold leaves the checkpoint format does not (e.g. unmerged adapters),
      or leaves are missing, or a multimodal model has no source folder for its towers.
  """
  cfg = model.config
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"{path}: already exists (pass overwrite=True to replace it)")
  architecture, specs, names = _family(cfg)
  kept_towers = []
  if cfg.multimodal:
    kept_towers = towers.tower_tensors(cfg.source_dir, lambda n: names.is_tower_tensor(n, cfg))
  flat = _flat(params)
  expected = {s.path for s in specs}
  extra = sorted("/".join(p) for p in flat if p not in expected)
  if extra:
    raise ValueError(
      f"params leaf {extra[0]!r} has no Hugging Face equivalent (merge adapters before saving)"
    )
  missing = sorted("/".join(p) for p in expected if p not in flat)
  if missing:
    raise ValueError(f"params miss leaf {missing[0]!r}")
  dtype_name = str(np.dtype(flat[specs[0].path].dtype))

  with atomic.replace_folder(path) as tmp:
    _write_config(tmp, cfg, architecture, dtype_name)
    shards = _shards(specs, flat, max_shard_bytes)
    files = len(shards) + (1 if kept_towers else 0)  # the towers, if any, go in the last file
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
      name = "model.safetensors" if files == 1 else f"model-{i + 1:05d}-of-{files:05d}.safetensors"
      entries = [
        (names.file_name(s.hf_name, cfg), s.hf_shape, flat[s.path].dtype, _hf_blocks(s, flat))
        for s in shard
      ]
      total += safetensors_file.write(os.path.join(tmp, name), entries, metadata={"format": "pt"})
      weight_map.update({n: name for n, *_ in entries})
    if kept_towers:
      last = f"model-{files:05d}-of-{files:05d}.safetensors"
      weight_map.update(towers.write_towers(tmp, last, kept_towers))
      total += sum(t.nbytes for t in kept_towers)
    if files > 1:
      index = {"metadata": {"total_size": total}, "weight_map": weight_map}
      with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as fh:
        json.dump(index, fh, indent=2, sort_keys=True)
    source = tokenizer_dir if tokenizer_dir and os.path.isdir(tokenizer_dir) else cfg.source_dir
    if source:
      for fname in TOKENIZER_FILES:
        src = os.path.join(source, fname)
        if os.path.isfile(src):
          shutil.copy2(src, os.path.join(tmp, fname))
  return path
