r"""Compile time, planned memory and FLOPs of the LoRA train step per GPT-2 size, on abstract shapes.

Nothing is allocated or executed: the step of bench.step_plan.abstract_train_step (bf16 frozen base, LoRA
on every block linear, AdamW, bf16 compute, one device) is lowered and compiled for the backend at
hand, and the compiler's own numbers are read back:

  lower_s, compile_s   wall time of jit(...).lower() and .compile()
  temp_gib             compiled memory_analysis().temp_size_in_bytes (activations, workspace)
  peak_gib             arguments + non-aliased outputs + temporaries
  xla_gflops           compiled cost_analysis()['flops']; a while loop (nn.scan over layers, the loss
                       chunks) is counted once, not per trip, so only unrolled rows are comparable

    python benchmarks/compile_plan.py --sizes=gpt2-xl --scan=0,1 --remat=none
    python benchmarks/compile_plan.py --sizes=gpt2,gpt2-medium,gpt2-large,gpt2-xl --scan=0 \
        --remat=none,dots,full

Results: one JSON line per row appended to --out, and a Markdown table on stdout. On CPU the numbers
are the CPU compiler's plan; a GPU compiler fuses and schedules differently.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax

from gpt2_lora_jax.bench import step_plan


def measure(preset: str, scan_layers: bool, remat: str, rank: int, batch_size: int, seq_len: int) -> dict:
  step_fn, args, _ = step_plan.abstract_train_step(preset, rank, batch_size, seq_len, remat=remat,
                                                   scan_layers=scan_layers)
  t0 = time.perf_counter()
  lowered = step_fn.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  gib = 2.0 ** 30
  row = {"preset": preset, "scan_layers": scan_layers, "remat": remat, "lora_rank": rank,
         "batch_size": batch_size, "seq_len": seq_len, "lower_s": round(t1 - t0, 2),
         "compile_s": round(t2 - t1, 2), "temp_gib": round(mem.temp_size_in_bytes / gib, 3),
         "peak_gib": round((mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                            + mem.temp_size_in_bytes) / gib, 3),
         "xla_gflops": round(float(cost.get("flops", 0.0)) / 1e9, 1),
         "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
         "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
         "load_avg_1m": round(os.getloadavg()[0], 1), "jax": jax.__version__,
         "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
  del compiled, lowered, step_fn
  jax.clear_caches()
  return row


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sizes", default="gpt2-xl")
  p.add_argument("--scan", default="0,1", help="scan_layers values: 0 (unrolled), 1 (nn.scan)")
  p.add_argument("--remat", default="none", help="remat policies: none, dots, full")
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--seq_len", type=int, default=1024)
  p.add_argument("--out", default="benchmarks/results/compile_plan_cpu.jsonl")
  a = p.parse_args()
  print("| model | scan_layers | remat | lower (s) | compile (s) | temp (GiB) | peak (GiB) | XLA GFLOP | load |")
  print("|---|---|---|---|---|---|---|---|---|")
  for preset in a.sizes.split(","):
    for remat in a.remat.split(","):
      for scan in a.scan.split(","):
        row = measure(preset, bool(int(scan)), remat, a.rank, a.batch_size, a.seq_len)
        with open(a.out, "a") as f:
          f.write(json.dumps(row) + "\n")
        print(f"| {preset} | {row['scan_layers']} | {remat} | {row['lower_s']} | {row['compile_s']} | "
              f"{row['temp_gib']} | {row['peak_gib']} | {row['xla_gflops']} | {row['load_avg_1m']} |",
              flush=True)


if __name__ == "__main__":
  main()
