"""`--remat auto`: the first policy (none, dots_no_batch, full) whose compiled step fits."""

import json

from finetune_helpers import job_args
import gemma_helpers as H
import jax
import pytest
from test_finetune_logging import _run

import oftjax
from oftjax import quant
from oftjax.models import gemma
from oftjax.train import remat_choice


class _Analysis:
  def __init__(self, temp):
    self.temp_size_in_bytes = temp


class _Step:
  """A stand-in jitted step whose compiled form reports `temp` bytes; records each compile."""

  def __init__(self, policy, temp, compiled_log):
    self.policy, self.temp, self.log = policy, temp, compiled_log

  def lower(self, *args):
    return self

  def compile(self):
    self.log.append(self.policy)
    return self

  def memory_analysis(self):
    return _Analysis(self.temp)


@pytest.mark.parametrize(
  "budget, chosen, compiled",
  [
    (1000, "none", ["none"]),  # fits at once: no second compile
    (70, "dots_no_batch", ["none", "dots_no_batch"]),
    (30, "full", ["none", "dots_no_batch", "full"]),
    (10, "full", ["none", "dots_no_batch", "full"]),  # nothing fits: the least memory
  ],
)
def test_the_first_policy_within_budget_is_chosen(budget, chosen, compiled):
  share = jax.local_device_count()  # CPU: all local devices share the host's memory
  temps = {"none": 100, "dots_no_batch": 60, "full": 20}
  log = []
  choice = remat_choice.compile_within_budget(lambda p: _Step(p, temps[p], log), (), budget * share)
  assert (choice.policy, log) == (chosen, compiled)
  assert choice.temp_bytes == temps[chosen] and choice.compiled.policy == chosen
  assert ("still over budget" in choice.note) == (budget < 20), choice.note


def test_cpu_budget_is_the_weights_between_the_floor_and_free_memory(monkeypatch):
  monkeypatch.setattr(remat_choice, "_host_available_bytes", lambda: 100 << 30)
  assert remat_choice.budget_bytes(1000) == remat_choice.CPU_FLOOR_BYTES
  assert remat_choice.budget_bytes(4 << 30) == 4 << 30
  monkeypatch.setattr(remat_choice, "_host_available_bytes", lambda: 5 << 30)
  assert remat_choice.budget_bytes(40 << 30) == int(0.8 * (5 << 30))


def test_with_remat_reaches_the_decoder_through_the_wrappers():
  model = gemma.from_hf_config(H.hf_config("gemma3"))
  config = oftjax.AdapterConfig(method="oft", block_size=4, targets=r".*_proj")
  wrapped = oftjax.adapt(quant.Dequantized(model), config, jax.numpy.zeros((1, 4), "int32"))
  changed = remat_choice.with_remat(wrapped.module, "full")
  assert changed.model.base.config.remat == "full"
  assert wrapped.module.model.base.config.remat == "none"  # the original is untouched
  assert changed.model.base.config.replace(remat="none") == model.config
  with pytest.raises(TypeError, match="holds no Gemma decoder config"):
    remat_choice.with_remat(jax.numpy.zeros(3), "full")


def test_the_job_falls_back_to_full_remat_when_nothing_else_fits(
  tiny_model_dir, tmp_path, capsys, monkeypatch
):
  """With a 1-byte budget the job tries all three policies and runs `full`, and says so."""
  monkeypatch.setattr(remat_choice, "budget_bytes", lambda weight_bytes: 1)
  out = tmp_path / "run"
  log = _run(capsys, job_args(tiny_model_dir, out, "--steps", "2", "--remat", "auto"))
  note = next(line for line in log.splitlines() if line.startswith("--remat auto:"))
  assert note.startswith("--remat auto: full, still over budget (step temp: none ")
  assert "dots_no_batch" in note and "lower --batch-size" in note, note
  summary = json.loads((out / "summary.json").read_text())
  assert summary["remat"] == "full" and summary["train_step_temp_bytes"] > 0
  assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"]
