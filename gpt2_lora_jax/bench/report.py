"""The benchmark's files: a JSON record and a Markdown table per run (see harness.py for the fields)."""
from __future__ import annotations

import datetime
import json
import os
import re


def slug(text: str) -> str:
  return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def write_results(result: dict, out_dir: str) -> dict:
  """Writes the JSON and the Markdown table; returns their paths."""
  return write_pair(result, out_dir, f"bench_{slug(result['device']['device_kind'])}_{slug(result['model'])}",
                    to_markdown(result))


def write_pair(result: dict, out_dir: str, name: str, markdown: str) -> dict:
  """out_dir/<name>_<result's UTC timestamp>.json (the result and the files' paths) and .md."""
  os.makedirs(out_dir, exist_ok=True)
  stamp = datetime.datetime.fromisoformat(result["timestamp"]).strftime("%Y%m%dT%H%M%SZ")
  stem = os.path.join(out_dir, f"{name}_{stamp}")
  paths = {"json": stem + ".json", "markdown": stem + ".md"}
  with open(paths["json"], "w") as f:
    json.dump({**result, "files": paths}, f, indent=2, default=str)
  with open(paths["markdown"], "w") as f:
    f.write(markdown)
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
           f"{', '.join(c['lora_targets'])} · remat {c['remat']}"
           + (f" (chose '{result['train']['jax']['remat_policy']}')" if "remat_policy" in result.get("train", {}).get("jax", {}) else "")
           + f" · attention {c['attention']}"
           + (f" (ran `{result['train']['jax'].get('attention_path')}`)" if "train" in result else "")
           + f" · segment ids {c['segment_ids']}, segments '{c.get('segments', 'one')}'"
           + f" · setting '{c.get('setting', 'flags')}', side '{c.get('side', 'all')}'", ""]
  if "matmul" in result:
    lines += [f"Reference matmul {result['matmul']['n']}^3 {result['matmul']['dtype']}: "
              f"{_fmt(result['matmul']['flops_per_s'], '.4g', 1e-12)} TFLOP/s", ""]
  for name, row in result.get("torch", {}).items():  # --side=torch: the children's own numbers
    runs = [f"batch {r['batch_size']}: {_fmt(r['tokens_per_s'], ',.4g')} tokens/s" for r in row.get("runs", [])]
    lines.append(f"PyTorch {name}: " + (f"error: {' '.join(row['error'].split())[:200]}" if "error" in row else
                 ", ".join(runs + [f"{k} {_fmt(row[k], ',.4g')}" for k in ("tokens_per_s", "step_time_s", "compile_s",
                                                                         "sequences_per_s", "peak_bytes_in_use")
                                   if isinstance(row.get(k), (int, float))])))
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
        lines.append(f"| {name} | error: {' '.join(row['error'].split())[:80]} |||||||")
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
          lines.append(f"| {name} | error: {' '.join(row['error'].split())[:80]} |||||")
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
