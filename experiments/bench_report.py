"""Markdown tables and PNG plots from a `benchmark.py` results dict."""

from __future__ import annotations

import os

LABELS = {
  "oft": "OFTv2 (oftjax)",
  "oftv1": "OFT v1 (weight-centric)",
  "lora16": "LoRA r=16",
  "lora_match": "LoRA r=match",
  "full": "full FT",
  "floor": "floor (no adapter)",
  "peft_oft": "PEFT OFT (torch)",
  "peft_lora16": "PEFT LoRA r=16 (torch)",
}
ORDER = ("oft", "floor", "lora16", "lora_match", "full", "oftv1", "peft_oft", "peft_lora16")
COLORS = dict(zip(ORDER, ("C0", "C1", "C2", "C8", "C3", "C4", "C5", "C6")))


def _f(x, fmt="{:.2f}"):
  return "–" if x is None else fmt.format(x)


def markdown(result: dict) -> str:
  """One row per (config, method), the targets, the job and the compile-only flops check."""
  parts = [_grid_markdown(result)] if result["configs"] else []
  if "job" in result:
    parts.append(job_markdown(result))
  if "flops_check" in result:
    parts.append(flops_check_markdown(result["flops_check"]))
  return "\n\n".join(parts)


def job_markdown(result: dict) -> str:
  """The job's step against the bare step and PEFT's OFT, each against its own matmul peak."""
  e = result["job"]
  c, m, r = e["config"], e["methods"], e["ratios"]
  lines = [
    f"Job step (`benchmark.py --job`): d_model {c['d_model']}, ffn {c['ffn']}, "
    f"{c['layers']} layers, vocab {c['vocab']}, {c['batch']}×{c['seq']} tokens, "
    f"b={c['block_size']}, all 7 projections; matmul peaks interleaved with these steps: "
    f"XLA {e['matmul_peak']['flops_per_s'] / 1e9:.0f}, PyTorch "
    f"{e['torch_matmul_peak']['flops_per_s'] / 1e9:.0f} GFLOP/s",
    "",
    "| runner | step s | × bare | GFLOP | compile s | % own matmul peak |",
    "|---|---|---|---|---|---|",
  ]
  labels = {
    "job": "job step (finetune_gemma.py's)",
    "bare": "bare OFTv2 step",
    "peft_oft": "PEFT OFT (torch)",
    "bare[scan]": "bare OFTv2 step, layer scan (`--unroll-layers off`)",
    "bare[unrolled]": "bare OFTv2 step, layers unrolled (`--unroll-layers on`)",
  }
  for name, s in m.items():
    label = labels.get(name, f"bare step, XLA options {name[5:-1]}")
    lines.append(
      f"| {label} | {s['step_s']:.3f} | {_f(s.get('time_vs_oft'))} "
      f"| {_f(s.get('flops') and s['flops'] / 1e9, '{:.1f}')} "
      f"| {_f(s.get('compile_s'), '{:.1f}')} "
      f"| {_f(s.get('fraction_of_peak') and 100 * s['fraction_of_peak'], '{:.0f}')} |"
    )
  keys = [k for k in r if "job" in k or "bare" in k]
  lines += ["", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
  lines.append("| " + " | ".join(_f(r[k]) for k in keys) + " |")
  return "\n".join(lines)


def flops_check_markdown(check: dict) -> str:
  """OFT v1 against OFTv2 from compiled figures alone."""
  m = check["methods"]
  return (
    f"Compile-only check at d_model {check['d_model']} ({check['tokens']} tokens, "
    f"b={check['block_size']}): OFT v1 {m['oftv1']['flops'] / 1e9:.0f} GFLOP vs OFTv2 "
    f"{m['oft']['flops'] / 1e9:.0f} GFLOP per step ({check['oftv1_over_oft_flops']:.1f}×); "
    f"temp {m['oftv1']['temp_bytes'] / 2**20:.0f} vs {m['oft']['temp_bytes'] / 2**20:.0f} MiB "
    f"({check['oftv1_over_oft_temp']:.1f}×)."
  )


def _grid_markdown(result: dict) -> str:
  peak = result["matmul_peak"]["flops_per_s"]
  per_config = ", ".join(
    f"{e['config']['d_model']}/{e['config']['tokens']}/{e['config']['block_size']}: "
    f"{e['matmul_peak']['flops_per_s'] / 1e9:.0f}"
    for e in result["configs"]
    if "matmul_peak" in e
  )
  lines = [
    f"XLA fp32 matmul peak, start/end of run: {peak / 1e9:.1f} GFLOP/s"
    + (
      f"; interleaved with each config's steps (d_model/tokens/b: GFLOP/s), used for "
      f"% peak: {per_config}"
      if per_config
      else ""
    ),
    "",
    "| sweep | d_model | tokens | b | method | trainable | step s | × OFTv2 | GFLOP "
    "| flops × OFTv2 | temp MiB | temp × OFTv2 | args MiB | compile s | % own peak |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for entry in result["configs"]:
    c = entry["config"]
    for name in ORDER:
      s = entry["methods"].get(name)
      if s is None:
        continue
      label = LABELS[name] + (f" (r={s['lora_rank']})" if name == "lora_match" else "")
      lines.append(
        f"| {entry['sweep']} | {c['d_model']} | {c['tokens']} | {c['block_size']} | {label} "
        f"| {s['trainable_params']:,} | {s['step_s']:.3f} | {_f(s.get('time_vs_oft'))} "
        f"| {_f(s.get('flops') and s['flops'] / 1e9, '{:.1f}')} | {_f(s.get('flops_vs_oft'))} "
        f"| {_f(s.get('temp_bytes') and s['temp_bytes'] / 2**20, '{:.1f}')} "
        f"| {_f(s.get('temp_vs_oft'))} "
        f"| {_f(s.get('argument_bytes') and s['argument_bytes'] / 2**20, '{:.1f}')} "
        f"| {_f(s.get('compile_s'), '{:.1f}')} "
        f"| {_f(s.get('fraction_of_peak') and 100 * s['fraction_of_peak'], '{:.0f}')} |"
      )
  keys = (
    "oft_over_floor_time",
    "oft_over_floor_flops",
    "oft_over_lora16_time",
    "lora16_over_floor_time",
    "lora16_over_full_time",
    "oftv1_over_oft_time",
    "oftv1_over_oft_flops",
    "oftv1_over_oft_temp",
    "peft_oft_over_oft_time",
    "peft_lora16_over_lora16_time",
    "oft_over_peft_oft_peak_fraction",
    "lora16_over_peft_lora16_peak_fraction",
  )
  lines += [
    "",
    "Key ratios per config (time ratios: median over rounds of back-to-back steps):",
    "",
    "| d_model | tokens | b | " + " | ".join(keys) + " |",
    "|---|---|---|" + "---|" * len(keys),
  ]
  for entry in result["configs"]:
    c, r = entry["config"], entry.get("ratios", {})
    lines.append(
      f"| {c['d_model']} | {c['tokens']} | {c['block_size']} | "
      + " | ".join(_f(r.get(k)) for k in keys)
      + " |"
    )
  if "torch_matmul_peak" in result:
    lines[0] += (
      f". PyTorch fp32 matmul peak, start/end of run: "
      f"{result['torch_matmul_peak']['flops_per_s'] / 1e9:.1f} GFLOP/s (PEFT rows' % own peak: "
      f"of the PyTorch peak interleaved with the config, on oftjax's compiled flops of the same "
      f"math)"
    )
  t = result["targets"]
  c = t["config"]
  lines += [
    "",
    f"Targets at d_model={c['d_model']}, tokens={c['tokens']}, b={c['block_size']}:",
    "",
    "| target | measured | met |",
    "|---|---|---|",
  ]
  for name, v in t["checks"].items():
    met = {True: "yes", False: "**no**", None: "–"}[v["met"]]
    lines.append(f"| {name} {v['target']} | {_f(v['value'])} | {met} |")
  return "\n".join(lines)


def _series(result, sweep, key, methods, fn):
  entries = [
    e
    for e in result["configs"]
    if e["sweep"] == sweep
    or (sweep != "d_model" and e["sweep"] == "d_model" and _joins(e, sweep, result))
  ]
  entries.sort(key=lambda e: e["config"][key])
  out = {}
  for name in methods:
    pts = [(e["config"][key], fn(e["methods"][name], e)) for e in entries if name in e["methods"]]
    pts = [(x, y) for x, y in pts if y is not None]
    if pts:
      out[name] = pts
  return out


def _joins(entry, sweep, result):
  """A d_model-sweep config that also lies on the other sweep's line (shared base point)."""
  others = [e["config"] for e in result["configs"] if e["sweep"] == sweep]
  if not others:
    return False
  c = entry["config"]
  fixed = {"tokens": ("d_model", "block_size"), "block_size": ("d_model", "tokens")}[sweep]
  return all(c[k] == others[0][k] for k in fixed)


def plots(result: dict, folder: str) -> list[str]:
  """Writes the benchmark's PNGs; bare `Figure` objects leave the matplotlib backend alone."""
  from matplotlib.figure import Figure
  import matplotlib.ticker

  def subplots(*grid, figsize):
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*grid)

  os.makedirs(folder, exist_ok=True)
  written = []
  title = result.get("plot_title") or (
    f"1 Gemma-3-shaped layer, fp32, {result['machine']['threads']} CPU threads "
    f"({result['mode']} run)"
  )

  def save(fig, name):
    path = os.path.join(folder, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    written.append(path)

  for sweep, key, xlabel in (
    ("d_model", "d_model", "d_model (tokens/step 512, b=32)"),
    ("tokens", "tokens", "tokens per step"),
    ("block_size", "block_size", "OFT block size b"),
  ):
    series = _series(result, sweep, key, ORDER, lambda s, e: s["step_s"])
    if not series or max(len(v) for v in series.values()) < 2:
      continue
    fig, axes = subplots(1, 2, figsize=(12, 4.5))
    for name, pts in series.items():
      style = "--" if name.startswith("peft") else "-"
      axes[0].plot(*zip(*pts), style, marker="o", color=COLORS[name], label=LABELS[name])
    axes[0].set(xscale="log", yscale="log", xlabel=xlabel, ylabel="median step time (s)")
    axes[0].set_xticks([x for x, _ in max(series.values(), key=len)])
    axes[0].get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axes[0].legend(fontsize=8)
    ratio = _series(
      result,
      sweep,
      key,
      ORDER,
      lambda s, e: s.get("time_vs_oft") if "oft" in e["methods"] else None,
    )
    for name, pts in ratio.items():
      if name != "oft":
        style = "--" if name.startswith("peft") else "-"
        axes[1].plot(*zip(*pts), style, marker="o", color=COLORS[name], label=LABELS[name])
    axes[1].axhline(1.0, color="k", lw=0.8)
    axes[1].set(xscale="log", yscale="log", xlabel=xlabel, ylabel="step time / OFTv2 step time")
    axes[1].set_xticks(axes[0].get_xticks())
    axes[1].get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axes[1].legend(fontsize=8)
    for ax in axes:
      ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    fig.suptitle(title)
    save(fig, f"step_time_vs_{sweep}.png")

  mem = _series(
    result,
    "d_model",
    "d_model",
    ORDER,
    lambda s, e: s.get("temp_bytes") and s["temp_bytes"] / 2**20,
  )
  flops = _series(
    result, "d_model", "d_model", ORDER, lambda s, e: s.get("flops") and s["flops"] / 1e9
  )
  if mem and max(len(v) for v in mem.values()) >= 2:
    fig, axes = subplots(1, 2, figsize=(12, 4.5))
    for ax, data, ylabel in (
      (axes[0], flops, "compiled GFLOP per step"),
      (axes[1], mem, "compiled temp memory (MiB)"),
    ):
      for name, pts in data.items():
        ax.plot(*zip(*pts), marker="o", color=COLORS[name], label=LABELS[name])
      ax.set(xscale="log", yscale="log", xlabel="d_model (tokens/step 512, b=32)", ylabel=ylabel)
      ax.legend(fontsize=8)
      ax.set_xticks([x for x, _ in max(data.values(), key=len)])
      ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
      ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    fig.suptitle(title + ": XLA cost and memory analysis")
    save(fig, "flops_and_memory_vs_d_model.png")

  big = max(
    (e for e in result["configs"] if e["sweep"] == "d_model"),
    key=lambda e: e["config"]["d_model"],
    default=None,
  )
  if big is not None:
    names = [n for n in ORDER if "fraction_of_peak" in big["methods"].get(n, {})]
    fig, ax = subplots(figsize=(8, 4))
    ax.bar([LABELS[n] for n in names], [100 * big["methods"][n]["fraction_of_peak"] for n in names])
    ax.axhline(60, color="r", ls="--", lw=1, label="target 60%")
    ax.set(
      ylabel="% of XLA fp32 matmul peak",
      title=f"achieved FLOP/s at d_model={big['config']['d_model']} "
      f"(peak {result['matmul_peak']['flops_per_s'] / 1e9:.0f} GFLOP/s)",
    )
    ax.tick_params(axis="x", rotation=25, labelsize=8)
    ax.legend()
    save(fig, "fraction_of_peak.png")
  return written
