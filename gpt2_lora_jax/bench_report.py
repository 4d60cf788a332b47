"""The benchmark's files: a JSON record and a Markdown table per run (see bench.py for the fields)."""
from __future__ import annotations

import datetime
import json
import os
import re


def slug(text: str) -> str:
  return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def write_results(result: dict, out_dir: str) -> dict:
  """Writes the JSON and the Markdown table; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  stamp = datetime.datetime.fromisoformat(result["timestamp"]).strftime("%Y%m%dT%H%M%SZ")
  stem = os.path.join(out_dir, f"bench_{slug(result['device']['device_kind'])}_{slug(result['model'])}_{stamp}")
  paths = {"json": stem + ".json", "markdown": stem + ".md"}
  with open(paths["json"], "w") as f:
    json.dump({**result, "files": paths}, f, indent=2)
  with open(paths["markdown"], "w") as f:
    f.write(to_markdown(result))
  return paths


def _fmt(x, spec=".3g", scale=1.0, unit=""):
  return "-" if x is None else f"{x * scale:{spec}}{unit}"


def to_markdown(result: dict) -> str:
  """A human-readable summary: header, train table (with JAX/other ratios), decode and score tables."""
  d, c = result["device"], result["config"]
  gib = 1 / 2 ** 30
  lines = [f"# Benchmark: {result['model']} on {d['device_kind']} ({d['platform']}, {d['num_devices']} device(s))",
           "", f"{result['timestamp']} · jax {d['jax_version']} · python {d['python']}"
           + (f" · tag: {c['tag']}" if c["tag"] else "")
           + (f" · XLA_FLAGS `{d['xla_flags']}`" if d.get("xla_flags") else ""), "",
           f"batch {c['batch_size']} x seq {c['seq_len']} · LoRA rank {c['lora_rank']} on "
           f"{', '.join(c['lora_targets'])} · remat {c['remat']} · attention {c['attention']}"
           + (f" (ran `{result['train']['jax'].get('attention_path')}`)" if "train" in result else "")
           + f" · segment ids {c['segment_ids']}, segments '{c.get('segments', 'one')}'", "",
           f"Reference matmul {result['matmul']['n']}^3 {result['matmul']['dtype']}: "
           f"{_fmt(result['matmul']['flops_per_s'], '.4g', 1e-12)} TFLOP/s", ""]
  if "train" in result:
    jax_row = result["train"]["jax"]
    lines += [f"Train: {jax_row['dtype']} compute, base params {jax_row['param_dtype']}; "
              f"{_fmt(jax_row['flops_per_token']['total'], '.4g', 1e-9)} GFLOP/token (LoRA-aware), "
              f"XLA counts {_fmt(jax_row['xla_cost_flops_per_step'], '.4g', 1e-12)} TFLOP/step "
              f"vs {_fmt(jax_row['flops_per_step'], '.4g', 1e-12)} by formula", "",
              "| impl | step ms | tokens/s | MFU (spec) | MFU (matmul) | peak mem GiB | compile s | JAX / this tok/s |",
              "|---|---|---|---|---|---|---|---|"]
    for name, row in result["train"].items():
      if "error" in row:
        lines.append(f"| {name} | error: {row['error'].splitlines()[0][:80]} |||||||")
        continue
      ratio = 1.0 if name == "jax" else row.get("jax_over_this_tokens_per_s")
      lines.append(f"| {name} | {_fmt(row['step_time_s'], '.4g', 1e3)} | {_fmt(row['tokens_per_s'], ',.0f')} | "
                   f"{_fmt(row.get('mfu_spec'), '.1%')} | {_fmt(row.get('mfu_matmul'), '.1%')} | "
                   f"{_fmt(row['peak_bytes_in_use'], '.2f', gib)} | {_fmt(row['compile_s'], '.1f')} | "
                   f"{_fmt(ratio, '.2f')} |")
    mem = jax_row["memory_analysis"]
    lines += ["", "JAX compiled memory analysis (GiB): " + ", ".join(
        f"{k.removesuffix('_size_in_bytes')} {v * gib:.3f}" for k, v in mem.items()), ""]
  if "decode" in result:
    lines += [f"Decode: prompt {c['decode_prompt_len']} + {c['decode_new_tokens']} new tokens, greedy, "
              "end-of-text ignored", "", "| impl | batch | new tokens | seconds | tokens/s | JAX / HF |",
              "|---|---|---|---|---|---|"]
    for name, rows in result["decode"].items():
      for row in rows if isinstance(rows, list) else [rows]:
        if "error" in row:
          lines.append(f"| {name} | error: {row['error'].splitlines()[0][:80]} |||||")
          continue
        lines.append(f"| {name} | {row['batch_size']} | {row['new_tokens']} | {_fmt(row['seconds'], '.4g')} | "
                     f"{_fmt(row['tokens_per_s'], ',.0f')} | {_fmt(row.get('jax_over_hf_tokens_per_s'), '.2f')} |")
    lines.append("")
  if "score" in result:
    s = result["score"]
    lines += ["Reward scorer: " + (f"error: {s['error']}" if "error" in s else
              f"{_fmt(s['sequences_per_s'], ',.1f')} sequences/s ({s['pairs']} pairs, batch {s['batch_size']}, "
              f"mean {s['mean_tokens']:.0f} tokens, {s['dtype']}, {s['reward_model']}, {s['device_name']})"), ""]
  return "\n".join(lines)


# --- one gpu_check.sh run ----------------------------------------------------------------------------

# Targets of the GPU benchmark (one run, side by side): JAX tokens/s >= 1.5x PEFT + torch.compile
# (gpt2 b16 and gpt2-xl b8 x 1024); gpt2-xl >= 45% of the matmul rate measured in the same run;
# first-step compile <= 60 s; peak memory <= PEFT + torch.compile; sampler >= 3x HF generate at b64.
TARGETS = {"tokens_per_s_over_peft_compile": 1.5, "xl_mfu_matmul": 0.45, "compile_s": 60.0,
           "decode_b64_over_hf": 3.0}


def _load_run(out_dir: str, run_id: str) -> tuple[list, list]:
  benches, checks = [], []
  for name in sorted(os.listdir(out_dir)):
    if name.endswith(".json") and (name.startswith("bench_") or name.startswith("attention_check_")):
      with open(os.path.join(out_dir, name)) as f:
        record = json.load(f)
      if record.get("run_id") == run_id:
        (benches if name.startswith("bench_") else checks).append(record)
  return benches, checks


def _stages(path: str) -> list:
  """Rows of the script's stage log: name, exit code, seconds, limit (tab-separated)."""
  if not path or not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      name, rc, seconds, limit = line.rstrip("\n").split("\t")
      status = {"0": "ok", "124": f"timed out at {limit} s", "skip": "skipped: out of time"}.get(rc, f"exit {rc}")
      rows.append({"stage": name, "status": status, "seconds": float(seconds), "limit_s": float(limit)})
  return rows


def summarize(out_dir: str, run_id: str, stages_path: str = "") -> dict:
  """One JSON + Markdown for the files a gpu_check.sh run (run_id) wrote, with the targets checked."""
  benches, checks = _load_run(out_dir, run_id)
  device = (benches[0]["device"]["device_kind"] if benches else
            checks[0]["platform"]["device_kind"] if checks else "unknown")
  summary = {"run_id": run_id, "device": device, "stages": _stages(stages_path), "attention_check": checks,
             "train": [], "decode": [], "score": [], "targets": []}
  for b in benches:
    label = b["model"] + (f" · XLA_FLAGS {b['device']['xla_flags']}" if b["device"].get("xla_flags") else "")
    if "train" in b:
      rows = b["train"]
      jax_row, compiled = rows["jax"], rows.get("peft_compile", {})
      entry = {"label": label, "model": b["model"], "xla_flags": b["device"].get("xla_flags", ""),
               "attention_path": jax_row.get("attention_path"), "jax_tokens_per_s": jax_row["tokens_per_s"],
               "jax_compile_s": jax_row["compile_s"], "jax_mfu_matmul": jax_row["mfu_matmul"],
               "jax_peak_bytes": jax_row["peak_bytes_in_use"]}
      for name in ("peft_eager", "peft_compile"):
        if name in rows:
          entry[name] = ({"error": rows[name]["error"]} if "error" in rows[name] else
                         {"tokens_per_s": rows[name]["tokens_per_s"], "peak_bytes": rows[name]["peak_bytes_in_use"],
                          "jax_over_this_tokens_per_s": rows[name]["jax_over_this_tokens_per_s"]})
      summary["train"].append(entry)
      if "error" not in compiled and compiled and not entry["xla_flags"]:
        ratio = compiled["jax_over_this_tokens_per_s"]
        summary["targets"].append({"target": f"{b['model']}: JAX tokens/s / PEFT + torch.compile",
                                   "value": ratio, "goal": f">= {TARGETS['tokens_per_s_over_peft_compile']}",
                                   "met": ratio is not None and ratio >= TARGETS["tokens_per_s_over_peft_compile"]})
        peak = compiled.get("jax_over_this_peak_bytes")
        summary["targets"].append({"target": f"{b['model']}: JAX peak memory / PEFT + torch.compile",
                                   "value": peak, "goal": "<= 1", "met": peak is not None and peak <= 1})
      if not entry["xla_flags"]:
        summary["targets"].append({"target": f"{b['model']}: first-step compile (s)", "value": jax_row["compile_s"],
                                   "goal": f"<= {TARGETS['compile_s']:.0f}",
                                   "met": jax_row["compile_s"] <= TARGETS["compile_s"]})
        if b["model"].startswith("gpt2-xl"):
          summary["targets"].append({"target": f"{b['model']}: MFU against the measured matmul",
                                     "value": jax_row["mfu_matmul"], "goal": f">= {TARGETS['xl_mfu_matmul']}",
                                     "met": jax_row["mfu_matmul"] >= TARGETS["xl_mfu_matmul"]})
    for row in b.get("decode", {}).get("jax_sampler", []):
      summary["decode"].append({"label": label, **row})
      if row["batch_size"] == 64 and not b["device"].get("xla_flags"):
        ratio = row.get("jax_over_hf_tokens_per_s")
        summary["targets"].append({"target": "sampler tokens/s / HF generate at batch 64", "value": ratio,
                                   "goal": f">= {TARGETS['decode_b64_over_hf']}",
                                   "met": ratio is not None and ratio >= TARGETS["decode_b64_over_hf"]})
    if "score" in b:
      summary["score"].append({"label": label, **b["score"]})
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
  stem = os.path.join(out_dir, f"gpu_check_{slug(device)}_{stamp}")
  summary["files"] = {"json": stem + ".json", "markdown": stem + ".md"}
  with open(stem + ".json", "w") as f:
    json.dump(summary, f, indent=2)
  with open(stem + ".md", "w") as f:
    f.write(summary_markdown(summary))
  return summary


def summary_markdown(s: dict) -> str:
  gib = 1 / 2 ** 30
  lines = [f"# gpu_check on {s['device']} (run {s['run_id']})", ""]
  if s["stages"]:
    lines += ["| stage | status | seconds | limit s |", "|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['status']} | {r['seconds']:.0f} | {r['limit_s']:.0f} |" for r in s["stages"]]
    lines.append("")
  for c in s["attention_check"]:
    lines += [f"Attention check ({c['shape']['batch']} x {c['shape']['seq_len']}, {c['shape']['heads']} heads, "
              f"{c['shape']['dtype']}): max abs difference from fp32 XLA", "",
              "| path | ok | out | dq | dk | dv | fwd+bwd ms |", "|---|---|---|---|---|---|---|"]
    for path, row in c["paths"].items():
      if "error" in row:
        lines.append(f"| {path} | no | error: {row['error'][:100]} |||||")
      else:
        d = row["max_abs_diff_vs_fp32"]
        lines.append(f"| {path} | {'yes' if row['ok'] else 'NO'} | {d['out']:.3g} | {d['dq']:.3g} | {d['dk']:.3g} | "
                     f"{d['dv']:.3g} | {row['fwd_bwd_s'] * 1e3:.3g} |")
    lines.append("")
  if s["train"]:
    lines += ["| train | attention | JAX tok/s | PEFT eager tok/s | PEFT compile tok/s | JAX / compile | "
              "MFU (matmul) | JAX peak GiB | PEFT compile peak GiB | compile s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for t in s["train"]:
      eager, comp = t.get("peft_eager", {}), t.get("peft_compile", {})
      lines.append(f"| {t['label']} | {t['attention_path']} | {_fmt(t['jax_tokens_per_s'], ',.0f')} | "
                   f"{_fmt(eager.get('tokens_per_s'), ',.0f')} | {_fmt(comp.get('tokens_per_s'), ',.0f')} | "
                   f"{_fmt(comp.get('jax_over_this_tokens_per_s'), '.2f')} | {_fmt(t['jax_mfu_matmul'], '.1%')} | "
                   f"{_fmt(t['jax_peak_bytes'], '.2f', gib)} | {_fmt(comp.get('peak_bytes'), '.2f', gib)} | "
                   f"{_fmt(t['jax_compile_s'], '.1f')} |")
    lines.append("")
  if s["decode"]:
    lines += ["| decode | batch | JAX tok/s | JAX / HF generate |", "|---|---|---|---|"]
    lines += [f"| {d['label']} | {d['batch_size']} | {_fmt(d['tokens_per_s'], ',.0f')} | "
              f"{_fmt(d.get('jax_over_hf_tokens_per_s'), '.2f')} |" for d in s["decode"]]
    lines.append("")
  for sc in s["score"]:
    lines += [f"Scorer ({sc['label']}): " + (f"error: {sc['error'][:100]}" if "error" in sc else
              f"{sc['sequences_per_s']:,.1f} sequences/s"), ""]
  if s["targets"]:
    lines += ["| target | value | goal | met |", "|---|---|---|---|"]
    lines += [f"| {t['target']} | {_fmt(t['value'], '.3g')} | {t['goal']} | {'yes' if t['met'] else 'no'} |"
              for t in s["targets"]]
    lines.append("")
  return "\n".join(lines)


def main(argv=None) -> int:
  import argparse
  parser = argparse.ArgumentParser(prog="python -m gpt2_lora_jax.bench_report",
                                   description="Summarise one gpu_check.sh run as JSON + Markdown.")
  parser.add_argument("--summarize", required=True, metavar="OUT_DIR")
  parser.add_argument("--run_id", required=True)
  parser.add_argument("--stages", default="", help="the script's tab-separated stage log")
  args = parser.parse_args(argv)
  summary = summarize(args.summarize, args.run_id, args.stages)
  print(summary_markdown(summary))
  print(f"wrote {summary['files']['json']} and {summary['files']['markdown']}")
  return 0


if __name__ == "__main__":
  import sys
  sys.exit(main())
