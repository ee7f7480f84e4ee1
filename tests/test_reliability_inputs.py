"""Bad inputs caught (RELIABILITY.md): more cases beyond `test_finetune_bad_input.py`, and the
security checks (no pickle or remote code, outputs confined to `--output-dir`).

Each case runs the job in-process and asserts: exit code 2, exactly one line on stderr
starting with `error:` that names the problem, no traceback, and no output directory
(a failed pre-check must not create it) or, where the folder existed before (`--resume`),
no `summary.json`.
"""

import glob
import importlib.util
import json
import os
import re
import shutil

from finetune_helpers import ASSETS, ROOT, SCRIPT
import pandas as pd
import pytest
import recorded_results
from reliability_helpers import STEPS, job, reference_run
import safetensors.numpy

_spec = importlib.util.spec_from_file_location("finetune_gemma_rel", SCRIPT)
finetune = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(finetune)


def write(path, text):
  with open(path, "w") as f:
    f.write(text)
  return str(path)


def records(*objs):
  return "".join(json.dumps(o) + "\n" for o in objs)


# ----------------------------------------------------------------------------- builders


def model_copy(base, d, name, edit):
  """A copy of the tiny model folder changed by `edit(folder)`."""
  folder = d / name
  shutil.copytree(base / "tiny-gemma3", folder)
  edit(folder)
  return str(folder)


def _tensors(folder, change):
  path = os.path.join(folder, "model.safetensors")
  tensors = safetensors.numpy.load_file(path)
  change(tensors)
  safetensors.numpy.save_file(tensors, path)


def _only_bin(folder):
  os.remove(os.path.join(folder, "model.safetensors"))
  with open(os.path.join(folder, "pytorch_model.bin"), "wb") as f:
    f.write(b"PK\x03\x04 a pickle would be here")


def _config(folder, **changes):
  path = os.path.join(folder, "config.json")
  with open(path) as f:
    config = json.load(f)
  config.update(changes)
  write(path, json.dumps(config))


GATE = "model.layers.0.mlp.gate_proj.weight"


def adapter_copy(base, d, name, config=None, tensors=None, raw=None):
  """A copy of the reference run's PEFT adapter, changed."""
  folder = d / name
  shutil.copytree(reference_run(base) / "peft_adapter", folder)
  if config is not None:
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(config)
    path.write_text(json.dumps(cfg))
  if tensors is not None:
    path = str(folder / "adapter_model.safetensors")
    t = safetensors.numpy.load_file(path)
    tensors(t)
    safetensors.numpy.save_file(t, path)
  if raw is not None:
    (folder / "adapter_model.safetensors").write_bytes(raw)
  return str(folder)


def _fewer_q_blocks(t):  # an adapter made for a model of another width
  for k in [k for k in t if "q_proj" in k]:
    t[k] = t[k][: t[k].shape[0] // 2].copy()


def _one_layer_other_shape(t):
  k = sorted(k for k in t if "layers.0." in k and "q_proj" in k)[0]
  t[k] = t[k][: t[k].shape[0] // 2].copy()


def _run_copy(base, d, damage):
  """A copy of the reference run as a crashed run would leave it, then `damage(out)`."""
  out = d / "out"
  shutil.copytree(reference_run(base), out)
  (out / "summary.json").unlink()
  damage(out)
  return out


def _truncate_all_steps(out):
  for step in (s for s in os.listdir(out / "checkpoints") if s.isdigit()):
    files = [
      f
      for f in glob.glob(str(out / "checkpoints" / step / "state" / "**" / "*"), recursive=True)
      if os.path.isfile(f)
    ]
    victim = max(files, key=os.path.getsize)
    os.truncate(victim, os.path.getsize(victim) // 2)


def _unverifiable_step_without_data(out):
  for step in (s for s in os.listdir(out / "checkpoints") if s.isdigit()):
    os.remove(out / "checkpoints" / step / "oftjax-integrity.json")
  for f in glob.glob(
    str(out / "checkpoints" / str(STEPS) / "state" / "**" / "d" / "*"), recursive=True
  ):
    os.remove(f)


def _only_half_written(out):
  shutil.rmtree(out / "checkpoints")
  (out / "checkpoints" / "3.orbax-checkpoint-tmp").mkdir(parents=True)


def parquet(d, name, frame):
  path = str(d / name)
  pd.DataFrame(frame).to_parquet(path)
  return path


def split_folder(d, name, splits):
  """A `datasets.DatasetDict.save_to_disk` folder with one copy of the shipped task's first
  records per split name."""
  import datasets

  with open(os.path.join(ASSETS, "task", "train.jsonl")) as f:
    rows = [json.loads(line) for line in f.readlines()[:8]]
  table = datasets.Dataset.from_list(rows)
  path = str(d / name)
  datasets.disable_progress_bars()  # the job's stderr must hold its error line alone
  try:
    datasets.DatasetDict({s: table for s in splits}).save_to_disk(path)
  finally:
    datasets.enable_progress_bars()
  return path


ROLE = {"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "yo"}]}

# name -> (extra flags from (base, tmp dir), needle in the error line)
CASES = {
  # CLI flags (argparse errors are one line too, not usage text)
  "unknown method": (lambda b, d: ["--method", "bogus"], "argument --method: invalid choice"),
  "unknown parameterization": (
    lambda b, d: ["--parameterization", "exact"],
    "argument --parameterization: invalid choice",
  ),
  "unknown on-nonfinite": (
    lambda b, d: ["--on-nonfinite", "ignore"],
    "argument --on-nonfinite: invalid choice",
  ),
  "non-integer steps": (lambda b, d: ["--steps", "ten"], "argument --steps: invalid int value"),
  "unknown flag": (lambda b, d: ["--stepz", "3"], "unrecognized arguments: --stepz"),
  "negative block size": (lambda b, d: ["--block-size", "-4"], "--block-size must be >= 2"),
  "grad-accum 0": (lambda b, d: ["--grad-accum", "0"], "--grad-accum must be a positive"),
  "neumann terms 1": (lambda b, d: ["--neumann-terms", "1"], "--neumann-terms must be >= 2"),
  "warmup >= steps": (lambda b, d: ["--warmup-steps", "6"], "--warmup-steps must be in"),
  "negative weight decay": (
    lambda b, d: ["--weight-decay", "-0.1"],
    "--weight-decay must be a finite non-negative",
  ),
  "resume and overwrite": (lambda b, d: ["--resume", "--overwrite"], "contradict"),
  "init-adapter with full": (
    lambda b, d: ["--method", "full", "--init-adapter", str(d)],
    "--init-adapter needs --method",
  ),
  "mesh malformed": (lambda b, d: ["--mesh", "data"], "--mesh entry 'data' is not AXIS=N"),
  "mesh unknown axis": (lambda b, d: ["--mesh", "model=1"], "--mesh entry 'model=1'"),
  "bad targets regex": (lambda b, d: ["--targets", "(q_proj"], "is not a valid regular expression"),
  "output dir is a file": (
    lambda b, d: ["--output-dir", write(d / "f", "x")],
    "is a file, not a folder",
  ),
  "export into output dir": (
    lambda b, d: ["--export-merged", str(d / "out")],
    "would hold --output-dir",
  ),
  # data files
  "seq-len too small for any example": (lambda b, d: ["--seq-len", "4"], "raise --seq-len"),
  "no assistant turn": (
    lambda b, d: [
      "--data",
      write(d / "a.jsonl", records({"messages": [{"role": "user", "content": "hi"}]})),
    ],
    "no assistant turn",
  ),
  "mixed formats": (
    lambda b, d: [
      "--data",
      write(d / "m.jsonl", records({"prompt": "a", "completion": "b"}, {"text": "abc"})),
    ],
    "one format per file",
  ),
  "json array record": (
    lambda b, d: ["--data", write(d / "r.jsonl", "[1, 2]\n")],
    "line 1: expected a JSON object",
  ),
  "empty completion": (
    lambda b, d: ["--data", write(d / "c.jsonl", records({"prompt": "a", "completion": ""}))],
    "field 'completion' is empty",
  ),
  "data is a directory": (lambda b, d: ["--data", str(d)], "is a directory"),
  "unreadable parquet": (
    lambda b, d: ["--data", write(d / "bad.parquet", "PAR1 not a table")],
    "not a readable Parquet file",
  ),
  "parquet without a record column": (
    lambda b, d: ["--data", parquet(d, "cols.parquet", {"question": ["a"], "answer": ["b"]})],
    "no 'text', 'prompt'/'completion' or 'messages' column (columns: question, answer)",
  ),
  "unknown data split": (
    lambda b, d: ["--data", split_folder(d, "dd", ["train", "test"]), "--data-split", "dev"],
    "split='dev' not found; set --data-split to one of: test, train",
  ),
  "eval folder without the eval split": (
    lambda b, d: ["--eval-data", split_folder(d, "ed", ["train", "validation"])],
    "split='test' not found; set --eval-split to one of: train, validation",
  ),
  "hub dataset id offline": (
    lambda b, d: ["--data", "someone/no-such-dataset"],
    "cannot be fetched offline (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set)",
  ),
  "missing eval data": (lambda b, d: ["--eval-data", str(d / "nope.jsonl")], "nope.jsonl"),
  # model folders
  "only a pickle .bin": (
    lambda b, d: ["--model", model_copy(b, d, "bin", _only_bin)],
    "refusing to unpickle",
  ),
  "missing tensor": (
    lambda b, d: ["--model", model_copy(b, d, "mt", lambda f: _tensors(f, lambda t: t.pop(GATE)))],
    f"missing tensor '{GATE}'",
  ),
  "tensor of wrong shape": (
    lambda b, d: [
      "--model",
      model_copy(
        b, d, "ws", lambda f: _tensors(f, lambda t: t.__setitem__(GATE, t[GATE][:-1].copy()))
      ),
    ],
    f"'{GATE}' has shape",
  ),
  "truncated safetensors": (
    lambda b, d: [
      "--model",
      model_copy(b, d, "tr", lambda f: os.truncate(os.path.join(f, "model.safetensors"), 100_000)),
    ],
    "is truncated",
  ),
  "not a gemma": (
    lambda b, d: ["--model", model_copy(b, d, "ll", lambda f: _config(f, model_type="llama"))],
    "unsupported model_type 'llama'",
  ),
  "no weight files": (
    lambda b, d: [
      "--model",
      model_copy(b, d, "nw", lambda f: os.remove(os.path.join(f, "model.safetensors"))),
    ],
    "no *.safetensors weight files",
  ),
  "no config.json": (
    lambda b, d: [
      "--model",
      model_copy(b, d, "nc", lambda f: os.remove(os.path.join(f, "config.json"))),
    ],
    "config.json: missing",
  ),
  # imported PEFT adapters
  "adapter for another width": (
    lambda b, d: ["--init-adapter", adapter_copy(b, d, "aw", tensors=_fewer_q_blocks)],
    "its layers or shapes differ",
  ),
  "adapter of another block size": (
    lambda b, d: ["--init-adapter", adapter_copy(b, d, "ab"), "--block-size", "8"],
    "its block size is 16, not --block-size 8",
  ),
  "oft adapter with --method lora": (
    lambda b, d: ["--init-adapter", adapter_copy(b, d, "al"), "--method", "lora"],
    "it is a oft adapter but --method is lora",
  ),
  "adapter peft_type LOHA": (
    lambda b, d: ["--init-adapter", adapter_copy(b, d, "at", config={"peft_type": "LOHA"})],
    "peft_type 'LOHA' is not supported",
  ),
  "adapter corrupted safetensors": (
    lambda b, d: [
      "--init-adapter",
      adapter_copy(b, d, "ac", raw=b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage"),
    ],
    "unreadable safetensors file",
  ),
  "adapter config not json": (
    lambda b, d: [
      "--init-adapter",
      write_into(adapter_copy(b, d, "aj"), "adapter_config.json", "{nope"),
    ],
    "adapter_config.json: not valid JSON",
  ),
  "adapter path is a file": (
    lambda b, d: ["--init-adapter", write(d / "ad.txt", "x")],
    "PEFT adapter file missing",
  ),
  "unknown message role": (
    lambda b, d: [
      "--data",
      write(d / "role.jsonl", records(ROLE)),
      "--eval-data",
      str(d / "nope.jsonl"),
    ],
    "unknown role 'wizard'",
  ),
  "adapter layers of different shapes": (
    lambda b, d: ["--init-adapter", adapter_copy(b, d, "as", tensors=_one_layer_other_shape)],
    "q_proj",
  ),
}

# Cases whose fix lies outside the files of this change (snippets in RELIABILITY.md).


def write_into(folder, name, text):
  write(os.path.join(folder, name), text)
  return folder


def _check(argv, capsys):
  code = finetune.main(argv)
  captured = capsys.readouterr()
  err = captured.err.strip()
  assert code == 2, err
  assert len(err.splitlines()) == 1 and err.startswith("error: "), err
  assert "Traceback" not in err
  return err, captured.out


def _quoted(case, err, base, tmp):
  """The message is the one RELIABILITY.md quotes (this run's folders left out)."""
  shown = err.removeprefix("error: ").replace(f"{tmp}{os.sep}", "").replace(str(tmp), "D")
  shown = recorded_results.as_quoted(shown.replace(f"{base}{os.sep}", ""))
  recorded_results.check("reliability_inputs", case, shown)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_error(case, rel, tmp_path, capsys):
  make_args, needle = CASES[case]
  out = tmp_path / "out"
  err, _ = _check(job(rel, out, steps=6) + make_args(rel, tmp_path), capsys)
  assert needle in err, err
  assert not out.exists(), "a failed pre-check must not create the output directory"
  _quoted(case, err, rel, tmp_path)


RESUME_CASES = {
  "resume into an empty folder": (
    lambda b, d: (d / "out").mkdir() or d / "out",
    "--resume: no checkpoint in",
    None,
  ),
  "resume with only a half-written step": (
    lambda b, d: _run_copy(b, d, _only_half_written),
    "--resume: no checkpoint in",
    "half-written",
  ),
  "resume with every step damaged": (
    lambda b, d: _run_copy(b, d, _truncate_all_steps),
    f"checkpoint step {STEPS} in",
    None,
  ),
  "resume from an unreadable unverified step": (
    lambda b, d: _run_copy(b, d, _unverifiable_step_without_data),
    f"checkpoint step {STEPS} in",
    None,
  ),
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's failed
# restore leaves a callback on its closed asyncio loop; harmless in the job's own process
def test_bad_checkpoint_is_one_line_error(case, rel, tmp_path, capsys):
  make_out, needle, warning = RESUME_CASES[case]
  out = make_out(rel, tmp_path)
  err, stdout = _check(job(rel, out, "--resume"), capsys)
  assert needle in err, err
  assert warning is None or "warning: " in stdout and warning in stdout, stdout
  assert not (out / "summary.json").exists()
  _quoted(case, err, rel, tmp_path)


# ----------------------------------------------------------------------------- security


def _sources():
  for folder in ("oftjax", "experiments"):
    for path in glob.glob(os.path.join(ROOT, folder, "**", "*.py"), recursive=True):
      with open(path) as f:
        yield os.path.relpath(path, ROOT), f.read()


def test_no_remote_code_and_no_unsafe_unpickling_in_sources():
  for name, text in _sources():
    assert "trust_remote_code" not in text, name
    assert not re.search(r"\bpickle\.loads?\(|\bdill\.|\bjoblib\.load\(", text), name
    assert not re.search(r"allow_pickle\s*=\s*True\s*[,)]", text), name  # opt-in stays opt-in
    for call in re.findall(r"torch\.load\([^)]*\)", text):
      assert "weights_only=True" in call, (name, call)


def test_remote_code_in_a_model_folder_is_never_run(rel, tmp_path, capsys):
  marker = tmp_path / "PWNED"
  code = (
    f"open({str(marker)!r}, 'w').write('ran')\n"
    "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n"
    "from transformers import Gemma3TextConfig as EvilConfig\n"
  )

  def plant(folder):
    write(os.path.join(folder, "evil.py"), code)
    _config(folder, auto_map={"AutoConfig": "evil.EvilConfig"})
    path = os.path.join(folder, "tokenizer_config.json")
    with open(path) as f:
      tok = json.load(f)
    tok.update(
      auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]}, tokenizer_class="EvilTokenizer"
    )
    write(path, json.dumps(tok))

  model = model_copy(rel, tmp_path, "evil", plant)
  out = tmp_path / "out"  # a later pre-check stops the run once model and tokenizer are read
  err, _ = _check(
    job(rel, out, "--model", model, "--eval-data", str(tmp_path / "nope.jsonl")), capsys
  )
  assert "nope.jsonl" in err and not marker.exists() and not out.exists()


def test_outputs_stay_inside_the_output_dir(rel):
  ref = reference_run(rel)
  assert sorted(os.listdir(ref)) == [
    "checkpoints",
    "loss.png",
    "metrics.jsonl",
    "peft_adapter",
    "summary.json",
  ]
  for root, dirs, files in os.walk(ref):
    for name in dirs + files:
      path = os.path.join(root, name)
      assert not os.path.islink(path), path
      assert not name.startswith((".peft-", ".tmp-")), f"staging left behind: {path}"
  assert not [n for n in os.listdir(rel) if n.startswith((".peft-", ".tmp-"))]
  # checkpoint folders are named by integer step only; adapters by fixed file names
  assert all(re.fullmatch(r"\d+", n) for n in os.listdir(ref / "checkpoints"))
  assert sorted(os.listdir(ref / "peft_adapter")) == [
    "adapter_config.json",
    "adapter_model.safetensors",
  ]
