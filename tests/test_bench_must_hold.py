"""experiments/bench_must_hold.py: issue 17's list judged from a run's ratios, as written."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments"))

import bench_must_hold as B


def _grid(floor_1024, lora_2048, v1_time):
  entry = lambda sweep, d, **r: {"sweep": sweep, "config": {"d_model": d}, "ratios": r}
  return [
    entry("d_model", 512, oft_over_floor_time=9.0),  # not judged: d_model 512
    entry("d_model", 1024, oft_over_floor_time=floor_1024, oft_over_lora16_time=0.99),
    entry("d_model", 2048, oft_over_floor_time=1.05, oft_over_lora16_time=lora_2048),
    entry(B.V1_SWEEP, 4096, oftv1_over_oft_time=v1_time, oftv1_over_oft_flops=15.3),
  ]


def _job(speed, efficiency, peft_fraction=0.6, bare_fraction=0.5):
  return {
    "ratios": {"peft_oft_over_job_time": speed, "job_over_peft_oft_peak_fraction": efficiency},
    "methods": {
      "peft_oft": {"fraction_of_peak": peft_fraction},
      "bare": {"fraction_of_peak": bare_fraction},
    },
    "matmul_peak": {"flops_per_s": 300e9},
    "torch_matmul_peak": {"flops_per_s": 400e9},
  }


def _verdicts(result):
  return {c["name"]: c["met"] for c in result["checks"]}


def test_each_bound_is_judged_on_its_own_config():
  got = _verdicts(B.must_hold(_grid(1.06, 1.0, 12.0), None))
  assert got == {
    "OFTv2 / floor, d_model 1024": False,
    "OFTv2 / LoRA r=16, d_model 1024": True,
    "OFTv2 / floor, d_model 2048": True,  # the bounds are inclusive
    "OFTv2 / LoRA r=16, d_model 2048": True,
    "OFT v1 / OFTv2 step time, d_model 4096": True,
    "OFT v1 / OFTv2 flops, d_model 4096": True,
  }
  assert not _verdicts(B.must_hold(_grid(1.0, 1.01, 9.9), None))[
    "OFT v1 / OFTv2 step time, d_model 4096"
  ]


def test_a_run_without_a_config_says_so_instead_of_passing():
  result = B.must_hold([], None)
  assert all(c["value"] is None and c["met"] is None for c in result["checks"])
  assert result["peft"] == {"met": None}


def test_the_peft_criterion_holds_by_speed_or_by_efficiency_with_the_reason():
  by_speed = B.must_hold([], _job(1.4, 0.9))["peft"]
  assert by_speed["met"] and by_speed["by"] == "speed"
  by_efficiency = B.must_hold([], _job(0.8, 1.3))["peft"]
  assert by_efficiency["met"] and by_efficiency["by"] == "efficiency"
  neither = B.must_hold(_grid(1.0, 1.0, 10.0), _job(0.7, 0.9, 0.6, 0.5))
  assert neither["peft"]["met"] is False
  text = B.markdown({"must_hold": neither})
  # 1.3 x PEFT's 60% is 78% of XLA's peak; the bare step reached 50%; XLA/torch 300/400
  assert "would need 78% of XLA's peak" in text and "reaches 50%" in text
  assert "0.75× PyTorch's" in text and "**not met**" in text
