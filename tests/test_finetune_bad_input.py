"""Every user mistake gives one line on stderr, exit code 2, and no output that looks complete."""

import importlib.util
import json
import os

from finetune_helpers import SCRIPT, job_args
import pytest

_spec = importlib.util.spec_from_file_location("finetune_gemma", SCRIPT)
finetune = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(finetune)

GOOD = {"prompt": "copy ab:", "completion": "ab"}


def write(path, text, mode="w"):
  with open(path, mode) as f:
    f.write(text)
  return str(path)


def lines(*records):
  return "".join(json.dumps(r) + "\n" for r in records)


def run_main(capsys, argv):
  code = finetune.main(argv)
  err = capsys.readouterr().err.strip()
  return code, err


CASES = {
  "missing data file": (lambda d: ["--data", str(d / "nope.jsonl")], "nope.jsonl"),
  "empty data file": (lambda d: ["--data", write(d / "e.jsonl", "")], "empty"),
  "malformed json": (lambda d: ["--data", write(d / "m.jsonl", lines(GOOD) + "{oops\n")], "line 2"),
  "missing field": (
    lambda d: ["--data", write(d / "f.jsonl", lines(GOOD, {"prompt": "x"}))],
    "line 2",
  ),
  "wrong field type": (
    lambda d: ["--data", write(d / "t.jsonl", lines({"prompt": 3, "completion": "a"}))],
    "line 1",
  ),
  "non utf8": (
    lambda d: ["--data", write(d / "u.jsonl", lines(GOOD).encode() + b"\xff\xfe\n", "wb")],
    "line 2",
  ),
  "too long": (
    lambda d: [
      "--data",
      write(d / "l.jsonl", lines({"prompt": "copy " + "a" * 300, "completion": "a"})),
    ],
    "seq-len",
  ),
  "target matches nothing": (lambda d: ["--targets", ".*nothing_here"], "matched no"),
  "block size": (lambda d: ["--block-size", "24"], "does not divide"),
  "mesh": (lambda d: ["--mesh", "data=3"], "--mesh"),
  "missing model": (lambda d: ["--model", str(d / "no_model")], "no_model"),
  "broken model": (lambda d: ["--model", str(_broken_model(d))], "config.json"),
  "steps": (lambda d: ["--steps", "0"], "--steps must be a positive"),
  "missing adapter": (lambda d: ["--init-adapter", str(d / "no_adapter")], "adapter file missing"),
  "export exists": (lambda d: ["--export-merged", str(d)], "already exists"),
  "processes": (lambda d: ["--num-processes", "2"], "--coordinator-address"),
  "lr": (lambda d: ["--lr", "nan"], "--lr must be a finite"),
}


def _broken_model(d):
  folder = d / "broken"
  folder.mkdir()
  write(folder / "config.json", "{not json")
  return folder


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_error(case, tiny_model_dir, tmp_path, capsys):
  make_args, needle = CASES[case]
  out = tmp_path / "out"
  argv = job_args(tiny_model_dir, out) + make_args(tmp_path)
  code, err = run_main(capsys, argv)
  assert code == 2, err
  assert len(err.splitlines()) == 1 and err.startswith("error: "), err
  assert needle in err, err
  assert "Traceback" not in err
  assert not out.exists(), "a failed pre-check must not create the output directory"


@pytest.mark.slow
def test_existing_run_is_not_overwritten_and_resume_checks_config(tiny_model_dir, tmp_path, capsys):
  out = tmp_path / "out"
  code, err = run_main(capsys, job_args(tiny_model_dir, out) + ["--steps", "3"])
  assert code == 0, err
  summary = json.loads((out / "summary.json").read_text())
  assert summary["eval_after"]["accuracy"] >= 0 and summary["trainable_params"] > 0
  code, err = run_main(capsys, job_args(tiny_model_dir, out) + ["--steps", "3"])
  assert code == 2 and "--resume" in err and "--overwrite" in err
  assert (out / "summary.json").exists()
  code, err = run_main(
    capsys, job_args(tiny_model_dir, out) + ["--steps", "3", "--resume", "--lr", "0.01"]
  )
  assert code == 2 and "different lr" in err, err
  assert len(err.splitlines()) == 1
  assert (out / "summary.json").exists(), "a refused resume must not touch the finished run"
  assert os.path.isdir(out / "checkpoints")
