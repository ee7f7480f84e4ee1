"""README.md, RELIABILITY.md and BENCHMARKS.md say what the committed results and the code say.

Every number in their generated regions comes from `experiments/render_docs.py`; these
tests fail when a region is stale (a result file, notebook output or test changed without
re-rendering), when RELIABILITY's bad-input table and the test catalogue differ, and when
the recorded default run no longer is the job's default. Cheap: no training.
"""

import dataclasses
import importlib.util
import os
import re

from finetune_helpers import ROOT

_spec = importlib.util.spec_from_file_location(
  "render_docs", os.path.join(ROOT, "experiments", "render_docs.py")
)
render_docs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render_docs)


def _read(name):
  with open(os.path.join(ROOT, name)) as f:
    return f.read()


def test_every_generated_region_is_up_to_date(capsys):
  code = render_docs.main(["--check"])
  assert code == 0, capsys.readouterr().err


def test_a_stale_region_is_reported():
  doc = "a <!-- generated:notebook-count -->five<!-- /generated:notebook-count --> b"
  new, stale = render_docs.render(doc, "x.md")
  assert stale == ["notebook-count"] and "-->six<!--" in new
  assert render_docs.render(new, "x.md") == (new, [])


def test_bad_input_table_is_the_test_catalogue():
  text = _read("RELIABILITY.md")
  section = text[text.index("## Bad input") : text.index("## Security")]
  rows = re.findall(r"^\|.*\| `(?:(test_\w+))?\[([^\]]+)\]` \|$", section, re.M)
  documented, test = set(), None
  for name, case in rows:  # a bare `[case]` continues the test named above it
    test = name or test or render_docs.INPUT_TESTS[0]
    documented.add(f"{test}[{case}]")
  assert len(rows) == len(documented), "a case is listed twice"
  assert documented == set(render_docs.bad_input_catalogue()["inputs"])
  # each row quotes the message its own case recorded
  quoted = re.findall(
    r"^\|.*<!-- generated:bad-input-message\[([^\]]+)\] -->.*\| `(?:test_\w+)?"
    r"\[([^\]]+)\]` \|$",
    section,
    re.M,
  )
  assert len(quoted) == len(rows) and all(a == b for a, b in quoted), quoted


def test_recorded_default_run_is_the_jobs_default():
  from oftjax.train.config import RunConfig, finalize

  recorded = render_docs.run_record("default_run")
  assert recorded["command"] == ["python", "experiments/finetune_gemma.py"]
  default = dataclasses.asdict(finalize(RunConfig()))
  config = recorded["summary"]["config"]
  assert config.keys() == default.keys()
  for key, value in default.items():
    if isinstance(value, str) and os.path.isabs(value):
      value = os.path.relpath(value, ROOT)
    assert config[key] == value, (key, config[key], value)
  qoft = render_docs.run_record("default_run_qoft_nf4")["summary"]["config"]
  assert {k: v for k, v in qoft.items() if k != "quantize"} == {
    k: v for k, v in config.items() if k != "quantize"
  } and qoft["quantize"] == "nf4"
