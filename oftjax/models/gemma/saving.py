"""Write our Gemma parameters as a Hugging Face folder that `transformers` loads.

The folder is written to a temporary sibling and renamed into place at the end, so a crash
never leaves a folder that looks complete. Tensors are streamed into each file one at a
time (large ones in row blocks, see `safetensors_file`), so saving holds no second copy.
"""

from __future__ import annotations

import copy
import json
import os
import shutil

import jax
import numpy as np

from oftjax import atomic
from oftjax.models.gemma import gemma4_names, gemma4_saving, safetensors_file
from oftjax.models.gemma.gemma4_config import Gemma4Config
from oftjax.models.gemma.hf_names import tensor_specs, to_hf

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


def _flat(params) -> dict:
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return {tuple(str(getattr(k, "key", k)) for k in path): v for path, v in leaves}


def _write_config(folder: str, cfg, dtype_name: str) -> None:
  if cfg.hf_config is None:
    raise ValueError("model.config.hf_config is None: build the model with from_hf_config or load")
  hf = copy.deepcopy(cfg.hf_config)
  hf.architectures = [_ARCHITECTURES[cfg.generation]]
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
      yield to_hf(np.asarray(leaf[spec.layer]), spec.kind)
      return
    if leaf.ndim != 2 or spec.kind not in ("id", "T"):
      yield to_hf(np.asarray(leaf), spec.kind)
      return
    rows, row_bytes = spec.hf_shape[0], spec.hf_shape[1] * np.dtype(leaf.dtype).itemsize
    step = max(1, _BLOCK_BYTES // max(row_bytes, 1))
    for start in range(0, rows, step):
      stop = min(rows, start + step)
      part = leaf[start:stop] if spec.kind == "id" else leaf[:, start:stop]
      yield to_hf(np.asarray(part), spec.kind)

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

  A Gemma 4 model loaded from a multimodal folder is written as one again: its vision and
  audio tensors are copied byte for byte from the source folder (see `gemma4_saving`).

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
      or leaves are missing, or a multimodal Gemma 4 has no source folder for its towers.
  """
  cfg = model.config
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"{path}: already exists (pass overwrite=True to replace it)")
  gemma4 = isinstance(cfg, Gemma4Config)
  specs = gemma4_names.tensor_specs(cfg) if gemma4 else tensor_specs(cfg)
  file_name = (lambda n: gemma4_names.file_name(n, cfg)) if gemma4 else (lambda n: n)
  towers = gemma4_saving.tower_tensors(cfg) if gemma4 else []
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
    (gemma4_saving.write_config if gemma4 else _write_config)(tmp, cfg, dtype_name)
    shards = _shards(specs, flat, max_shard_bytes)
    files = len(shards) + (1 if towers else 0)  # the towers, if any, go in the last file
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
      name = "model.safetensors" if files == 1 else f"model-{i + 1:05d}-of-{files:05d}.safetensors"
      entries = [
        (file_name(s.hf_name), s.hf_shape, flat[s.path].dtype, _hf_blocks(s, flat)) for s in shard
      ]
      total += safetensors_file.write(os.path.join(tmp, name), entries, metadata={"format": "pt"})
      weight_map.update({n: name for n, *_ in entries})
    if towers:
      last = f"model-{files:05d}-of-{files:05d}.safetensors"
      weight_map.update(gemma4_saving.copy_towers(tmp, last, towers))
      total += sum(e["data_offsets"][1] - e["data_offsets"][0] for _, _, e, _ in towers)
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
