"""oftjax.atomic: a destination holds the old content or the new, never a part, and no
temporary sibling outlives a write."""

import json
import os

import pytest

from oftjax import atomic


class Boom(Exception):
  pass


def test_file_is_replaced_whole_and_kept_on_failure(tmp_path):
  path = tmp_path / "summary.json"
  atomic.write_json(path, {"b": 1, "a": [2]}, indent=2, sort_keys=True, trailing_newline=True)
  assert path.read_text() == json.dumps({"a": [2], "b": 1}, indent=2, sort_keys=True) + "\n"
  with pytest.raises(Boom):
    with atomic.replace_file(path) as f:
      f.write("half")
      raise Boom
  assert json.loads(path.read_text()) == {"a": [2], "b": 1}
  assert os.listdir(tmp_path) == ["summary.json"]


def test_folder_is_swapped_whole_and_kept_on_failure(tmp_path):
  path = tmp_path / "out" / "adapter"
  with atomic.replace_folder(path) as staging:
    assert not path.exists()  # nothing visible before it is complete
    with open(os.path.join(staging, "old.txt"), "w") as f:
      f.write("1")
  with atomic.replace_folder(path) as staging:
    with open(os.path.join(staging, "new.txt"), "w") as f:
      f.write("2")
  assert os.listdir(path) == ["new.txt"]
  with pytest.raises(Boom):
    with atomic.replace_folder(path) as staging:
      with open(os.path.join(staging, "partial.txt"), "w") as f:
        f.write("3")
      raise Boom
  assert os.listdir(path) == ["new.txt"]
  assert os.listdir(tmp_path / "out") == ["adapter"]  # no staging or set-aside folder left
