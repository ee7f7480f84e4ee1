"""Writes every number of README.md, RELIABILITY.md and BENCHMARKS.md from committed sources.

    python experiments/render_docs.py           # rewrite the generated regions in place
    python experiments/render_docs.py --check   # exit 1 listing the regions that are stale

A generated region is the text between `<!-- generated:NAME -->` and
`<!-- /generated:NAME -->`; `RENDERERS[NAME]` makes it, from committed files only (no
training, no oftjax import but to write the files, a second or two):

- the notebooks' committed outputs (`notebooks/*.ipynb`): their `FINDING:` lines;
- `experiments/benchmark_plots/results_full.json` (`experiments/benchmark.py`), through
  `experiments/bench_report.py`, the code that prints the benchmark's own tables;
- `experiments/results/default_run*.json` (`experiments/record_runs.py`: what the shipped
  job printed and summarised);
- `experiments/results/lora_export.json` (`experiments/lora_export.py`: the rank-vs-error
  curve of the default run's LoRA export);
- `experiments/results/quant_storage.json` (what `tests/test_quant.py` measures and
  checks against this file);
- the tests themselves, read as source (`ast`): the bad-input catalogue of RELIABILITY.md
  is the `CASES` of `tests/test_reliability_inputs.py` and
  `tests/test_finetune_bad_input.py`; the reliability runs' settings are the constants of
  `tests/reliability_helpers.py` and `tests/test_reliability_faults.py`.

After re-running any of those (`make notebooks`, the benchmark, `record_runs.py`, a test
with `OFTJAX_RECORD_RESULTS=1`), run this script; `tests/test_docs_agree.py` runs
`--check`. Prose outside the regions is the docs' own; prose inside a region is the
template in its renderer below.
"""

from __future__ import annotations

import argparse
import ast
import functools
import json
import math
import os
import re
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
sys.path.insert(1, ROOT)

import bench_must_hold  # noqa: E402  (experiments/bench_must_hold.py: stdlib only)
import bench_report  # noqa: E402  (experiments/bench_report.py: stdlib only at import)

from oftjax.train.phases import PHASES  # noqa: E402

DOCS = ("README.md", "RELIABILITY.md", "BENCHMARKS.md")
# NAME, or NAME[ARG] for a renderer that takes an argument (e.g. one table cell per test case)
REGION = re.compile(
  r"<!-- generated:(?P<name>(?P<base>[\w.-]+)(?:\[(?P<arg>[^\]]*)\])?) -->"
  r"(?P<body>.*?)<!-- /generated:(?P=name) -->",
  re.S,
)
# the ablation table's question per notebook (its answer is the notebook's FINDING line)
QUESTIONS = {
  "neumann_terms": "how many Cayley–Neumann terms?",
  "block_size": "parameters vs accuracy, and LoRA at equal parameters",
  "oft_v1_vs_v2": "cost against d_model and b",
  "forgetting": "does OFT forget less?",
  "qoft_vs_qlora": "QOFT vs QLoRA on NF4",
  "block_dropout": "does OFT's block dropout help?",
}


def _path(*parts: str) -> str:
  return os.path.join(ROOT, *parts)


def _notebooks() -> tuple[str, ...]:
  """The ablation notebooks, as `notebooks/execute.py` runs them."""
  return constant(("notebooks", "execute.py"), "NOTEBOOKS")


def _json(*parts: str):
  with open(_path(*parts)) as f:
    return json.load(f)


def _block(text: str) -> str:
  """A region on lines of its own (markers on the lines around it)."""
  return "\n" + text.strip("\n") + "\n"


def _paragraph(text: str) -> str:
  """Prose wrapped at the docs' 100 columns."""
  return textwrap.fill(" ".join(text.split()), 100, break_long_words=False, break_on_hyphens=False)


# ----------------------------------------------------------------------------- sources


@functools.cache
def notebook_text(name: str) -> str:
  """Every stream output of `notebooks/<name>.ipynb`, in cell order."""
  notebook = _json("notebooks", f"{name}.ipynb")
  out = []
  for cell in notebook["cells"]:
    for o in cell.get("outputs", []) if cell["cell_type"] == "code" else []:
      if o.get("output_type") == "stream":
        out.append("".join(o["text"]) if isinstance(o["text"], list) else o["text"])
  return "".join(out)


def notebook_code(name: str) -> str:
  notebook = _json("notebooks", f"{name}.ipynb")
  return "\n".join(
    "".join(c["source"]) if isinstance(c["source"], list) else c["source"]
    for c in notebook["cells"]
    if c["cell_type"] == "code"
  )


@functools.cache
def finding(name: str) -> str:
  """The committed full run's `FINDING:` text (raises if the notebook holds none or two)."""
  text = notebook_text(name)
  if "mode: full" not in text:
    raise ValueError(f"notebooks/{name}.ipynb does not hold a full run")
  lines = [
    line[len("FINDING:") :].strip() for line in text.splitlines() if line.startswith("FINDING:")
  ]
  if len(lines) != 1:
    raise ValueError(f"notebooks/{name}.ipynb holds {len(lines)} FINDING lines, expected 1")
  return lines[0]


def finding_figures(name: str, pattern: str) -> tuple[str, ...]:
  """Groups of `pattern` in the FINDING of `name` (raises if the sentence changed)."""
  match = re.search(pattern, finding(name))
  if match is None:
    raise ValueError(
      f"the FINDING of notebooks/{name}.ipynb no longer matches {pattern!r}; "
      "update its renderer in experiments/render_docs.py"
    )
  return match.groups()


@functools.cache
def bench() -> dict:
  return _json("experiments", "benchmark_plots", "results_full.json")


BENCH_RUNS = ("experiments", "results", "benchmark")  # benchmark.py's default --out folder


def bench_runs() -> list[tuple[str, dict]]:
  """Every committed benchmark run, oldest first: the full run and one file per machine/mode."""
  runs = [("experiments/benchmark_plots/results_full.json", bench())]
  folder = _path(*BENCH_RUNS)
  for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
    if name.endswith(".json"):
      runs.append(("/".join(BENCH_RUNS + (name,)), _json(*BENCH_RUNS, name)))
  return sorted(runs, key=lambda run: run[1].get("finished_utc", ""))


NOT_RUN = "no committed run has this yet: run `python experiments/benchmark.py --quick --job`"


def latest_run(key: str) -> tuple[str, dict] | None:
  """The newest committed run that has `key` (e.g. `job`, `flops_check`), or `None`."""
  runs = [run for run in bench_runs() if key in run[1]]
  return runs[-1] if runs else None


def bench_entry(sweep: str, **config) -> dict:
  """The one benchmark configuration of `sweep` whose config has these values."""
  found = [
    e
    for e in bench()["configs"]
    if e["sweep"] == sweep and all(e["config"][k] == v for k, v in config.items())
  ]
  if len(found) != 1:
    raise ValueError(f"results_full.json has {len(found)} {sweep} configs with {config}")
  return found[0]


@functools.cache
def run_record(name: str) -> dict:
  return _json("experiments", "results", f"{name}.json")


@functools.cache
def quant_storage() -> dict:
  return _json("experiments", "results", "quant_storage.json")


@functools.cache
def module_ast(*parts: str) -> ast.Module:
  with open(_path(*parts)) as f:
    return ast.parse(f.read())


def constant(parts: tuple[str, ...], name: str):
  """The literal a module assigns to `name` at top level."""
  for node in module_ast(*parts).body:
    if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
      return ast.literal_eval(node.value)
  raise ValueError(f"{'/'.join(parts)} assigns no {name}")


def dict_keys(parts: tuple[str, ...], name: str) -> list[str]:
  """The keys of the dict literal a module assigns to `name` (values may be any code)."""
  for node in module_ast(*parts).body:
    if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
      if not isinstance(node.value, ast.Dict):
        raise ValueError(f"{'/'.join(parts)}: {name} is not a dict literal")
      return [ast.literal_eval(k) for k in node.value.keys]
  raise ValueError(f"{'/'.join(parts)} assigns no {name}")


def test_functions(parts: tuple[str, ...]) -> dict[str, ast.FunctionDef]:
  return {
    n.name: n
    for n in module_ast(*parts).body
    if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")
  }


def collected_cases(parts: tuple[str, ...], name: str) -> list[str]:
  """Pytest ids of test `name`: one per key of `parametrize("case", sorted(DICT))`, or one."""
  fn = test_functions(parts)[name]
  for deco in fn.decorator_list:
    if isinstance(deco, ast.Call) and getattr(deco.func, "attr", "") == "parametrize":
      source = deco.args[1]
      if not (isinstance(source, ast.Call) and getattr(source.func, "id", "") == "sorted"):
        raise ValueError(f"{name}: parametrized over something other than sorted(DICT)")
      return [f"{name}[{k}]" for k in sorted(dict_keys(parts, source.args[0].id))]
  return [name]


def call_keywords(parts: tuple[str, ...], callee: str) -> dict:
  """Literal keyword arguments of the one call of `callee` (a name or attribute) in a module."""
  calls = [
    n
    for n in ast.walk(module_ast(*parts))
    if isinstance(n, ast.Call)
    and callee in (getattr(n.func, "id", None), getattr(n.func, "attr", None))
  ]
  if len(calls) != 1:
    raise ValueError(f"{'/'.join(parts)} calls {callee} {len(calls)} times, expected once")
  out = {}
  for kw in calls[0].keywords:
    try:
      out[kw.arg] = ast.literal_eval(kw.value)
    except ValueError:
      pass
  return out


def function_flags(parts: tuple[str, ...], name: str) -> dict[str, str]:
  """`{--flag: value}` of the literal flag/value pairs in the list function `name` returns."""
  fn = next(n for n in module_ast(*parts).body if isinstance(n, ast.FunctionDef) and n.name == name)
  ret = next(n for n in ast.walk(fn) if isinstance(n, ast.Return))
  items = [e.value if isinstance(e, ast.Constant) else None for e in ret.value.elts]
  return {
    a: b
    for a, b in zip(items, items[1:])
    if isinstance(a, str) and a.startswith("--") and isinstance(b, str) and not b.startswith("--")
  }


# ----------------------------------------------------------------------------- formatting


def _x(value: float, digits: int = 2) -> str:
  return f"{value:.{digits}f}x"


def _range(values, fmt="{:.2f}", sep="–") -> str:
  lo, hi = fmt.format(min(values)), fmt.format(max(values))
  return lo if lo == hi else f"{lo}{sep}{hi}"


_NUMBER_WORDS = "zero one two three four five six seven eight nine ten".split()


def _words(n: int) -> str:
  """`n` spelled out in prose (digits past ten)."""
  return _NUMBER_WORDS[n] if 0 <= n < len(_NUMBER_WORDS) else str(n)


# ----------------------------------------------------------------------------- README
# Each render_<name> returns the text of region <name> (see RENDERERS at the end).


def _summary(name: str = "default_run") -> dict:
  return run_record(name)["summary"]


def render_default_run() -> str:
  record, s = run_record("default_run"), _summary()
  c = s["config"]
  model = _json(s["model"], "config.json")
  base_params = s["total_params"] - s["trainable_params"]
  if c["targets"] != constant(("oftjax", "train", "config.py"), "DEFAULT_TARGETS"):
    raise ValueError("the default run's targets changed; update the README sentence")
  prose = _paragraph(
    f"`make finetune` runs `{' '.join(record['command'])}` with no flags: OFTv2 (block size "
    f"{c['block_size']}, {c['neumann_terms']} Neumann terms, all attention and MLP projections) "
    f"teaches a shipped, pretrained {model['num_hidden_layers']}-layer Gemma-3-architecture "
    f"model ({base_params:,} parameters, char tokenizer) a task it cannot do (`shout abcd:` → "
    f"`DCBA`), while a held-out set of what it already does (copy / reverse / upper / next) "
    f"measures forgetting ({c['steps']} steps, eval sets of {c['eval_limit']} examples). On "
    f"this project's {record['machine']['cpus']}-core CPU machine (fp32), one run printed "
    f"(`experiments/results/default_run.json`, written by `python "
    f"experiments/record_runs.py`):"
  )
  return _block(prose + "\n\n```\n" + "\n".join(record["stdout"]) + "\n```")


def render_benchmark_summary() -> str:
  checks = bench()["targets"]["checks"]
  d = bench()["targets"]["config"]["d_model"]
  v = {k: c["value"] for k, c in checks.items()}
  return (
    f"at d_model {d}: OFTv2 {v['oftv1_over_oft_time']:.0f}x faster and "
    f"{v['oftv1_over_oft_temp']:.1f}x less temp memory than the original OFT, "
    f"{_x(v['oft_over_floor_time'])} the no-adapter floor, {_x(v['oft_over_lora16_time'])} "
    f"LoRA r=16, {_x(v['peft_oft_over_oft_time'])} faster than PEFT's OFT"
  )


def render_benchmark_latest() -> str:
  path, r = [run for run in bench_runs() if run[1]["configs"] or "job" in run[1]][-1]
  m = r["machine"]
  parts = []
  sweep = [e for e in r["configs"] if e["sweep"] == "d_model" and "peft_oft" in e["methods"]]
  if sweep:
    e = max(sweep, key=lambda e: e["config"]["d_model"])
    ratios = e["ratios"]
    parts.append(
      f"at d_model {e['config']['d_model']} PEFT's OFT step takes "
      f"{ratios['peft_oft_over_oft_time']:.2f}x oftjax's OFTv2 step"
      + (
        f", and oftjax gets {ratios['oft_over_peft_oft_peak_fraction']:.2f}x the fraction of "
        "its own matmul peak that PEFT gets of PyTorch's"
        if "oft_over_peft_oft_peak_fraction" in ratios
        else ""
      )
    )
  if "job" in r:
    j = r["job"]["ratios"]
    parts.append(
      f"the job's step takes {j['job_over_bare_time']:.2f}x the bare step and PEFT's OFT "
      f"{j['peft_oft_over_job_time']:.2f}x the job's"
    )
  return (
    f"latest run ({m['cpu_model']}, `{r['mode']}`, {r.get('finished_utc', '')[:10] or 'undated'}, "
    f"`{path}`): " + "; ".join(parts)
  )


def render_quant_storage() -> str:
  q = quant_storage()
  d_in = "–".join(str(x) for x in q["nf4_double_quant"]["d_in"])
  return (
    f"NF4 with block-{q['nf4_double_quant']['nf4_block']} absmax and double-quantized "
    f"scales ({q['nf4_double_quant']['ratio']:.2f}x of bf16 bytes; "
    f"{q['nf4']['ratio']:.2f}x without double quantization) or int8 per channel "
    f"({q['int8']['ratio']:.2f}x), tested to the byte on kernels of input width {d_in} "
    f"(`tests/test_quant.py`; int8's per-channel scale costs less per weight on wider "
    f"kernels)"
  )


def render_qoft_accuracy() -> str:
  oft, qoft = _summary("default_run"), _summary("default_run_qoft_nf4")

  def fig(s):
    return (
      f"accuracy {s['eval_before']['accuracy']:.3f} -> {s['eval_after']['accuracy']:.3f}, "
      f"retention {s['retention_before']:.3f} -> {s['retention_after']:.3f}"
    )

  return (
    f"On the shipped default run ({oft['steps']} steps, `--quantize nf4` for QOFT): OFT "
    f"{fig(oft)}; QOFT-nf4 {fig(qoft)}; frozen weights {oft['frozen_weight_bytes']:,} -> "
    f"{qoft['frozen_weight_bytes']:,} bytes (`experiments/results/default_run*.json`)."
  )


def render_peft_logits_tolerance() -> str:
  with open(_path("tests", "test_finetune_interop.py")) as f:
    found = re.findall(r"assert_allclose\(ours, theirs, atol=([0-9.e-]+)\)", f.read())
  if len(found) != 1:
    raise ValueError(
      "tests/test_finetune_interop.py: the PEFT logits check moved; update "
      "render_peft_logits_tolerance"
    )
  return found[0]


def _eval_sizes() -> list[int]:
  """Full-mode eval set sizes: ablation_runs' default and every notebook's own."""
  with open(_path("notebooks", "ablation_runs.py")) as f:
    sizes = {int(m) for m in re.findall(r'"eval_limit": pick\(\d+, (\d+)\)', f.read())}
  for name in _notebooks():
    sizes |= {
      int(m)
      for m in re.findall(r"(?:N_EVAL|EVAL_LIMIT)\s*=\s*pick\(\d+, (\d+)\)", notebook_code(name))
    }
  return sorted(sizes)


def render_lora_export() -> str:
  r = _json("experiments", "results", "lora_export.json")
  run, oft = r["run"], r["oft"]
  rows = [
    "| LoRA rank | LoRA params | update error ‖Δ-AB‖/‖Δ‖ | vs ‖W‖ | max logit error | "
    "rel. logit error | eval loss | accuracy |",
    "|---|---|---|---|---|---|---|---|",
  ]
  rows += [
    f"| {x['rank']} | {x['lora_params']:,} | {x['relative_error']:.3f} | "
    f"{x['relative_to_weight']:.4f} | {x['max_abs_logit_error']:.3g} | "
    f"{x['relative_logit_error']:.3g} | {x['eval_loss']:.4f} | {x['accuracy']:.3f} |"
    for x in r["ranks"]
  ]
  # lora_export.py evaluates as the default job does: the default run's eval set size
  n_eval = _summary()["config"]["eval_limit"]
  matched = [x for x in r["ranks"] if x["accuracy"] >= oft["accuracy"]]
  prose = _paragraph(
    f"On the shipped default run (`{' '.join(r['command'])}`, {run['steps']} steps, "
    f"{run['trainable_params']:,} OFT parameters; `experiments/results/lora_export.json`, "
    f"written by `python experiments/lora_export.py`) the OFT model has eval loss "
    f"{oft['eval_loss']:.4f} and accuracy {oft['accuracy']:.3f} (exact match on {n_eval} "
    f"examples); its LoRA exports (logit errors over the eval set's tokens) are:"
  )
  after = _paragraph(
    f"The smallest rank that keeps the OFT model's accuracy here is {matched[0]['rank']} of "
    f"{r['job_report']['full_rank']} (full rank), with {matched[0]['lora_params']:,} LoRA "
    f"parameters against OFT's {run['trainable_params']:,}."
    if matched
    else "No rank below full keeps the OFT model's accuracy here."
  )
  return _block(prose + "\n\n" + "\n".join(rows) + "\n\n" + after)


def render_notebook_count() -> str:
  return _words(len(_notebooks()))


def render_ablation_eval() -> str:
  sizes = _eval_sizes()
  n = sizes[0]
  return (
    f"eval sets of {' or '.join(map(str, sizes))} examples (binomial standard error "
    f"about {math.sqrt(0.9 * 0.1 / n):.2f} near 0.9)"
  )


def render_ablation_table() -> str:
  rows = [
    "| notebook | question | finding (full run: the notebook's `FINDING:` line) |",
    "|---|---|---|",
  ]
  missing = [n for n in _notebooks() if n not in QUESTIONS]
  if missing:
    raise ValueError(f"add the question of notebook {missing[0]} to QUESTIONS")
  rows += [f"| `{n}` | {QUESTIONS[n]} | {finding(n)} |" for n in _notebooks()]
  return _block("\n".join(rows))


def render_assets_time() -> str:
  s = _json("experiments", "assets", "tiny-gemma3", "pretrain_summary.json")
  return (
    f"{s['train_s'] / 60:.0f} minutes of pretraining on {s['cpu_count']} cores "
    f"(`experiments/assets/tiny-gemma3/pretrain_summary.json`)"
  )


# ----------------------------------------------------------------------------- RELIABILITY


FAULTS = ("tests", "test_reliability_faults.py")
SETUP = ("tests", "reliability_helpers.py")  # the shared set-up of the reliability tests
TINY = ("tests", "finetune_helpers.py")  # the tiny model of the job tests
INPUTS = ("tests", "test_reliability_inputs.py")
BAD_INPUT = ("tests", "test_finetune_bad_input.py")
INPUT_TESTS = ("test_bad_input_is_one_line_error", "test_bad_checkpoint_is_one_line_error")


def bad_input_catalogue() -> dict[str, list[str]]:
  """Pytest ids of every bad-input case RELIABILITY.md counts, per test file."""
  return {
    "inputs": [i for t in INPUT_TESTS for i in collected_cases(INPUTS, t)],
    "bad_input": [i for t in test_functions(BAD_INPUT) for i in collected_cases(BAD_INPUT, t)],
  }


def render_bad_input_count() -> str:
  cases = bad_input_catalogue()
  here, there = len(cases["inputs"]), len(cases["bad_input"])
  return (
    f"{here} cases here, plus the {there} of `tests/test_finetune_bad_input.py`: **{here + there}**"
  )


def render_bad_input_message(case: str) -> str:
  """The error line test case `case` recorded (`tests/test_reliability_inputs.py`)."""
  messages = _json("experiments", "results", "reliability_inputs.json")
  if case not in messages:
    raise ValueError(
      f"no recorded message for bad-input case {case!r}; run "
      "OFTJAX_RECORD_RESULTS=1 pytest tests/test_reliability_inputs.py"
    )
  return "`" + messages[case].replace("|", "\\|") + "`"


def render_reliability_setup() -> str:
  model = call_keywords(TINY, "Gemma3TextConfig")
  flags = function_flags(SETUP, "job")
  counts = {}
  for node in ast.walk(module_ast(*SETUP)):  # for name, count in (("train.jsonl", 200), ...)
    if isinstance(node, ast.For) and isinstance(node.iter, ast.Tuple):
      try:
        counts.update(dict(ast.literal_eval(node.iter)))
      except (ValueError, TypeError):
        pass
  return _block(
    _paragraph(
      f"The three files share one session folder (`<pytest basetemp>/reliability/`): a tiny "
      f"random Gemma 3 ({model['num_hidden_layers']} layers, width {model['hidden_size']}), a "
      f"{counts['train.jsonl']}-record slice of the shipped task, a {counts['eval.jsonl']}-record "
      f"eval set, a JAX persistent compilation cache for the subprocesses, and **one "
      f"uninterrupted reference run** ({constant(SETUP, 'STEPS')} steps, checkpoint every "
      f"{constant(SETUP, 'SAVE_EVERY')}, keep {flags['--keep-checkpoints']}, `--lr "
      f"{flags['--lr']}`) that every fault is compared with."
    )
  )


def render_orthogonality_warning() -> str:
  tol = constant(("oftjax", "train", "loop.py"), "ORTHOGONALITY_TOLERANCE")
  n = _summary()["config"]["neumann_terms"]
  if n % 2:
    raise ValueError("the default Neumann terms are odd; the ‖Q‖ law below is for even n")
  # even n: max|RᵀR − I| ≈ ‖Q‖^(2n−2) (notebooks/neumann_terms.ipynb checks the law)
  seen = _numerics("orthogonality_warning")
  return (
    f"one `warning: orthogonality error … > {tol:g} at step N (max ‖Q‖ = …)` at the first "
    f"step where R stops being a rotation to {tol:.0%} (n={n}: at worst from ‖Q‖ = "
    f"{tol ** (1 / (2 * n - 2)):.2f} on, as the error is at most ‖Q‖^{2 * n - 2}; here step "
    f"{seen['step']}, ‖Q‖ = {seen['max_q_norm']:.3f})"
  )


def call_args(parts: tuple[str, ...], attr: str) -> tuple:
  """Literal positional arguments of the one call of `<something>.attr(...)` in a module."""
  calls = [
    n
    for n in ast.walk(module_ast(*parts))
    if isinstance(n, ast.Call) and getattr(n.func, "attr", None) == attr
  ]
  if len(calls) != 1:
    raise ValueError(f"{'/'.join(parts)} calls .{attr}() {len(calls)} times, expected once")
  return tuple(ast.literal_eval(a) for a in calls[0].args)


def _faults(key: str):
  return _json("experiments", "results", "reliability_faults.json")[key]


def _numerics(key: str):
  return _json("experiments", "results", "reliability_numerics.json")[key]


def render_fault_policy() -> str:
  steps = constant(SETUP, "STEPS")
  chain = _faults("sigkill_chain")
  half = next(s for r in chain for s in r["half_written"])
  damaged = _faults("damaged_step_warning").replace("…/checkpoints/", "")
  return _block(
    "- A save killed midway leaves `<step>.orbax-checkpoint-tmp/`. "
    "`RunCheckpoints.latest_step()`\n"
    f"  prints `warning: checkpoint {half}.orbax-checkpoint-tmp in … was half-written …; "
    "ignored` and never\n  loads it (orbax itself replaces it when that step is saved again).\n"
    + "- "
    + _paragraph(
      "After each save the main process writes `<step>/oftjax-integrity.json` (size + "
      "SHA-256 of every file). On `--resume` the newest step is verified; a **damaged step "
      f"is skipped with a warning** (`{damaged}`), renamed to `<step>.damaged` so it is "
      "never loaded, and the previous step is used. A step without the manifest (killed "
      "between orbax's commit and the manifest write) gets structural checks only (its "
      "JSON files must parse)."
    ).replace("\n", "\n  ")
    + "\n"
    + "- "
    + _paragraph(
      "If no step is usable, or a restore fails anyway, the job exits 2 with **one line "
      f"naming the step** (`error: checkpoint step {steps} in … is damaged (…) and no "
      "earlier step is usable; start again with --overwrite` / `… cannot be restored (…); "
      "move it aside to resume from an earlier step`)."
    ).replace("\n", "\n  ")
  )


def render_fault_table() -> str:
  steps, every = constant(SETUP, "STEPS"), constant(SETUP, "SAVE_EVERY")
  (seed,), (lo, hi), (d_lo, d_hi) = (
    call_args(FAULTS, "Random"),
    call_args(FAULTS, "randint"),
    call_args(FAULTS, "uniform"),
  )
  kinds = constant(FAULTS, "INTERRUPTIONS")
  chain = _faults("sigkill_chain")
  if [r["point"] for r in chain] != list(kinds):
    raise ValueError("the recorded SIGKILL chain is not the test's INTERRUPTIONS; record it again")
  where = {
    "step": f"step point: metrics line of a step {lo}–{hi} past the first checkpoint or "
    f"anything logged, then {d_lo:g}–{d_hi:g} s",
    "save": "inside a checkpoint write (polled: `<step>.orbax-checkpoint-tmp/` appears)",
    "sigint": "step point",
    "final": f"right after the last checkpoint (step {steps}) "
    "committed, i.e. while the integrity manifest, old-step clean-up, evaluation, "
    "adapter export and summary are written",
  }

  def happened(r):
    last = max(r["committed"]) if r["committed"] else None
    tmp = (
      ""
      if not r["half_written"]
      else (
        f"`{r['half_written'][-1]}.orbax-checkpoint-tmp` left behind; the next start warns "
        f'"half-written … ignored" and resumes from step {last}'
      )
    )
    if r["point"] == "sigint":
      return (
        f"finished the step ({r['logged_step']}), saved it, printed `stopped at step N; "
        "rerun with --resume`, **exit 0**"
      )
    if r["point"] == "final":
      return (
        f"steps {', '.join(map(str, r['committed']))} on disk; no `summary.json`; resume "
        f"at step {steps} trains nothing and writes the outputs"
      )
    if r["point"] == "save":
      return tmp or f"the write had finished; resume from step {last}"
    return f"killed after step {r['logged_step']}; " + (
      f"it landed inside a checkpoint write: {tmp}"
      if tmp
      else f"resume from the last committed step ({last})"
    )

  test = "`test_sigkill_at_seeded_points_then_resume_is_bit_identical`"
  rows = [
    (r["signal"], where[r["point"]], happened(r), test if i == 0 else "same")
    for i, r in enumerate(chain)
  ]
  final = (
    "| — | final `--resume` | — | **`peft_adapter/adapter_model.safetensors` "
    "byte-identical** to the reference; `metrics.jsonl` identical; `final_loss`, "
    "`eval_after` identical | same |"
  )
  damages = ast.literal_eval(
    next(
      d.args[1]
      for d in test_functions(FAULTS)[
        "test_damaged_step_falls_back_to_the_previous_one"
      ].decorator_list
      if isinstance(d, ast.Call)
    )
  )
  rest = [
    (
      f"truncated largest data file of the latest committed step ({steps})",
      "copy of the reference run, `--resume`",
      f'warning "step {steps} is damaged … resuming from step {steps - every}"; '
      f"`{steps}.damaged` kept aside; adapter byte-identical, metrics identical",
      "`test_damaged_latest_checkpoint_is_skipped_and_resume_is_bit_identical`",
      1,
    ),
    (
      "`<step>.orbax-checkpoint-tmp` with orbax's first file only",
      "unit (RunCheckpoints)",
      "ignored with a warning; latest = previous step",
      "`test_half_written_step_is_ignored_with_a_warning`",
      1,
    ),
    (
      "truncated / bit-flipped / deleted data file, unreadable manifest, bad `meta/metadata` "
      "in a manifest-less step",
      "unit",
      "skipped with a warning, previous step restored with its values",
      "`test_damaged_step_falls_back_to_the_previous_one[*]`",
      len(damages),
    ),
    (
      "every step damaged",
      "unit",
      "`CheckpointError`, one line naming the newest step",
      "`test_every_step_damaged_is_one_line_error_naming_the_step`",
      1,
    ),
    (
      "manifest-less step whose array data is gone",
      "unit",
      "restore raises `CheckpointError`, one line naming the step",
      "`test_restore_failure_is_one_line_error_naming_the_step`",
      1,
    ),
    (
      "SIGTERM mid-run",
      "existing",
      "finishes the step, saves, exit 0",
      "`tests/test_finetune_resume.py::test_sigterm_saves_and_exits_cleanly`",
      1,
    ),
  ]
  lines = [
    f"| # | Injected | Where (seeded, `random.Random({seed})`) | What happened | Test |",
    "|---|----------|-------------------------------------|---------------|------|",
  ]
  lines += [f"| {i} | {a} | {b} | {c} | {d} |" for i, (a, b, c, d) in enumerate(rows, 1)]
  lines.append(final)
  number = len(rows) + 1
  for a, b, c, d, n in rest:
    label = str(number) if n == 1 else f"{number}–{number + n - 1}"
    lines.append(f"| {label} | {a} | {b} | {c} | {d} |")
    number += n
  return _block("\n".join(lines))


def render_fault_notes() -> str:
  (seed,) = call_args(FAULTS, "Random")
  chain = _faults("sigkill_chain")
  inside = sum(bool(r["half_written"]) for r in chain if r["point"] != "final")
  return _block(
    _paragraph(
      f"Triggers and delays are seeded (`random.Random({seed})`); where they land depends on "
      "the machine's speed, so the table shows one recorded run (`OFTJAX_RECORD_RESULTS=1` "
      "writes its kill log to `experiments/results/reliability_faults.json`); another machine "
      "hits other steps. Asserted every time: each process dies as planned (SIGKILL: -9, "
      "SIGINT: 0 with the message), no `summary.json` before the end, each restart reports the "
      "half-written step the previous kill left, at least one kill landed inside a checkpoint "
      'write, and the final adapter bytes equal the reference\'s. The "step" points are '
      "metrics lines with a step beyond anything a previous process logged, so a stale line of "
      f"a killed run never triggers a kill early (in the recorded run {_words(inside)} kills "
      "landed inside a checkpoint write)."
    )
  )


def render_reference_lr() -> str:
  return f"`--lr {function_flags(SETUP, 'job')['--lr']}`"


def render_nonfinite_injected() -> str:
  lr = constant(("tests", "test_reliability_numerics.py"), "HUGE_LR")
  r = _numerics("nonfinite")
  return (
    f"`--lr {lr}`: ‖Q‖ = {r['max_q_norm_before']:,} after step "
    f"{r['first_skipped_step'] - 1}, loss NaN from step {r['first_skipped_step']}"
  )


def render_nonfinite_result() -> str:
  r = _numerics("nonfinite")
  return (
    f"exit 0, `warning: step {r['first_skipped_step']}: … not finite; step skipped`, "
    f"`skipped_steps` counts {r['first_skipped_step']}…{r['last_step']}"
  )


def render_nonfinite_stop() -> str:
  step = _numerics("nonfinite_stop_step")
  if step != _numerics("nonfinite")["first_skipped_step"]:
    raise ValueError("the recorded stop step differs from the first skipped step")
  return (
    f"`error: step {step}: the loss or gradient is not finite (loss nan); stopped "
    "(--on-nonfinite stop) without saving it; last checkpoint: none; …`"
  )


# ----------------------------------------------------------------------------- BENCHMARKS


def render_bench_notebook() -> str:
  d_lo, d_hi, v1, v2, b_lo, b_hi = finding_figures(
    "oft_v1_vs_v2",
    r"Against d_model \((\d+)-(\d+),.*?grow as d\^([\d.]+).*?OFTv2's as "
    r"d\^([\d.]+).*?at b=(\d+) to [\d.]+x at b=(\d+)",
  )
  return (
    f"sweep d_model ({d_lo}–{d_hi}) and the block size ({b_lo}–{b_hi}) for OFTv2 against "
    f"the original OFT, and fits the growth: the original OFT's flops over the floor grow "
    f"as d^{v1}, OFTv2's as d^{v2}"
  )


def render_bench_reproduce() -> str:
  r = bench()
  return (
    f"The committed full run took {r['wall_s'] / 60:.0f} min on {r['machine']['cpus']} busy cores."
  )


def render_bench_model() -> str:
  shapes = {
    (
      e["config"]["layers"],
      e["config"]["head_dim"],
      e["config"]["d_model"] // e["config"]["heads"],
      e["config"]["heads"] // e["config"]["kv_heads"],
      e["config"]["intermediate"] // e["config"]["d_model"],
      e["config"]["vocab"],
      e["config"]["seq"],
    )
    for e in bench()["configs"]
  }
  if len(shapes) != 1:
    raise ValueError(f"the benchmark's configs differ in shape ({shapes}); update the sentence")
  layers, head_dim, per_head, kv, mlp, vocab, seq = shapes.pop()
  return (
    f"{layers} decoder layer{'s' * (layers != 1)}, head_dim {head_dim}, heads = "
    f"d_model/{per_head}, GQA with kv_heads = heads/{kv}, intermediate = {mlp}·d_model, "
    f"vocab {vocab} (tied embedding; head and embedding cost negligible), sequence {seq}, "
    f"batch = tokens/{seq}"
  )


def render_bench_timing() -> str:
  fn = next(
    n
    for n in module_ast("experiments", "benchmark.py").body
    if isinstance(n, ast.FunctionDef) and n.name == "_timing"
  )
  budget, _, rounds = ast.literal_eval(
    next(n for n in ast.walk(fn) if isinstance(n, ast.Return)).value.value
  )[bench()["mode"]]
  c = bench()["targets"]["config"]
  v1 = len(bench_entry("d_model", d_model=c["d_model"])["methods"]["oftv1"]["step_times_s"])
  return (
    f"up to {rounds} rounds or ~{budget:.0f} s per method; very slow methods get fewer "
    f"timed steps ({v1} for OFT v1 at d_model {c['d_model']})"
  )


def render_bench_load() -> str:
  m = bench()["machine"]
  return (
    f"load average {m['loadavg_start'][0]:.1f} at the start and "
    f"{m['loadavg_end'][0]:.1f} at the end of the run"
  )


def render_bench_lora_match() -> str:
  e = bench_entry("d_model", d_model=512)
  m = e["methods"]
  return (
    f"at b={e['config']['block_size']} it is {e['config']['lora_match_rank']}, so r=16 "
    f"already has more trainable params than OFTv2: "
    f"{m['lora16']['trainable_params'] / m['oft']['trainable_params']:.1f}×"
  )


def render_bench_machine() -> str:
  r = bench()
  m = r["machine"]
  return _block(
    f"- CPU: {m['cpu_model']} ({m['processor']}), {m['cpus']} cores visible; shared with other "
    f"engineers' test runs\n  (load average {m['loadavg_start'][0]:.1f} at start, "
    f"{m['loadavg_end'][0]:.1f} at end of the run).\n"
    f"- Threads: XLA CPU default (all {m['threads']} cores); torch "
    f"`set_num_threads({m['torch_threads']})`. dtype: {m['dtype']} everywhere.\n"
    f"- Versions: Python {m['python']}, jax {m['jax']} ({m['jax_backend'].upper()} backend), "
    f"torch {m['torch']}. `XLA_FLAGS` {repr(m['xla_flags']) if m['xla_flags'] else 'unset'}.\n"
    f"- Full run wall time: {r['wall_s'] / 60:.0f} min (`mode: {r['mode']}`); raw numbers in\n"
    f"  `experiments/benchmark_plots/results_full.json`."
  )


def render_bench_machines() -> str:
  runs = bench_runs()
  common = set.intersection(
    *(
      {e["config"]["d_model"] for e in r["configs"] if e["sweep"] == "d_model"}
      for _, r in runs
      if r["configs"]
    )
  )
  d = max(common) if common else None
  rows = [
    f"| machine (lscpu) | run | load start/end | XLA / PyTorch fp32 matmul GFLOP/s | d_model {d}: "
    "OFTv2 / floor | PEFT OFT / OFTv2 | OFTv2 % XLA peak | PEFT OFT % PyTorch peak | "
    "job / bare step | PEFT OFT / job | file |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  f = lambda x, fmt="{:.2f}": "–" if x is None else fmt.format(x)
  for path, r in runs:
    m = r["machine"]
    e = next(
      (x for x in r["configs"] if x["sweep"] == "d_model" and x["config"]["d_model"] == d), None
    )
    ratios, methods = (e["ratios"], e["methods"]) if e else ({}, {})
    pct = lambda name, methods=methods: (
      (methods.get(name, {}).get("fraction_of_peak") or 0) * 100 or None
    )
    torch_peak = r.get("torch_matmul_peak", {}).get("flops_per_s")
    job = r.get("job", {}).get("ratios", {})
    rows.append(
      f"| {m['cpu_model']} | `{r['mode']}` "
      + "+".join(["grid"] * bool(r["configs"]) + ["job"] * ("job" in r))
      + ("(compile-only flops)" if "flops_check" in r and not r["configs"] else "")
      + f" {r.get('finished_utc', '')[:10] or 'undated'} "
      f"| {m['loadavg_start'][0]:.1f} / {m['loadavg_end'][0]:.1f} "
      f"| {r['matmul_peak']['flops_per_s'] / 1e9:.0f} / {f(torch_peak and torch_peak / 1e9, '{:.0f}')} "
      f"| {f(ratios.get('oft_over_floor_time'))} | {f(ratios.get('peft_oft_over_oft_time'))} "
      f"| {f(pct('oft'), '{:.0f}')} | {f(pct('peft_oft'), '{:.0f}')} "
      f"| {f(job.get('job_over_bare_time'))} | {f(job.get('peft_oft_over_job_time'))} "
      f"| `{path}` |"
    )
  return _block(
    "\n".join(rows)
    + "\n\nPeaks: start/end of each run (the `% peak` columns use the peak interleaved with "
    "each config's steps where the run has it). `–`: not measured by that run's version."
  )


def _latest_run_block(key: str, title: str, markdown) -> str:
  """The newest committed run that has `key`, introduced by `title`, then `markdown(run)`."""
  if latest_run(key) is None:
    return _block(NOT_RUN)
  path, r = latest_run(key)
  m = r["machine"]
  return _block(
    f"{title}: {m['cpu_model']}, `{r['mode']}`, {r.get('finished_utc', '')[:10] or 'undated'}, "
    f"load {m['loadavg_start'][0]:.1f} / {m['loadavg_end'][0]:.1f} (`{path}`).\n\n" + markdown(r)
  )


def render_bench_job() -> str:
  return _latest_run_block("job", "Latest job run", bench_report.job_markdown)


def render_bench_must_hold() -> str:
  return _latest_run_block("must_hold", "Latest run judged", bench_must_hold.markdown)


def render_rotation_ablation() -> str:
  r = _json("experiments", "results", "rotation_ablation.json")
  names = {
    "oft": "OFTv2 as shipped",
    "oft_no_neumann": "OFTv2, rotation by `I` (no Cayley–Neumann blocks)",
    "oft_no_rotation": "OFTv2, blocks built, activations not rotated",
  }
  ds = [c["d_model"] for c in r["configs"]]
  rows = [
    "| step / floor | " + " | ".join(f"d_model {d}" for d in ds) + " |",
    "|---|" + "---|" * len(ds),
  ]
  for key, label in names.items():
    rows.append(
      f"| {label} | " + " | ".join(f"{c['over_floor'][key]:.3f}" for c in r["configs"]) + " |"
    )
  return _block(
    f"{r['cpu_model']}, {r['finished_utc'][:10]}, one process, round-robin "
    f"(`experiments/results/rotation_ablation.json`, `python experiments/rotation_ablation.py`):"
    "\n\n" + "\n".join(rows)
  )


def render_bench_flops_check() -> str:
  if latest_run("flops_check") is None:
    return NOT_RUN
  path, r = latest_run("flops_check")
  return bench_report.flops_check_markdown(r["flops_check"]) + f" (`{path}`)"


def render_bench_results() -> str:
  return _block(bench_report.markdown(bench()))


def render_bench_targets() -> str:
  t = bench()["targets"]
  c = t["config"]
  v = {k: x["value"] for k, x in t["checks"].items()}
  big = bench_entry("d_model", d_model=c["d_model"])
  r, m = big["ratios"], big["methods"]
  small = bench_entry("d_model", d_model=2048)["ratios"]
  low = [
    e["ratios"]["peft_oft_over_oft_time"]
    for e in bench()["configs"]
    if e["sweep"] == "d_model" and e["config"]["d_model"] <= 1024
  ]
  verdict = lambda k: "met" if t["checks"][k]["met"] else "**not met**"
  peft = verdict("peft_oft_over_oft_time")
  if t["checks"]["peft_oft_over_oft_time"]["met"] and v["peft_oft_over_oft_time"] < 1.6:
    peft = (
      f"met, narrowly ({small['peft_oft_over_oft_time']:.2f}× at d_model 2048, "
      f"{_range(low, '{:.1f}')}× at d_model ≤ 1024)"
    )
  rows = [
    "| target | measured | verdict |",
    "|---|---|---|",
    f"| OFTv2 step ≥ 10× faster than OFT v1 | {v['oftv1_over_oft_time']:.1f}× (flops "
    f"{r['oftv1_over_oft_flops']:.1f}×) | {verdict('oftv1_over_oft_time')} |",
    f"| OFTv2 temp memory ≥ 3× less than OFT v1 | {v['oftv1_over_oft_temp']:.1f}× "
    f"({m['oft']['temp_bytes'] / 2**20:.0f} vs {m['oftv1']['temp_bytes'] / 2**20:.0f} MiB) "
    f"| {verdict('oftv1_over_oft_temp')} |",
    f"| OFTv2 step ≤ 1.05× LoRA r=16 | {v['oft_over_lora16_time']:.2f}× "
    f"| {verdict('oft_over_lora16_time')} |",
    f"| OFTv2 step ≤ 1.10× the floor | {v['oft_over_floor_time']:.2f}× (flops "
    f"{r['oft_over_floor_flops']:.2f}×) | {verdict('oft_over_floor_time')} |",
    f"| oftjax OFTv2 ≥ 1.5× faster than PEFT OFT | {v['peft_oft_over_oft_time']:.2f}× | {peft} |",
    "| ≥ 60% of the matmul peak | see below | **not reliably measurable here** |",
  ]
  return (
    f"**Targets** (judged at the largest config, d_model {c['d_model']}, {c['tokens']} "
    f"tokens/step, b={c['block_size']}; full run):\n\n" + "\n".join(rows)
  )


def render_bench_peak() -> str:
  return f"{bench()['matmul_peak']['flops_per_s'] / 1e9:.1f} GFLOP/s"


def render_bench_small_configs() -> str:
  small = [bench_entry("d_model", d_model=d)["ratios"] for d in (512, 1024)]
  return (
    f"At d_model 512/1024 the OFTv2/floor time ratio was "
    f"{_range([x['oft_over_floor_time'] for x in small])} in the full run (flops ratio "
    f"{_range([x['oft_over_floor_flops'] for x in small])})"
  )


def render_bench_block_ratios() -> str:
  blocks = [bench_entry("block_size", block_size=b)["ratios"] for b in (64, 128)]
  time = "/".join(f"{x['oft_over_floor_time']:.2f}" for x in blocks)
  flops = "/".join(f"{x['oft_over_floor_flops']:.2f}" for x in blocks)
  return f"At b=64/128 (d_model 1024) the ratio is {time}, close to the flops ratio {flops}"


def render_bench_v1_growth() -> str:
  widths = sorted(e["config"]["d_model"] for e in bench()["configs"] if e["sweep"] == "d_model")
  by_d = [bench_entry("d_model", d_model=d)["ratios"]["oftv1_over_oft_time"] for d in widths]
  tokens = sorted(e["config"]["tokens"] for e in bench()["configs"] if e["sweep"] == "tokens")
  by_t = [bench_entry("tokens", tokens=t)["ratios"]["oftv1_over_oft_time"] for t in tokens]
  d_tokens = bench_entry("tokens", tokens=tokens[0])["config"]["d_model"]
  fmt = lambda x: f"{x:.1f}×" if x < 10 else f"{x:.0f}×"
  return (
    f"({', '.join(fmt(x) for x in by_d)} for d_model {widths[0]}→{widths[-1]} at "
    f"512 tokens) and shrinks with tokens ("
    + ", ".join(f"{fmt(x)} at {t}" for x, t in zip(by_t, tokens))
    + f" tokens, d_model {d_tokens})"
  )


def render_bench_peft_lora() -> str:
  ratios = [
    e["ratios"]["peft_lora16_over_lora16_time"]
    for e in bench()["configs"]
    if "peft_lora16_over_lora16_time" in e["ratios"]
  ]
  return f"PEFT LoRA/oftjax LoRA is {_range(ratios, '{:.1f}')}×"


def render_bench_skipped() -> str:
  configs = bench()["configs"]
  c = bench()["targets"]["config"]
  m = bench_entry("d_model", d_model=c["d_model"])["methods"]
  timed = {k: len(v["step_times_s"]) for k, v in m.items()}
  v1_timed = "a single timed step" if timed["oftv1"] == 1 else f"{timed['oftv1']} timed steps"
  peft = "/".join(str(n) for n in sorted({timed["peft_oft"], timed["peft_lora16"]}))
  tokens = [e["config"] for e in configs if e["sweep"] == "tokens"]
  blocks = [e for e in configs if e["sweep"] == "block_size"]
  swept = sorted(
    {t["tokens"] for t in tokens}
    | {bench_entry("d_model", d_model=tokens[0]["d_model"])["config"]["tokens"]}
  )
  absent = sorted(set(bench_report.ORDER) - set(blocks[0]["methods"]) - {"lora_match"})
  ran = [e for e in configs if "lora_match" in e["methods"]]
  rest = [e["config"] for e in configs if "lora_match" not in e["methods"]]
  return _block(
    _paragraph(
      f"**What was skipped (full run).** {_words(c['layers']).capitalize()} decoder layer only "
      f"(cost analysis counts a scan body once; more layers scale every method alike). Tokens "
      f"sweep at d_model {tokens[0]['d_model']} only ({', '.join(map(str, swept))} tokens); "
      f"block-size sweep at d_model {blocks[0]['config']['d_model']} / "
      f"{blocks[0]['config']['tokens']} tokens only, without "
      f"{' and '.join(bench_report.LABELS[a].replace(' (torch)', '') for a in absent)} (they do "
      f"not depend on b). d_model {c['d_model']} only at {c['tokens']} tokens: OFT v1 takes "
      f"{m['oftv1']['step_s']:.0f} s per step there and got {v1_timed} (floor {timed['floor']}, "
      f"OFTv2 {timed['oft']}, LoRA {timed['lora16']}, full FT {timed['full']}, PEFT {peft} "
      f"each). `lora_match` (smallest rank with ≥ OFTv2's params) only ran at "
      + ", ".join(
        f"b={e['config']['block_size']} (r={e['methods']['lora_match']['lora_rank']})" for e in ran
      )
      + f"; at b ≤ {max(x['block_size'] for x in rest)} the matched rank is ≤ "
      f"{max(x['lora_match_rank'] for x in rest)}, so LoRA r=16 already covers it."
    )
  )


def real_scale() -> dict:
  return _json("experiments", "results", "real_scale.json")


def _gb(n: float) -> str:
  return f"{n / 1e9:.2f} GB"


def _gib(n: float) -> str:
  return f"{n / 2**30:.2f} GiB"


def remat_of(run_name: str, run: dict) -> str:
  """How a real-scale run (named `NAME` or `NAME --remat POLICY`) ran: its remat policy."""
  if policy := run_name.partition(" --remat ")[2]:
    return f"with --remat {policy}"
  return f"with --remat {run['remat']}, which --remat auto chose"


def render_real_scale() -> str:
  r = real_scale()
  runs, memory = r.get("runs", {}), r.get("compiled_memory", {})
  lines = [] if runs else ["No job run recorded yet (`python experiments/real_scale_run.py`).", ""]
  lines += (
    [
      "| model (random weights, real shapes) | params | fp32 weights | load | peak host RSS | "
      "tokens/s | step | compile | outside steps | wall |",
      "|---|---|---|---|---|---|---|---|---|---|",
    ]
    if runs
    else []
  )
  for name, x in runs.items():
    f = x["folder"]
    lines.append(
      f"| {name} ({x['why']}) | {f['params'] / 1e9:.3f} B | {_gb(f['fp32_bytes'])} | "
      f"{x['load_s']:.0f} s | {_gb(x['peak_rss_bytes'])} "
      f"({x['peak_rss_over_fp32_weights']:.2f}× fp32 weights) | {x['train_tokens_per_s']:.1f} | "
      f"{x['step_time_s']:.1f} s | {x['compile_s']:.0f} s | {x['outside_train_steps_s']:.0f} s | "
      f"{x['wall_s']:.0f} s |"
    )
  loads = r.get("loads", {})
  if loads:
    lines += [
      "",
      "Load alone (`gemma.load`, fp32, in a fresh process; no job run on it was recorded):",
      "",
      "| model | params | fp32 weights | load | peak host RSS |",
      "|---|---|---|---|---|",
    ]
    for name, x in loads.items():
      f = x["folder"]
      lines.append(
        f"| {name} ({x['why']}) | {f['params'] / 1e9:.3f} B | {_gb(f['fp32_bytes'])} | "
        f"{x['load_s']:.0f} s | {_gb(x['peak_rss_bytes'])} "
        f"({x['peak_rss_over_fp32_weights']:.2f}× fp32 weights) |"
      )
  names = list(runs)
  phases = [p for p in PHASES if any(p in x["phases"] for x in runs.values())]
  if runs:
    lines += [
      "",
      "Phase wall time and the peak host RSS sampled within it:",
      "",
      "| phase | " + " | ".join(names) + " |",
      "|---|" + "---|" * len(names),
    ]
  for phase in phases:
    cells = []
    for name in names:
      e = runs[name]["phases"].get(phase)
      # a phase shorter than the 0.1 s sampling interval may hold no sample
      rss = _gb(e["sampled_peak_rss_bytes"]) if e and e["sampled_peak_rss_bytes"] else "not sampled"
      cells.append(f"{e['s']:.1f} s, {rss}" if e else "–")
    lines.append(f"| {phase} | " + " | ".join(cells) + " |")
  for name, x in runs.items():
    rest = max(e["sampled_peak_rss_bytes"] for p, e in x["phases"].items() if p != "train")
    lines += [
      "",
      f"{name}: outside the train phase the sampled peak was {_gb(rest)} "
      f"({rest / x['folder']['fp32_bytes']:.2f}× fp32 weights); the train phase's "
      f"{_gb(x['phases']['train']['sampled_peak_rss_bytes'])} is the weights plus the step's "
      f"compiled temp (below; the job ran {remat_of(name, x)}).",
    ]
  lines += [
    "",
    "The job's train step compiled on the same shapes (no weights; "
    "`compiled.memory_analysis()`, XLA CPU):",
    "",
    "| model | dtype | remat | batch × seq | temp | arguments (weights, adapters, optimizer, "
    "batch) |",
    "|---|---|---|---|---|---|",
  ]
  for name, rows in memory.items():
    for m in rows:
      lines.append(
        f"| {name} | {m['dtype']} | {'yes' if m['remat'] else 'no'} | "
        f"{m['batch']} × {m['seq_len']} | {_gib(m['temp_bytes'])} | {_gib(m['argument_bytes'])} |"
      )
  return _block("\n".join(lines))


def render_real_scale_flags() -> str:
  r = real_scale()
  return "`" + " ".join(r["job_flags"]) + "`"


_GPU_USABLE_GIB = 22  # of a 24 GB card, leaving ~2 GiB to the CUDA context and XLA's reserve


def render_real_scale_24gb() -> str:
  rows = real_scale()["compiled_memory"].get("gemma-3-1b-pt", [])
  bf16 = [m for m in rows if m["dtype"] == "bfloat16"]
  if not bf16:
    return "not measured"
  parts, fits = [], []
  for m in bf16:
    fixed = m["argument_bytes"] + m["output_bytes"] - m["alias_bytes"]
    tokens = m["batch"] * m["seq_len"]
    per_token = m["temp_bytes"] / tokens
    how = "with" if m["remat"] else "without"
    parts.append(
      f"{m['batch']} × {m['seq_len']} tokens {how} remat: {_gib(m['temp_bytes'] + fixed)} "
      f"({per_token / 2**20:.1f} MiB of temp per token)"
    )
    fit = int((_GPU_USABLE_GIB * 2**30 - fixed) / per_token)
    fits.append(f"about {fit // 512 * 512} tokens per micro-batch {how} remat")
  vocab_mib = 262144 * 4 / 2**20
  return (
    "; ".join(parts)
    + f". Temp grows with the tokens of a step (the loss holds no full logits, which would be "
    f"{vocab_mib:.0f} MiB per token in fp32 over the 262144-entry vocabulary). So with "
    f"{_GPU_USABLE_GIB} GiB usable: " + ", ".join(fits) + " (use `--grad-accum` for larger "
    "batches)"
  )


RENDERERS = {
  "real-scale": render_real_scale,
  "real-scale-flags": render_real_scale_flags,
  "real-scale-24gb": render_real_scale_24gb,
  "default-run": render_default_run,
  "benchmark-summary": render_benchmark_summary,
  "benchmark-latest": render_benchmark_latest,
  "quant-storage": render_quant_storage,
  "qoft-accuracy": render_qoft_accuracy,
  "peft-logits-tolerance": render_peft_logits_tolerance,
  "lora-export": render_lora_export,
  "notebook-count": render_notebook_count,
  "ablation-eval": render_ablation_eval,
  "ablation-table": render_ablation_table,
  "assets-time": render_assets_time,
  "bad-input-count": render_bad_input_count,
  "reliability-setup": render_reliability_setup,
  "bad-input-message": render_bad_input_message,
  "orthogonality-warning": render_orthogonality_warning,
  "fault-policy": render_fault_policy,
  "fault-table": render_fault_table,
  "fault-notes": render_fault_notes,
  "reference-lr": render_reference_lr,
  "nonfinite-injected": render_nonfinite_injected,
  "nonfinite-result": render_nonfinite_result,
  "nonfinite-stop": render_nonfinite_stop,
  "bench-notebook": render_bench_notebook,
  "bench-reproduce": render_bench_reproduce,
  "bench-model": render_bench_model,
  "bench-timing": render_bench_timing,
  "bench-load": render_bench_load,
  "bench-lora-match": render_bench_lora_match,
  "bench-machine": render_bench_machine,
  "bench-results": render_bench_results,
  "bench-machines": render_bench_machines,
  "bench-job": render_bench_job,
  "bench-must-hold": render_bench_must_hold,
  "rotation-ablation": render_rotation_ablation,
  "bench-flops-check": render_bench_flops_check,
  "bench-targets": render_bench_targets,
  "bench-peak": render_bench_peak,
  "bench-small-configs": render_bench_small_configs,
  "bench-block-ratios": render_bench_block_ratios,
  "bench-v1-growth": render_bench_v1_growth,
  "bench-peft-lora": render_bench_peft_lora,
  "bench-skipped": render_bench_skipped,
}


# ----------------------------------------------------------------------------- driver


def render(text: str, doc: str) -> tuple[str, list[str]]:
  """`text` with every region re-rendered, and the names of the regions that changed."""
  stale = []

  def one(match):
    name, base, arg = match["name"], match["base"], match["arg"]
    if base not in RENDERERS:
      raise ValueError(f"{doc}: no renderer for region {name!r}")
    body = RENDERERS[base]() if arg is None else RENDERERS[base](arg)
    if body != match["body"]:
      stale.append(name)
    return f"<!-- generated:{name} -->{body}<!-- /generated:{name} -->"

  new = REGION.sub(one, text)
  opened, closed = text.count("<!-- generated:"), text.count("<!-- /generated:")
  if not opened == closed == len(REGION.findall(text)):
    raise ValueError(
      f"{doc}: {opened} opening and {closed} closing generated markers, "
      f"{len(REGION.findall(text))} well-formed regions"
    )
  return new, stale


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--check", action="store_true", help="write nothing; exit 1 listing the stale regions"
  )
  args = parser.parse_args(argv)
  rendered, used, stale = {}, set(), []
  for doc in DOCS:
    with open(_path(doc)) as f:
      text = f.read()
    rendered[doc], changed = render(text, doc)
    used |= {m["base"] for m in REGION.finditer(text)}
    stale += [f"{doc}: {name}" for name in changed]
  unused = sorted(set(RENDERERS) - used)
  if unused:
    print(
      f"error: renderers with no region in {', '.join(DOCS)}: {', '.join(unused)}", file=sys.stderr
    )
    return 1
  if args.check:
    if stale:
      print(
        "stale generated regions (run python experiments/render_docs.py):\n  " + "\n  ".join(stale),
        file=sys.stderr,
      )
      return 1
    print("every generated region is up to date")
    return 0
  from oftjax import atomic  # only to write: rendering and --check import no oftjax

  for doc, text in rendered.items():
    atomic.write_text(_path(doc), text)
  print(f"rewrote {len(stale)} region(s)" + "".join(f"\n  {s}" for s in stale))
  return 0


if __name__ == "__main__":
  sys.exit(main())
