"""The other towers of a multimodal folder, carried through `save` byte for byte.

`load` reads only the text decoder of a multimodal Gemma 3 or Gemma 4 folder; the vision
(and audio) towers and their projectors are *tower tensors*, which each family's naming
module recognises by name (`hf_names.is_tower_tensor`, `gemma4_names.is_tower_tensor`).
`save` copies them from the source files into the last weight file it writes, with the
dtype, shape and bytes they had, streamed in chunks: they are never decoded or held whole
in memory, so no cast or layout change can touch them.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import os

from oftjax.models.gemma import safetensors_file
from oftjax.models.gemma.loading import _weight_files

_COPY_CHUNK = 16 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class TowerTensor:
  """One tower tensor of a source folder, located by its safetensors header.

  Attributes:
    name: the tensor name, as in the file (and as `save` writes it again).
    source: the path of the weight file holding it.
    dtype: its safetensors dtype code (`F32`, `BF16`, ...).
    shape: its shape.
    start: the byte offset of its data in `source`.
    nbytes: the length of its data.
  """

  name: str
  source: str
  dtype: str
  shape: tuple[int, ...]
  start: int
  nbytes: int


def tower_tensors(source_dir: str | None, is_tower: Callable[[str], bool]) -> list[TowerTensor]:
  """The tower tensors of a multimodal model's source folder, read from file headers only.

  Args:
    source_dir: the folder the model was loaded from (`config.source_dir`).
    is_tower: whether a tensor name (as in the file) is a tower tensor.

  Returns:
    The tensors `is_tower` accepts, in file order.

  Raises:
    ValueError: no source folder to copy them from.
  """
  if not source_dir or not os.path.isdir(source_dir):
    raise ValueError(
      "saving a multimodal model needs its source folder for the vision (and audio) "
      "tensors; load the model with gemma.load(folder)"
    )
  found = []
  for path in _weight_files(source_dir, allow_pickle=False):
    with open(path, "rb") as fh:
      header, data_start = safetensors_file.read_header(path, fh)
    for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
      if is_tower(name):
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        found.append(
          TowerTensor(name, path, entry["dtype"], shape, data_start + begin, end - begin)
        )
  return found


def write_towers(folder: str, file_name: str, towers: list[TowerTensor]) -> dict[str, str]:
  """Writes the tower tensors, bytes unchanged, as the safetensors file `folder/file_name`.

  Args:
    folder: the folder being written.
    file_name: the weight file to create.
    towers: from `tower_tensors` (not empty).

  Returns:
    `{tensor name: file_name}` for the weight-map index.

  Raises:
    ValueError: a source file is shorter than its header says.
  """

  def chunks(t: TowerTensor):
    def blocks():
      with open(t.source, "rb") as src:
        src.seek(t.start)
        left = t.nbytes
        while left:
          chunk = src.read(min(left, _COPY_CHUNK))
          if not chunk:
            raise ValueError(
              f"{os.path.basename(t.source)}: tensor data of {t.name!r} is truncated"
            )
          yield chunk
          left -= len(chunk)

    return blocks

  entries = [(t.name, t.shape, t.dtype, chunks(t)) for t in towers]
  safetensors_file.write(os.path.join(folder, file_name), entries, metadata={"format": "pt"})
  return {t.name: file_name for t in towers}
