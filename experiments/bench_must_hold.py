"""Issue 17's "must hold" list, judged on one benchmark run's own numbers.

Every figure is a ratio measured in that run (`benchmark.add_ratios`): nothing is compared
across runs or machines. The list, as the issue states it:

* d_model 1024 and 2048, 512 tokens, b=32: OFTv2 <= 1.05x the no-adapter floor and
  <= 1.00x oftjax's own LoRA r=16 (step time).
* The job's OFT tokens/s >= 1.3x PEFT OFT's on the job's shape, or, where the matmul
  library makes that impossible, >= 1.3x PEFT's efficiency (fraction of its own matmul
  peak), with the reason shown.
* Original OFT over OFTv2 >= 10x at d_model 4096, in compiled flops and in step time.
"""

from __future__ import annotations

GRID_D_MODELS = (1024, 2048)
V1_SWEEP = "v1_scale"  # the quick grid's d_model-4096 config of floor, OFTv2 and OFT v1 only
PEFT_FACTOR = 1.3


def check(name: str, value, op: str, bound: float) -> dict:
  """`{name, value, target, met}`: `value` against `op bound`; `met` is None when unmeasured."""
  met = None if value is None else (value >= bound if op == ">=" else value <= bound)
  return {"name": name, "value": value, "target": f"{op} {bound:g}", "met": met}


def _entry(configs, sweep, d_model):
  return next(
    (e for e in configs if e["sweep"] == sweep and e["config"]["d_model"] == d_model), None
  )


def must_hold(configs: list, job: dict | None) -> dict:
  """`{"checks": [...], "peft": {...}}` for one run (configs and job entry as written).

  Each check has `name`, `value` (None where the run did not measure it), `target`, `met`.
  `peft` says whether the PEFT criterion holds by speed or by efficiency and, when the
  speed half fails, what 1.3x PEFT's efficiency would need of XLA's peak next to what the
  bare OFTv2 step reaches in the same rounds.
  """
  checks = []
  for d in GRID_D_MODELS:
    r = (_entry(configs, "d_model", d) or {}).get("ratios", {})
    checks.append(check(f"OFTv2 / floor, d_model {d}", r.get("oft_over_floor_time"), "<=", 1.05))
    checks.append(
      check(f"OFTv2 / LoRA r=16, d_model {d}", r.get("oft_over_lora16_time"), "<=", 1.00)
    )
  v1 = (_entry(configs, V1_SWEEP, 4096) or {}).get("ratios", {})
  checks.append(
    check("OFT v1 / OFTv2 step time, d_model 4096", v1.get("oftv1_over_oft_time"), ">=", 10)
  )
  checks.append(
    check("OFT v1 / OFTv2 flops, d_model 4096", v1.get("oftv1_over_oft_flops"), ">=", 10)
  )
  peft = {"met": None}
  if job is not None:
    r, m = job["ratios"], job["methods"]
    speed = check(
      "job OFT tokens/s / PEFT OFT tokens/s", r.get("peft_oft_over_job_time"), ">=", PEFT_FACTOR
    )
    efficiency = check(
      "job % of XLA peak / PEFT % of PyTorch peak",
      r.get("job_over_peft_oft_peak_fraction"),
      ">=",
      PEFT_FACTOR,
    )
    checks += [speed, efficiency]
    peft_fraction = m["peft_oft"].get("fraction_of_peak")
    peft = {
      "met": bool(speed["met"] or efficiency["met"]),
      "by": "speed" if speed["met"] else "efficiency" if efficiency["met"] else None,
      "needed_fraction_of_xla_peak": peft_fraction and PEFT_FACTOR * peft_fraction,
      "bare_fraction_of_xla_peak": m["bare"].get("fraction_of_peak"),
      "xla_over_torch_peak": job["matmul_peak"]["flops_per_s"]
      / job["torch_matmul_peak"]["flops_per_s"],
    }
  return {"checks": checks, "peft": peft}


def markdown(result: dict) -> str:
  """The must-hold table of one run, with the PEFT criterion's reason."""
  t = result["must_hold"]
  verdict = lambda c: "–" if c["met"] is None else ("met" if c["met"] else "**not met**")
  value = lambda c: "–" if c["value"] is None else f"{c['value']:.2f}"
  lines = ["| must hold | measured | target | verdict |", "|---|---|---|---|"]
  lines += [f"| {c['name']} | {value(c)} | {c['target']} | {verdict(c)} |" for c in t["checks"]]
  p = t["peft"]
  if p["met"] is not None:
    lines.append("")
    lines.append(
      f"PEFT criterion (speed or efficiency): {'met by ' + p['by'] if p['met'] else '**not met**'}. "
      f"XLA's fp32 matmul ran at {p['xla_over_torch_peak']:.2f}× PyTorch's in these rounds; "
      f"{PEFT_FACTOR}× PEFT's efficiency would need "
      f"{100 * p['needed_fraction_of_xla_peak']:.0f}% of XLA's peak, and the bare OFTv2 step "
      f"on the same model reaches {100 * p['bare_fraction_of_xla_peak']:.0f}%."
    )
  return "\n".join(lines)
