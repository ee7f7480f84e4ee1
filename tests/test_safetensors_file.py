"""The streamed safetensors writer: files that safetensors itself reads back exactly."""

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from oftjax.models.gemma import safetensors_file


def _rows(x, step):
  return lambda: (x[i : i + step] for i in range(0, x.shape[0], step))


def test_blocks_written_in_turn_read_back_by_safetensors(tmp_path):
  rng = np.random.default_rng(0)
  big = rng.standard_normal((7, 5)).astype(ml_dtypes.bfloat16)
  ints = np.arange(6, dtype=np.int32).reshape(2, 3)
  scalar = np.array(3.5, np.float32)
  raw = np.array([1.0, -2.0], np.float16)
  path = str(tmp_path / "x.safetensors")
  n = safetensors_file.write(
    path,
    [
      ("big", big.shape, big.dtype, _rows(big, 3)),  # 3 + 3 + 1 rows
      ("ints", ints.shape, ints.dtype, lambda: [ints]),
      ("scalar", (), np.float32, lambda: [scalar]),
      ("raw", (2,), "F16", lambda: [raw.tobytes()]),  # bytes copied unchanged
    ],
    metadata={"format": "pt"},
  )
  assert n == big.nbytes + ints.nbytes + scalar.nbytes + raw.nbytes
  back = safetensors.numpy.load_file(path)
  assert back["big"].dtype == big.dtype and np.array_equal(back["big"], big)
  assert np.array_equal(back["ints"], ints) and back["scalar"] == scalar
  assert np.array_equal(back["raw"], raw)
  with open(path, "rb") as fh:
    header, start = safetensors_file.read_header(path, fh)
  assert start % 8 == 0 and sorted(header) == ["big", "ints", "raw", "scalar"]


def test_blocks_that_do_not_fill_the_shape_are_refused(tmp_path):
  x = np.zeros((4, 2), np.float32)
  with pytest.raises(ValueError, match="'x': 16 bytes written, its shape needs 32"):
    safetensors_file.write(
      str(tmp_path / "y.safetensors"), [("x", x.shape, x.dtype, _rows(x[:2], 2))]
    )


def test_a_dtype_without_a_safetensors_name_is_refused(tmp_path):
  with pytest.raises(ValueError, match="'c': dtype complex64 has no safetensors name"):
    safetensors_file.write(str(tmp_path / "z.safetensors"), [("c", (1,), np.complex64, list)])
