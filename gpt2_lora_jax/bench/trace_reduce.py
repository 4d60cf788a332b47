"""Where a train step's device time goes: a jax.profiler trace reduced to two tables. Standard
library only (gzip + json), so a trace brought back from a GPU machine reduces anywhere.

What jax writes. `jax.profiler.trace(dir, create_perfetto_trace=True)` leaves
dir/plugins/profile/<timestamp>/ holding <host>.xplane.pb, <host>.trace.json.gz (XLA's
TraceContainerToJson) and perfetto_trace.json.gz (jax's copy of the same JSON without its
"metadata" key); jax 0.10.2 writes all three on CPU. The JSON is {"traceEvents": [...]}: "M"
events name processes and threads (process_name, thread_name), "X" events are complete events
(pid, tid, ts and dur in microseconds, name, args with string values), and a final {} closes the
list. find_trace() picks perfetto_trace.json.gz, else the one *.trace.json.gz.

Which events are device work (device_events):
- GPU trace: a process named "/device:GPU:<n>" (XLA names each GPU's plane so). Its threads are
  CUPTI's lines, "Stream #<id>(<event types>)": kernels, memcpys, memsets run there, and only
  those threads count ("CUPTI overhead" and any other line do not). The GPU whose process name
  sorts first is reduced; the others are listed in `other_devices`.
- CPU trace (no GPU process): XLA:CPU runs each op as a thunk on host threads of "/host:CPU"
  ("tf_XLAPjRtCpuClient/...", "tf_XLAEigen/..." under jax 0.10.2); every such event carries an
  "hlo_op" arg, and those events are the "device" work. The report labels them CPU ops.
- On both, an event that contains another device event of the same thread is a container, not
  work of its own (XLA:CPU's while loops hold their body's ops): only the innermost events count.

Steps (step_windows): events with a "step_num" arg (what jax.profiler.StepTraceAnnotation
writes), optionally only those with a given name; each is the window [ts, ts + dur]. A device
event counts in every window it overlaps, clipped to it; events overlapping no window are only
counted (`outside_steps`).

Per step: `wall_ms`; per category its `calls` and summed time; `busy_ms`, the union of all device
intervals (overlapping kernels on two streams count once); `overlap_ms` = summed - busy; and
`idle_ms` = wall - busy, the time no kernel ran (host work, launches, syncs). So the categories
less the overlap plus the idle time make the wall time exactly. The kernel table groups by the
full event name: calls, total time, time per step, and share of the summed device time of all
events in the steps (the busy time when nothing overlaps); the JSON adds each name's three most
frequent "hlo_op" args with their counts (which HLO ops a library kernel ran for).

Categories: CATEGORIES below, matched in order against the event name (case-insensitive), first
match wins; its third column says what each rule is for. Names seen in jax 0.10.2's CPU trace of
the tiny train step are XLA op names ("ynn_fusion.32", "copy.268", "broadcast_add_fusion.7",
"while.660"). On a GPU, XLA's own kernels are named after their fusions and library kernels after
the library; the GPU names in the table come from the public names of those libraries' kernels,
not from a trace read here.
"""
from __future__ import annotations

import glob
import gzip
import json
import os
import re

from gpt2_lora_jax.errors import UserError

# (category, pattern on the event name, what it catches); the first match wins.
CATEGORIES = (
    ("cuda_graph", r"cudagraph|cugraphlaunch",
     "a whole CUDA graph (an XLA command buffer) as one event: its kernels are not split"),
    ("collective", r"nccl|all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute",
     "NCCL kernels and XLA collective ops"),
    ("memcpy", r"^memcpy|^memset", "CUPTI's copies and sets (MemcpyH2D/D2H/D2D/P2P/Other, Memset)"),
    ("attention", r"sdpa|fmha|flash|attention|^mha_",
     "fused attention kernels (cuDNN's sdpa/flash kernels, fmha, the Pallas kernels mha_*); XLA attention "
     "shows as matmul + elementwise"),
    ("attention", r"cudnn", "any other cuDNN kernel (this project calls cuDNN for attention only; "
     "e.g. cudnn::fusion::compute_dot_do_o_specialized, which the matmul rule would take for a dot)"),
    ("matmul", r"gemm|gemv|nvjet|xmma|cutlass|cublas|splitk|matmul|(^|[_.-])dot([_.-]|$)|^ynn_fusion",
     "cuBLAS/cuBLASLt (gemm, nvjet, sm90_xmma), CUTLASS, XLA's Triton gemm fusions (gemm_fusion_dot), "
     "dot ops; on CPU XLA's YNNPACK fusions (ynn_fusion: 39 of 46 held one dot in the tiny CPU step)"),
    ("elementwise", r"fusion|cub::|^(loop|input|wrapped|triton|copy|transpose|reduce|convert|concatenate|slice|"
     r"dynamic|scatter|gather|select|broadcast|pad|iota|bitcast|compare|add|subtract|multiply|divide|"
     r"negate|exp|log|rsqrt|sqrt|tanh|maximum|minimum|rng|xor|and|or|shift|sort)",
     "XLA's generated kernels and ops: fusions (loop_*, input_*, *_fusion), reductions, copies, converts "
     "(layer norms, softmax, GELU, the loss, the optimizer), CUB's sorts and reductions"),
    ("other", r"", "anything else"),
)
# Checked first, on the HLO op a kernel ran for (its 'hlo_op' arg, where XLA set it): what an
# attention call launches besides its kernels (cuDNN's workspace memset: 0.37 ms of each gpt2 b16
# backward call on an H200, benchmarks/results/explore_h200_20261204.md) counts as attention.
HLO_OP_RULES = (
    ("attention", r"dot_product_attention|^mha", "every kernel, copy and memset of an attention call"),
)
_COMPILED = tuple((cat, re.compile(pat, re.IGNORECASE)) for cat, pat, _ in CATEGORIES)
_HLO_OP_COMPILED = tuple((cat, re.compile(pat, re.IGNORECASE)) for cat, pat, _ in HLO_OP_RULES)
CATEGORY_ORDER = ("matmul", "attention", "elementwise", "memcpy", "collective", "cuda_graph", "other")
GPU_PROCESS_PREFIX, STREAM_PREFIX, CPU_OP_ARG = "/device:GPU:", "Stream #", "hlo_op"


def classify(name: str, hlo_op: str = "") -> str:
  """The category of an event: by its HLO op (HLO_OP_RULES) where one matches, else by its name
  (CATEGORIES; a leading 'void ' of a demangled kernel name is ignored)."""
  for cat, pattern in _HLO_OP_COMPILED:
    if hlo_op and pattern.search(hlo_op):
      return cat
  name = name[5:] if name.startswith("void ") else name
  return next(cat for cat, pattern in _COMPILED if pattern.search(name))


def short_name(name: str, width: int = 64) -> str:
  """A kernel name for a table cell: no 'void ', no parameter list, template arguments elided,
  at most `width` characters."""
  text = name[5:] if name.startswith("void ") else name
  out, depth = [], 0
  for ch in text:
    if ch == "<":
      depth += 1
      if depth == 1:
        out.append("<…>")
    elif ch == ">" and depth:
      depth -= 1
    elif depth == 0:
      out.append(ch)
  text = "".join(out)
  text = re.sub(r"(?<=\S)\(.*\)$", "", text).strip() or name
  return text if len(text) <= width else text[:width - 1] + "…"


def find_trace(trace_dir: str) -> str:
  """The trace JSON jax.profiler.trace wrote under trace_dir (the newest session's)."""
  sessions = sorted(glob.glob(os.path.join(trace_dir, "plugins", "profile", "*")), key=os.path.getmtime)
  for session in reversed(sessions):
    for pattern in ("perfetto_trace.json.gz", "*.trace.json.gz"):
      found = sorted(glob.glob(os.path.join(session, pattern)))
      if found:
        return found[0]
  raise UserError(f"{trace_dir}: no perfetto_trace.json.gz or *.trace.json.gz under plugins/profile/*/ "
                  "(was the trace written by jax.profiler.trace?)")


def load(path: str) -> dict:
  """The trace JSON (gzipped or plain); a one-line UserError naming the file when it is not one."""
  try:
    with open(path, "rb") as f:
      head = f.read(2)
    opener = gzip.open if head == b"\x1f\x8b" else open
    with opener(path, "rt", encoding="utf-8") as f:
      trace = json.load(f)
  except (OSError, ValueError, EOFError) as e:
    raise UserError(f"{path}: not a readable trace JSON ({type(e).__name__}); pass the "
                    "perfetto_trace.json.gz or *.trace.json.gz that jax.profiler.trace wrote") from e
  events = trace.get("traceEvents") if isinstance(trace, dict) else trace
  if not isinstance(events, list):
    raise UserError(f"{path}: no 'traceEvents' list; pass a Chrome/Perfetto JSON trace from jax.profiler.trace")
  return {"traceEvents": [e for e in events if isinstance(e, dict) and e]}


def _names(events: list) -> tuple[dict, dict]:
  processes, threads = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      processes[e.get("pid")] = str((e.get("args") or {}).get("name", ""))
    elif e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e.get("pid"), e.get("tid"))] = str((e.get("args") or {}).get("name", ""))
  return processes, threads


def _interval(e: dict) -> tuple[float, float]:
  start = float(e["ts"])
  return start, start + float(e.get("dur", 0.0))


def _leaves(events: list) -> list:
  """The events that contain no other event of the same (pid, tid)."""
  by_thread, containers = {}, set()
  for i, e in enumerate(events):
    by_thread.setdefault((e.get("pid"), e.get("tid")), []).append(i)
  for indices in by_thread.values():
    indices.sort(key=lambda i: (_interval(events[i])[0], -_interval(events[i])[1]))
    open_ = []  # indices whose interval may still contain the next event
    for i in indices:
      start, end = _interval(events[i])
      while open_ and _interval(events[open_[-1]])[1] <= start:  # ended before this one began
        open_.pop()
      if open_ and _interval(events[open_[-1]])[1] >= end:
        containers.add(open_[-1])
      open_.append(i)
  return [e for i, e in enumerate(events) if i not in containers]


def device_events(trace: dict) -> dict:
  """{'kind': 'gpu' | 'cpu', 'device', 'threads', 'other_devices', 'events'} (see the docstring)."""
  events = trace["traceEvents"]
  processes, threads = _names(events)
  complete = [e for e in events if e.get("ph") == "X" and "ts" in e]
  gpus = sorted((name, pid) for pid, name in processes.items() if name.startswith(GPU_PROCESS_PREFIX))
  if gpus:
    device, pid = gpus[0]
    streams = {key: name for key, name in threads.items() if key[0] == pid and name.startswith(STREAM_PREFIX)}
    if not streams:
      found = sorted(name for key, name in threads.items() if key[0] == pid)
      raise UserError(f"{device}: no thread named '{STREAM_PREFIX}...' (threads: {found}); this reducer reads "
                      "CUPTI's stream lines as XLA writes them")
    chosen = [e for e in complete if (e.get("pid"), e.get("tid")) in streams]
    return {"kind": "gpu", "device": device, "threads": sorted(streams.values()),
            "other_devices": [name for name, _ in gpus[1:]], "events": _leaves(chosen)}
  chosen = [e for e in complete if CPU_OP_ARG in (e.get("args") or {})]
  if not chosen:
    raise UserError(f"no device work in the trace: no '{GPU_PROCESS_PREFIX}<n>' process and no event with an "
                    f"'{CPU_OP_ARG}' arg (processes: {sorted(processes.values())}); this reducer reads GPU and CPU "
                    "traces of XLA programs")
  used = sorted({threads.get((e.get("pid"), e.get("tid")), str(e.get("tid"))) for e in chosen})
  device = ", ".join(sorted({processes.get(e.get("pid"), str(e.get("pid"))) for e in chosen})) or "none"
  return {"kind": "cpu", "device": device, "threads": used, "other_devices": [], "events": _leaves(chosen)}


def step_windows(trace: dict, step_name: str = "") -> list:
  """[(step_num, start_us, end_us)] of the events with a 'step_num' arg (named step_name if given)."""
  steps = [e for e in trace["traceEvents"] if e.get("ph") == "X" and "ts" in e and "step_num" in (e.get("args") or {})
           and (not step_name or e.get("name") == step_name)]
  return sorted(((str(e["args"]["step_num"]),) + _interval(e) for e in steps), key=lambda w: w[1])


def union_length(intervals) -> float:
  total, cur_start, cur_end = 0.0, None, None
  for start, end in sorted(intervals):
    if cur_end is None or start > cur_end:
      total += 0.0 if cur_end is None else cur_end - cur_start
      cur_start, cur_end = start, end
    else:
      cur_end = max(cur_end, end)
  return total + (0.0 if cur_end is None else cur_end - cur_start)


def reduce_trace(trace: dict, top: int = 15, step_name: str = "", source: str = "trace", expect: str = "") -> dict:
  """The reduction of one trace (every time in ms); see the module docstring for each field.
  expect: 'gpu' or 'cpu' when the capture's platform is known (a GPU run whose trace has no GPU
  process, e.g. CUPTI not recording, is an error rather than a CPU table)."""
  found = device_events(trace)
  if expect == "gpu" and found["kind"] != "gpu":
    raise UserError(f"{source}: the run was on a GPU but the trace has no '{GPU_PROCESS_PREFIX}<n>' process: CUPTI "
                    "recorded nothing (another profiler attached, or profiling not permitted for this user?)")
  if expect == "cpu" and found["kind"] != "cpu":
    raise UserError(f"{source}: the run was on the CPU but the trace has a GPU process ({found['device']})")
  windows = step_windows(trace, step_name)
  if not windows:
    named = f" named {step_name!r}" if step_name else ""
    raise UserError(f"{source}: no step windows (events{named} with a 'step_num' arg); capture each step inside "
                    "jax.profiler.StepTraceAnnotation(name, step_num=i), or pass the name it used")
  steps, kernels, inside = [], {}, set()
  for step_num, w0, w1 in windows:
    cats = {c: {"calls": 0, "ms": 0.0} for c in CATEGORY_ORDER}
    clipped = []
    for e in found["events"]:
      start, end = _interval(e)
      lo, hi = max(start, w0), min(end, w1)
      if hi < lo or (hi == lo and not w0 <= start <= w1):
        continue
      inside.add(id(e))
      name, ms = str(e.get("name", "")), (hi - lo) / 1e3
      cat = classify(name, str((e.get("args") or {}).get(CPU_OP_ARG, "")))
      cats[cat]["calls"] += 1
      cats[cat]["ms"] += ms
      row = kernels.setdefault(name, {"name": name, "category": cat, "calls": 0, "total_ms": 0.0})
      row["calls"] += 1
      row["total_ms"] += ms
      op = (e.get("args") or {}).get(CPU_OP_ARG)  # on a GPU: the HLO op the kernel ran for, where XLA set it
      if op:
        ops = row.setdefault("hlo_ops", {})
        ops[op] = ops.get(op, 0) + 1
      clipped.append((lo, hi))
    summed, busy = sum(c["ms"] for c in cats.values()), union_length(clipped) / 1e3
    wall = (w1 - w0) / 1e3
    steps.append({"step_num": step_num, "wall_ms": wall, "busy_ms": busy, "summed_ms": summed,
                  "overlap_ms": summed - busy, "idle_ms": wall - busy, "categories": cats})
  n = len(steps)
  all_ms = sum(k["total_ms"] for k in kernels.values())
  ranked = sorted(kernels.values(), key=lambda k: (-k["total_ms"], k["name"]))
  for k in ranked:
    k["ms_per_step"], k["share"] = k["total_ms"] / n, (k["total_ms"] / all_ms if all_ms else 0.0)
    k["short_name"] = short_name(k["name"])
    k["hlo_ops"] = sorted(k.get("hlo_ops", {}).items(), key=lambda kv: (-kv[1], kv[0]))[:3]  # the 3 most frequent
  mean = {key: sum(s[key] for s in steps) / n for key in ("wall_ms", "busy_ms", "summed_ms", "overlap_ms", "idle_ms")}
  mean["categories"] = {c: {"calls": sum(s["categories"][c]["calls"] for s in steps) / n,
                            "ms": sum(s["categories"][c]["ms"] for s in steps) / n} for c in CATEGORY_ORDER}
  outside = [e for e in found["events"] if id(e) not in inside]
  return {"trace_kind": found["kind"], "device": found["device"], "threads": found["threads"],
          "other_devices": found["other_devices"], "steps": steps, "mean": mean, "distinct_kernels": len(ranked),
          "top": ranked[:top], "device_events": len(found["events"]),
          "outside_steps": {"events": len(outside), "ms": sum(_interval(e)[1] - _interval(e)[0] for e in outside) / 1e3}}


def _cell(text) -> str:
  return " ".join(str(text).split()).replace("|", "/")


def to_markdown(r: dict, title: str = "") -> str:
  """The two tables (per-step split, top kernels) with a header line; r is reduce_trace's result."""
  m, n = r["mean"], len(r["steps"])
  work = "kernels" if r["trace_kind"] == "gpu" else "XLA:CPU ops (a CPU trace: says nothing about a GPU)"
  walls = ", ".join(f"{s['wall_ms']:.3f}" for s in r["steps"])
  lines = [f"**{_cell(title or 'Profile')}**: {r['trace_kind'].upper()} trace of {_cell(r['device'])}, {n} steps "
           f"(wall ms {walls}), {work}: {r['device_events']} events, {r['distinct_kernels']} names in the steps"
           + (f"; {r['outside_steps']['events']} outside the steps ({r['outside_steps']['ms']:.3f} ms)"
              if r["outside_steps"]["events"] else ""), "",
           "| per step (mean) | calls | ms | % of step |", "|---|---|---|---|"]
  wall = m["wall_ms"] or float("nan")
  for cat in CATEGORY_ORDER:
    c = m["categories"][cat]
    if c["calls"]:
      lines.append(f"| {cat} | {c['calls']:g} | {c['ms']:.3f} | {100 * c['ms'] / wall:.1f}% |")
  lines += [f"| overlap (running at once, counted twice above) | | -{m['overlap_ms']:.3f} | "
            f"-{100 * m['overlap_ms'] / wall:.1f}% |",
            f"| idle (nothing running) | | {m['idle_ms']:.3f} | {100 * m['idle_ms'] / wall:.1f}% |",
            f"| step wall | | {m['wall_ms']:.3f} | 100.0% |", ""]
  if m["categories"]["cuda_graph"]["calls"]:
    lines += ["cuda_graph: whole CUDA graphs (XLA command buffers), each recorded as one event; the kernels "
              "inside them are not split into the other categories.", ""]
  lines += [f"| top {len(r['top'])} by time | category | calls | total ms | ms/step | share |", "|---|---|---|---|---|---|"]
  lines += [f"| `{_cell(k['short_name'])}` | {k['category']} | {k['calls']} | {k['total_ms']:.3f} | "
            f"{k['ms_per_step']:.3f} | {100 * k['share']:.1f}% |" for k in r["top"]]
  return "\n".join(lines) + "\n"
