"""Load a Hugging Face Gemma checkpoint folder (or hub id) into our Linen model.

Weights are read parameter by parameter (all layers of one stacked parameter, then the next;
large 2-D tensors such as the embedding in row blocks) into a buffer in the target dtype,
through a donated in-place update on the device, so host memory never holds the model twice,
and an `on_param` hook (e.g. quantization) can shrink each parameter before the next is
read. Safetensors files are read with plain positioned reads (the format is an 8-byte header
length, a JSON header and raw little-endian data) rather than `safe_open`'s memory map, whose
touched pages would count as a second copy of the weights in the process's resident memory.
"""

from __future__ import annotations

import functools
import glob
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from oftjax.models.gemma import gemma4_config, gemma4_names, safetensors_file
from oftjax.models.gemma.config import SUPPORTED_MODEL_TYPES, from_hf_config
from oftjax.models.gemma.gemma4_model import Gemma4
from oftjax.models.gemma.hf_names import TensorSpec, canonical_name, tensor_specs, to_flax
from oftjax.models.gemma.model import Gemma

_MODEL_TYPES = SUPPORTED_MODEL_TYPES + gemma4_config.MODEL_TYPES

_CHUNK_BYTES = 64 * 1024 * 1024


def resolve_folder(path_or_id: str) -> str:
  """Returns a local folder: `path_or_id` itself, or a hub snapshot of it.

  Raises:
    FileNotFoundError: a local-looking path that does not exist, or a download that failed.
  """
  path = os.path.expanduser(str(path_or_id))
  if os.path.isdir(path):
    return path
  if os.path.exists(path):
    raise FileNotFoundError(f"{path}: not a folder (expected a Hugging Face model folder)")
  looks_local = os.path.isabs(path) or path.startswith(".") or path.count("/") != 1
  if looks_local:
    raise FileNotFoundError(f"{path}: no such folder")
  import huggingface_hub

  try:
    return huggingface_hub.snapshot_download(
      path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"]
    )
  except Exception as err:  # offline, unknown repo, gated, ...
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    raise FileNotFoundError(
      f"could not download {path!r} from the Hugging Face Hub: {first}"
    ) from None


def read_hf_config(folder: str):
  """Reads `config.json` through transformers, refusing non-Gemma model types.

  Raises:
    FileNotFoundError: no `config.json`.
    ValueError: unreadable JSON or a `model_type` that is not a Gemma text decoder.
  """
  config_path = os.path.join(folder, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{config_path}: missing (not a Hugging Face model folder)")
  try:
    with open(config_path) as fh:
      raw = json.load(fh)
  except json.JSONDecodeError as err:
    raise ValueError(f"{config_path}: invalid JSON ({err})") from None
  model_type = raw.get("model_type")
  if str(model_type).startswith("gemma3n"):
    raise ValueError(
      f"{config_path}: Gemma 3n (model_type {model_type!r}: AltUp, LAuReL) is not supported"
    )
  if model_type not in _MODEL_TYPES:
    raise ValueError(
      f"{config_path}: unsupported model_type {model_type!r} "
      f"(expected one of {', '.join(_MODEL_TYPES)})"
    )
  if model_type in gemma4_config.MODEL_TYPES:
    try:
      gemma4_config.check_raw_config(raw)
    except ValueError as err:
      raise ValueError(f"{config_path}: {err}") from None
  from transformers import AutoConfig

  try:
    return AutoConfig.from_pretrained(folder)
  except (KeyError, TypeError, ValueError) as err:  # transformers' own validation
    first = (str(err).strip().strip('"').splitlines() or [type(err).__name__])[0]
    raise ValueError(f"{config_path}: transformers rejects this config ({first})") from None


def _weight_files(folder: str, allow_pickle: bool) -> list[str]:
  index = os.path.join(folder, "model.safetensors.index.json")
  if os.path.isfile(index):
    with open(index) as fh:
      names = sorted(set(json.load(fh)["weight_map"].values()))
    files = [os.path.join(folder, n) for n in names]
    for f in files:
      if not os.path.isfile(f):
        raise FileNotFoundError(f"{f}: listed in {index} but missing")
    return files
  files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
  if files:
    return files
  pickles = sorted(glob.glob(os.path.join(folder, "*.bin")))
  if pickles and not allow_pickle:
    raise ValueError(
      f"{folder}: only pickle checkpoints ({os.path.basename(pickles[0])}); "
      "refusing to unpickle, pass allow_pickle=True if you trust the file"
    )
  if pickles:
    return pickles
  raise FileNotFoundError(f"{folder}: no *.safetensors weight files")


def _iter_tensors(path: str):
  """Yields `(name, shape, read(rows=None))` for each tensor of one weight file.

  `read` stays valid after the iteration (it opens the file itself), so tensors can be
  read in any order.
  """
  if path.endswith(".bin"):
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    for name, t in state.items():

      def read(rows=None, t=t):
        t2 = t if rows is None else t[rows[0] : rows[1]]
        return t2.float().numpy() if t2.dtype == torch.bfloat16 else t2.numpy()

      yield name, tuple(t.shape), read
    return
  with open(path, "rb") as fh:
    header, data_start = safetensors_file.read_header(path, fh)
  for name, info in header.items():
    dtype = safetensors_file.DTYPES.get(info["dtype"])
    if dtype is None:
      raise ValueError(
        f"{os.path.basename(path)}: tensor {name!r} has unsupported dtype {info['dtype']}"
      )
    shape = tuple(info["shape"])
    begin, end = info["data_offsets"]

    def read(rows=None, shape=shape, dtype=dtype, begin=begin, end=end, name=name):
      lo, hi = (0, shape[0]) if rows is None else rows
      row_bytes = (end - begin) // max(shape[0], 1) if shape else end - begin
      out = np.empty((hi - lo,) + shape[1:] if shape else (), dtype)
      with open(path, "rb") as fh:
        fh.seek(data_start + begin + lo * row_bytes)
        if fh.readinto(memoryview(out.reshape(-1).view(np.uint8))) != out.nbytes:
          raise ValueError(f"{os.path.basename(path)}: tensor data of {name!r} is truncated")
      return out

    yield name, shape, read


@functools.partial(jax.jit, donate_argnums=0)
def _write(buf, x, index):
  return jax.lax.dynamic_update_slice(buf, x.astype(buf.dtype), index)


def _as_bits(dtype) -> bool:
  """Whether a device buffer of `dtype` is filled as its `uint16` bits (16-bit floats).

  XLA CPU updates a bfloat16 buffer in place about ten times slower than a uint16 one of
  the same bytes (it rewrites the whole buffer per row block): a Gemma 4 E2B table of
  4.7 GB in 64 MB blocks took minutes, and memory for a second copy.
  """
  dtype = jnp.dtype(dtype)
  return jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize == 2


@functools.partial(jax.jit, static_argnums=1, donate_argnums=0)
def _from_bits(bits, dtype):
  return jax.lax.bitcast_convert_type(bits, dtype)


def _empty(shape, on_host: bool):
  """The zero buffer a parameter is filled into: numpy on the host, else on the device."""
  if on_host:
    return np.zeros(shape.shape, shape.dtype)
  return jnp.zeros(shape.shape, jnp.uint16 if _as_bits(shape.dtype) else shape.dtype)


def _filled(buf, dtype):
  """A filled `_empty` buffer as a parameter of `dtype`."""
  return _from_bits(buf, jnp.dtype(dtype)) if buf.dtype == jnp.uint16 else buf


def _fill(buffers: dict, spec: TensorSpec, read, convert, dtype) -> None:
  buf = buffers[spec.path]
  ndim = len(spec.hf_shape)
  rows = spec.hf_shape[0]
  itemsize = np.dtype(dtype).itemsize
  chunk = rows
  if spec.layer is None and ndim == 2 and spec.kind in ("id", "T"):
    chunk = max(1, _CHUNK_BYTES // (itemsize * 4 * spec.hf_shape[1]))
  for start in range(0, rows, chunk):
    stop = min(rows, start + chunk)
    part = read(None if chunk == rows else (start, stop))
    part = np.ascontiguousarray(convert(np.asarray(part), spec)).astype(dtype)
    if buf.dtype == jnp.uint16:  # a 16-bit float device buffer filled as bits (`_as_bits`)
      part = part.view(np.uint16)
    if spec.layer is not None:
      index = (spec.layer,) + (0,) * part.ndim
      part = part[None]
    elif spec.kind == "T":
      index = (0, start)
    else:
      index = (start,) + (0,) * (part.ndim - 1)
    if isinstance(buf, np.ndarray):  # host buffers: plain in-place slice assignment
      buf[tuple(slice(i, i + n) for i, n in zip(index, part.shape))] = part
    else:
      buffers[spec.path] = buf = _write(buf, part, tuple(np.int32(i) for i in index))
      buf.block_until_ready()  # the host block may be aliased until the write has run
    del part


def model_from_hf_config(hf_config, dtype=jnp.float32, param_dtype=None, remat: bool | str = False):
  """A `Gemma` (Gemma 1-3) or `Gemma4` module from a transformers config (no weights)."""
  if getattr(hf_config, "model_type", None) in gemma4_config.MODEL_TYPES:
    cfg = gemma4_config.from_hf_config(hf_config, dtype=dtype, param_dtype=param_dtype, remat=remat)
    return Gemma4(cfg)
  return Gemma(from_hf_config(hf_config, dtype=dtype, param_dtype=param_dtype, remat=remat))


def load_model(path_or_id, dtype=jnp.float32, param_dtype=None, remat: bool | str = False):
  """The `Gemma` or `Gemma4` module of a Hugging Face folder or hub id, from its config alone.

  Lets a caller trace the model (e.g. record adapter geometries) before `load`.
  """
  folder = resolve_folder(path_or_id)
  model = model_from_hf_config(
    read_hf_config(folder), dtype=dtype, param_dtype=param_dtype, remat=remat
  )
  return model.clone(config=model.config.replace(source_dir=os.path.abspath(folder)))


def _checkpoint_names(cfg):
  """`(specs, canonical_name(file_name) -> name or None, convert(array, spec))` of a family."""
  if isinstance(cfg, gemma4_config.Gemma4Config):
    return (
      gemma4_names.tensor_specs(cfg),
      lambda n: gemma4_names.canonical_name(n, cfg),
      lambda x, spec: gemma4_names.to_flax(x, spec, cfg),
    )
  return tensor_specs(cfg), canonical_name, lambda x, spec: to_flax(x, spec.kind, cfg)


def load(
  path_or_id,
  dtype=jnp.float32,
  allow_pickle: bool = False,
  param_dtype=None,
  remat: bool | str = False,
  on_host: bool = False,
  on_param=None,
):
  """Loads a Hugging Face Gemma 1/2/3/4 checkpoint.

  Args:
    path_or_id: a local folder with `config.json` and `*.safetensors` (single or sharded with
      `model.safetensors.index.json`), or a hub id (downloaded with `snapshot_download`).
      Multimodal Gemma 3 and Gemma 4 folders are accepted: the text decoder is loaded; the
      vision and audio tensors are skipped without being read.
    dtype: compute dtype, and parameter dtype unless `param_dtype` is given.
    allow_pickle: allow `*.bin` (pickle) checkpoints when no safetensors are present.
    param_dtype: parameter dtype; defaults to `dtype`.
    remat: the rematerialisation policy of the decoder layers in the backward pass (one of
      `oftjax.models.remat.POLICIES`: 'none', 'full', 'dots', 'dots_no_batch'; `True` is
      'full', `False` 'none').
    on_host: return host (NumPy) arrays instead of arrays on the default device, so a
      caller can `jax.device_put` them straight into their shards of a mesh and no
      single accelerator ever holds the whole model (the finetuning job does this on
      GPU/TPU). On CPU the default device is host memory anyway, and filling device
      buffers in place keeps the peak lower.
    on_param: `on_param(path, array) -> {leaf_name: value}`, called as soon as the
      parameter at key path `path` (e.g. `('layers', 'mlp', 'up_proj', 'kernel')`, all
      layers stacked) is complete; its result replaces that leaf in its parent node. With
      `oftjax.quant.quantize_on_load` the kernels are quantized as they arrive, so no
      full-precision copy of the model is ever held (parameters are read one at a time).

  Returns:
    `(model, params)`: a `Gemma` or `Gemma4` module (with `model.config.hf_config` and
    `model.config.source_dir` set) and its parameter tree.

  Raises:
    FileNotFoundError: missing folder, `config.json` or weight files.
    ValueError: unsupported model_type, pickle-only folder, unexpected/missing tensors or
      mismatched shapes (the message names the file and tensor).
  """
  model = load_model(path_or_id, dtype=dtype, param_dtype=param_dtype, remat=remat)
  cfg, folder = model.config, model.config.source_dir
  files = _weight_files(folder, allow_pickle)

  all_specs, canonical, convert = _checkpoint_names(cfg)
  specs = {s.hf_name: s for s in all_specs}
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))[
    "params"
  ]
  flat_shapes = {
    tuple(k.key for k in p): v for p, v in jax.tree_util.tree_flatten_with_path(shapes)[0]
  }
  sources: dict[tuple, list] = {p: [] for p in flat_shapes}  # every check before any weight is read
  found: set[str] = set()
  for file in files:
    fname = os.path.basename(file)
    for raw_name, shape, read in _iter_tensors(file):
      name = canonical(raw_name)
      if name is None or (name == "lm_head.weight" and cfg.tie_word_embeddings):
        continue
      spec = specs.get(name)
      if spec is None:
        raise ValueError(
          f"{fname}: unexpected tensor {raw_name!r} for a {cfg.hf_config.model_type} model"
        )
      if shape != spec.hf_shape:
        raise ValueError(
          f"{fname}: tensor {raw_name!r} has shape {list(shape)}, expected {list(spec.hf_shape)}"
        )
      sources[spec.path].append((spec, read))
      found.add(name)
  missing = [n for n in specs if n not in found]
  if missing:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise ValueError(f"{folder}: missing tensor {missing[0]!r}{more}")

  tree: dict[str, Any] = {}
  for path, shape in flat_shapes.items():  # parameter-major: one full-precision buffer at a time
    buffers = {path: _empty(shape, on_host)}
    for spec, read in sources.pop(path):
      _fill(buffers, spec, read, convert, cfg.param_dtype)
    value = _filled(buffers.pop(path), shape.dtype)
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node.update(on_param(path, value) if on_param else {path[-1]: value})
  return model, tree
