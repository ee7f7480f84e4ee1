"""What `save` does differently for Gemma 4: its config, its names, and the other towers.

A `gemma4_text` model is written as a `Gemma4ForCausalLM` folder. A model loaded from a
multimodal (`gemma4`) folder is written back as a `Gemma4ForConditionalGeneration` folder:
the whole multimodal config, the text decoder under `model.language_model.`, and every
tower tensor (vision, audio, their embedders) copied byte for byte from the source files
into the last weight file, streamed in chunks (they are never decoded or held whole in
memory).
"""

from __future__ import annotations

import copy
import functools
import os

from oftjax.models.gemma import gemma4_names, safetensors_file
from oftjax.models.gemma.gemma4_config import Gemma4Config
from oftjax.models.gemma.loading import _weight_files

_COPY_CHUNK = 16 * 1024 * 1024


def write_config(folder: str, cfg: Gemma4Config, dtype_name: str) -> None:
  """Writes `config.json`: the multimodal config of a multimodal model, else the text one.

  Raises:
    ValueError: the model carries no Hugging Face config.
  """
  if cfg.hf_config is None:
    raise ValueError("model.config.hf_config is None: build the model with from_hf_config or load")
  if cfg.multimodal:
    hf = copy.deepcopy(cfg.hf_multimodal_config)
    hf.architectures = ["Gemma4ForConditionalGeneration"]
  else:
    hf = copy.deepcopy(cfg.hf_config)
    hf.architectures = ["Gemma4ForCausalLM"]
  hf.dtype = dtype_name
  hf.save_pretrained(folder)


def tower_tensors(cfg: Gemma4Config) -> list[tuple[str, str, dict, int]]:
  """The tower tensors of a multimodal model's source folder, read from file headers only.

  Args:
    cfg: the model config (`source_dir` set by `load`).

  Returns:
    `(name, source_file, header_entry, data_start)` per tower tensor, in file order; empty
    for a text-only model.

  Raises:
    ValueError: a multimodal model without a safetensors source folder to copy them from.
  """
  if not cfg.multimodal:
    return []
  if not cfg.source_dir or not os.path.isdir(cfg.source_dir):
    raise ValueError(
      "saving a multimodal Gemma 4 needs its source folder for the vision and "
      "audio tensors; load the model with gemma.load(folder)"
    )
  found = []
  for path in _weight_files(cfg.source_dir, allow_pickle=False):
    with open(path, "rb") as fh:
      header, data_start = safetensors_file.read_header(path, fh)
    entries = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
    found += [
      (name, path, entry, data_start)
      for name, entry in entries
      if gemma4_names.is_tower_tensor(name, cfg)
    ]
  return found


def copy_towers(
  folder: str, file_name: str, towers: list[tuple[str, str, dict, int]]
) -> dict[str, str]:
  """Writes the tower tensors, bytes unchanged, into the safetensors file `folder/file_name`.

  Args:
    folder: the folder being written.
    file_name: the weight file to create.
    towers: from :func:`tower_tensors` (not empty).

  Returns:
    `{tensor name: file_name}` for the weight-map index.
  """

  def blocks(path, entry, data_start, name):
    begin, end = entry["data_offsets"]
    with open(path, "rb") as src:
      src.seek(data_start + begin)
      left = end - begin
      while left:
        chunk = src.read(min(left, _COPY_CHUNK))
        if not chunk:
          raise ValueError(f"{os.path.basename(path)}: tensor data of {name!r} is truncated")
        yield chunk
        left -= len(chunk)

  entries = [
    (
      name,
      tuple(entry["shape"]),
      entry["dtype"],
      functools.partial(blocks, path, entry, start, name),
    )
    for name, path, entry, start in towers
  ]
  safetensors_file.write(os.path.join(folder, file_name), entries, metadata={"format": "pt"})
  return {name: file_name for name, *_ in towers}
