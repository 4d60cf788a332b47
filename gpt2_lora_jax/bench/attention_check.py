"""Every attention path this device can run against the fp32 XLA reference, on HH-like packed rows.

    python -m gpt2_lora_jax.bench.attention_check --out_dir benchmarks/results            # T 1024, bf16
    python -m gpt2_lora_jax.bench.attention_check --batch_size 2 --seq_len 64 --heads 4 --out_dir /tmp/x

Rows: conversation lengths drawn from the length distribution of HH-RLHF (QUANTILES below),
packed by the project's packer (packing.pack, capped at --max_segments) into T-token rows, so the
segments, their lengths and the trailing padding run look like training batches. For each path
(attention.py: xla, cudnn_packed, cudnn_mask, pallas; plus layout_xla, XLA with a mask rebuilt from the
packed layout, which checks the layout itself on any device) it computes the output and the
gradients of <out, g> for a random cotangent g with respect to q, k, v in bf16, and reports the max
abs difference of each from the same computation in fp32 through XLA with the segment mask, next
to the bf16 XLA path's own difference (the rounding every bf16 path has), NaN counts, the
median time of a jitted forward + backward and its compile seconds. Inputs are drawn on the host
and every one (the segment ids included) is an argument of the compiled programs, so nothing runs
op by op and no input is a constant the compiler could fold. A path passes when nothing is NaN and
its differences are at most twice the bf16 XLA path's plus 1e-3 (a criterion of this check, not a
cuDNN bound). A row with more segments than the layout table (cap + 1) must come out NaN on cudnn_packed.
Each path's row is printed (flushed) and recorded (records.emit, kind 'attention_check') the
moment it is measured, so a later path that hangs or crashes loses none of the earlier ones.
Results: attention_check_<device>_<UTC time>.{json,md} in --out_dir. Imports no ml_collections
or datasets (the GPU machine has neither).
"""
from __future__ import annotations

import argparse
import datetime
import faulthandler
import functools
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from gpt2_lora_jax import attention, packing
from gpt2_lora_jax.bench import records
from gpt2_lora_jax.bench.report import slug
from gpt2_lora_jax.errors import describe_exception

# Conversation lengths (tokens of a training row: inputs after shifting) of HH-RLHF harmless-base's
# test split (2,308 conversations, measured with data.build, tokenizer 'offline', loss mask
# 'assistant', max_length 1024): the 0th, 5th, ..., 100th percentiles. Mean 166, median 133, p90 340.
QUANTILES = (15, 32, 40, 49, 59, 70, 83, 94, 107, 120, 133, 147, 162, 177, 194, 219, 249, 284, 340,
             425, 1007)


def hh_like_lengths(rng: np.random.Generator, n: int, max_length: int) -> np.ndarray:
  """n lengths by inverse-CDF sampling of QUANTILES (linear between them), scaled to max_length/1024."""
  u = rng.random(n) * (len(QUANTILES) - 1)
  lo = np.floor(u).astype(int)
  hi = np.minimum(lo + 1, len(QUANTILES) - 1)
  q = np.asarray(QUANTILES, float)
  lengths = q[lo] + (q[hi] - q[lo]) * (u - lo)
  return np.clip(np.round(lengths * max_length / 1024), 1, max_length).astype(int)


def hh_like_segment_ids(seed: int, batch_size: int, seq_len: int, max_segments: int) -> np.ndarray:
  """(B, T) int32 segment ids of B packed rows: packed HH-like conversations, ids 1.., padding 0.

  Packs 8 conversations per wanted row and takes B rows spread evenly over the packed rows (the
  packer fills its first rows with the longest conversations and its last ones with the shortest).
  """
  rng = np.random.default_rng(seed)
  lengths = hh_like_lengths(rng, 8 * batch_size, seq_len)
  ids = [np.zeros(n + 1, np.int32) for n in lengths]
  packed = packing.pack(ids, [np.ones(n, bool) for n in lengths], list(range(len(ids))), seq_len,
                        max_segments=max_segments)
  rows = np.linspace(0, packed.num_rows - 1, batch_size).round().astype(int)
  return packed.segment_ids[rows].astype(np.int32)


def layout_mask(seqlens_BM, offsets_BM1, T: int):
  """(B, 1, T, T) causal-within-segment mask rebuilt from a packed layout (as cuDNN reads it): query
  and key in the same segment of the table, key not after query. Each position's segment is found
  by a reduction over the table (B, M, T) -> (B, T), then compared like make_attention_mask's
  segment ids: no integer matmul (see _run)."""
  t = jnp.arange(T)
  start, n = offsets_BM1[:, :-1, None], seqlens_BM[:, :, None]
  in_BMT = (n >= 0) & (t >= start) & (t < start + n)
  covered_BT = jnp.any(in_BMT, axis=1)
  which_BT = jnp.argmax(in_BMT, axis=1)  # the segment covering each position (they do not overlap)
  same = (which_BT[:, :, None] == which_BT[:, None, :]) & covered_BT[:, :, None] & covered_BT[:, None, :]
  return (same & (t[None, :, None] >= t[None, None, :]))[:, None]


def _run(path: str, max_segments: int):
  """The jitted forward + backward of one path: (q, k, v, g, segment ids) -> (out, (dq, dk, dv)).

  The segment ids are an argument of the program, never a constant baked into it. The H200's check
  stalled > 30 s compiling layout_xla at 16 x 1024 when they were a closed-over
  constant and the layout's mask came from an integer einsum (B, M, T) x (B, M, T) -> (B, T, T),
  an s32 batched dot (cuBLAS has no s32 GEMM; XLA:GPU emits integer dots itself,
  openxla/xla#5796); the xla path, with neither, compiled. Both are gone (tests/test_gpu_lowering.py
  checks the lowered programs); benchmarks/README.md says what is established and what is not."""
  from gpt2_lora_jax import model as gpt2_model

  def f(q, k, v, seg):
    T = q.shape[1]
    if path == "layout_xla":
      seqlens, offsets, _ = attention.segment_layout(seg, max_segments + 1)
      mask = attention.Mask("xla", layout_mask(seqlens, offsets, T))
    else:
      dense = gpt2_model.make_attention_mask(T, T, segment_ids=seg)
      mask = attention.build_mask(path, dense, seg, max_segments)
    return attention.attend(q, k, v, mask, fallback=False)  # the kernel itself, or its error

  def fwd_bwd(q, k, v, g, seg):
    out, vjp = jax.vjp(lambda q, k, v: f(q, k, v, seg), q, k, v)
    return out, vjp(g.astype(out.dtype))

  return jax.jit(fwd_bwd)


@jax.jit
def _differences(out, grads, ref_out, ref_grads):
  """NaN counts and max abs differences from the reference of (out, dq, dk, dv): one program."""
  got, want = (out, *grads), (ref_out, *ref_grads)
  nans = [jnp.sum(jnp.isnan(x)) for x in got]
  diffs = [jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))) for a, b in zip(got, want)]
  return nans, diffs


def check(batch_size: int = 16, seq_len: int = 1024, heads: int = 12, head_dim: int = 64,
          max_segments: int = 32, seed: int = 0, repeats: int = 5, dtype: str = "bfloat16") -> dict:
  plat = attention.platform()
  seg = hh_like_segment_ids(seed, batch_size, seq_len, max_segments)
  shape = (batch_size, seq_len, heads, head_dim)
  rng = np.random.default_rng(seed)  # host arrays: nothing compiles before the paths' programs
  q32, k32, v32, g32 = (rng.standard_normal(shape, np.float32) for _ in range(4))
  ref_out, ref_grads = _run("xla", max_segments)(q32, k32, v32, g32, seg)
  q, k, v, g = (x.astype(jnp.dtype(dtype)) for x in (q32, k32, v32, g32))
  chosen = attention.select_path("cudnn", "segments", plat, dtype, head_dim, seq_len, max_segments,
                                 log_fallbacks=False)
  paths = ["xla", "layout_xla"] + (["cudnn_packed", "cudnn_mask", "pallas"] if plat.backend == "gpu" and plat.cuda
                                   else [])
  runs_per_row = [1 + int(np.count_nonzero(np.diff(r))) for r in seg]
  result = {"platform": {**vars(plat), "device_kind": jax.devices()[0].device_kind},
            "shape": {"batch": batch_size, "seq_len": seq_len, "heads": heads, "head_dim": head_dim,
                      "dtype": dtype, "max_segments": max_segments},
            "segments_per_row": {"mean": float(np.mean(runs_per_row)), "max": max(runs_per_row),
                                 "min": min(runs_per_row), "note": "runs of one id, the padding run included"},
            "path_model_would_use": chosen, "paths": {}}
  print(f"attention check on {result['platform']['device_kind']}: {shape}, paths {paths}; the model would use "
        f"{chosen}", flush=True)
  for path in paths:
    row = {}
    try:
      t0 = time.perf_counter()
      fn = _run(path, max_segments).lower(q, k, v, g, seg).compile()
      compile_s = time.perf_counter() - t0
      out, grads = jax.block_until_ready(fn(q, k, v, g, seg))
      times = []
      for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(q, k, v, g, seg))
        times.append(time.perf_counter() - t0)
      nans, diffs = jax.device_get(_differences(out, grads, ref_out, ref_grads))
      names = ("out", "dq", "dk", "dv")
      row = {"compile_s": compile_s, "fwd_bwd_s": statistics.median(times),
             "nan": {n: int(x) for n, x in zip(names, nans)},
             "max_abs_diff_vs_fp32": {n: float(x) for n, x in zip(names, diffs)}}
    except Exception as e:  # a kernel this device or jax refuses: recorded, the others go on
      row = {"error": describe_exception(e)}  # a message may be empty
    result["paths"][path] = row
    _report_path(path, row, result["paths"]["xla"] if path != "xla" else row)
  if "cudnn_packed" in result["paths"] and "error" not in result["paths"]["cudnn_packed"]:
    result["overflow_row_is_nan"] = _overflow_is_nan(q, k, v, max_segments)
    records.emit("attention_check", path="cudnn_packed overflow row is NaN", ok=result["overflow_row_is_nan"])
  return result


def _report_path(path: str, row: dict, xla_row: dict):
  """Sets row['ok'] against the bf16 XLA path's differences, prints the row and records it, at once."""
  base = xla_row.get("max_abs_diff_vs_fp32", {})
  row["ok"] = "error" not in row and not any(row["nan"].values()) and all(
      row["max_abs_diff_vs_fp32"][n] <= 2 * base[n] + 1e-3 for n in base)
  if "error" in row:
    print(f"{path}: ERROR {row['error']}", flush=True)
  else:
    d = row["max_abs_diff_vs_fp32"]
    print(f"{path}: ok {row['ok']}, max abs diff out {d['out']:.3g} dq {d['dq']:.3g} dk {d['dk']:.3g} "
          f"dv {d['dv']:.3g}, NaNs {sum(row['nan'].values())}, fwd+bwd {row['fwd_bwd_s'] * 1e3:.3g} ms, "
          f"compile {row['compile_s']:.1f} s", flush=True)
  records.emit("attention_check", path=path, **row)


def _overflow_is_nan(q, k, v, max_segments: int) -> bool:
  """A row with cap + 2 runs (one more than the table) must come out all NaN; the others not."""
  B, T = q.shape[:2]
  seg = np.ones((B, T), np.int32)
  seg[0, :max_segments + 2] = np.arange(1, max_segments + 3)  # cap + 2 one-token segments, then one
  seg[0, max_segments + 2:] = max_segments + 3
  first_all_nan, others_any_nan = jax.device_get(_overflow_nans(q, k, v, seg, max_segments))
  return bool(first_all_nan and not others_any_nan)


@functools.partial(jax.jit, static_argnums=4)
def _overflow_nans(q, k, v, seg, max_segments: int):
  """(row 0 all NaN, any NaN in the other rows) of cudnn_packed attention, the layout built in here."""
  out = attention.attend(q, k, v, attention.build_mask("cudnn_packed", None, seg, max_segments))
  return jnp.isnan(out[0]).all(), jnp.isnan(out[1:]).any()


def to_markdown(result: dict) -> str:
  s, p = result["shape"], result["platform"]
  lines = [f"# Attention check on {p['device_kind']} ({p['backend']})", "",
           f"{result['timestamp']} · jax {'.'.join(map(str, p['jax_version']))} · cuDNN {p['cudnn_version'] or '-'} "
           f"· compute capability {'.'.join(map(str, p['compute_capability'])) or '-'}", "",
           f"batch {s['batch']} x {s['seq_len']}, {s['heads']} heads x {s['head_dim']}, {s['dtype']}; "
           f"segments per row (padding run included) mean {result['segments_per_row']['mean']:.2f}, "
           f"max {result['segments_per_row']['max']}; the model would use `{result['path_model_would_use']}`", "",
           "Max abs difference from the fp32 XLA reference (segment mask):", "",
           "| path | ok | out | dq | dk | dv | NaNs | fwd+bwd ms | compile s |", "|---|---|---|---|---|---|---|---|---|"]
  for path, row in result["paths"].items():
    if "error" in row:
      lines.append(f"| {path} | no | error: {row['error'][:120]} |||||||")
      continue
    d = row["max_abs_diff_vs_fp32"]
    lines.append(f"| {path} | {'yes' if row['ok'] else 'NO'} | {d['out']:.3g} | {d['dq']:.3g} | {d['dk']:.3g} | "
                 f"{d['dv']:.3g} | {sum(row['nan'].values())} | {row['fwd_bwd_s'] * 1e3:.3g} | {row['compile_s']:.1f} |")
  if "overflow_row_is_nan" in result:
    lines += ["", f"A row over the segment table comes out NaN (and only it): {result['overflow_row_is_nan']}"]
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m gpt2_lora_jax.bench.attention_check", description=__doc__.split("\n")[0])
  for name, default in (("batch_size", 16), ("seq_len", 1024), ("heads", 12), ("head_dim", 64),
                        ("max_segments", 32), ("seed", 0), ("repeats", 5)):
    parser.add_argument(f"--{name}", type=int, default=default)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--out_dir", default="benchmarks/results")
  parser.add_argument("--run_id", default="", help="groups the files of one gpu_check.sh run")
  parser.add_argument("--stall_dump_s", type=float, default=0.0,
                      help="a stack dump of every thread to stderr every this many seconds (0 = none)")
  args = parser.parse_args(argv)
  if args.stall_dump_s > 0:
    faulthandler.dump_traceback_later(args.stall_dump_s, repeat=True)
  settings = {k: v for k, v in vars(args).items() if k not in ("out_dir", "run_id", "stall_dump_s")}
  result = {"timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(), "run_id": args.run_id,
            **check(**settings)}
  text = to_markdown(result)
  print(text)
  if args.out_dir:
    os.makedirs(args.out_dir, exist_ok=True)
    stamp = datetime.datetime.fromisoformat(result["timestamp"]).strftime("%Y%m%dT%H%M%SZ")
    stem = os.path.join(args.out_dir, f"attention_check_{slug(result['platform']['device_kind'])}_{stamp}")
    with open(stem + ".json", "w") as f:
      json.dump(result, f, indent=2)
    with open(stem + ".md", "w") as f:
      f.write(text)
  ok = all(row["ok"] for row in result["paths"].values()) and result.get("overflow_row_is_nan", True)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
