"""bench/profile.py and bench/trace_reduce.py: the reducer against synthetic traces whose numbers
this file computes itself (integer microseconds, unions as sets of covered microseconds), and one
real CPU capture of a tiny model through the CLI, checked against an independent reading of its
own trace."""
import gzip
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from gpt2_lora_jax.bench import profile, summary as run_summary, trace_reduce
from gpt2_lora_jax.errors import UserError

GEMM = "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_cublas"
SDPA = "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64_4x1x1_cga1x1x1_kernel0_0"
CUTLASS = ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>"
           "(cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8::Params)")
# The category each synthetic kernel must get (the spec of the classification for these names).
CATEGORY = {GEMM: "matmul", CUTLASS: "matmul", SDPA: "attention", "loop_add_fusion_1": "elementwise",
            "MemcpyD2D": "memcpy", "ncclDevKernel_AllReduce_Sum_f32_RING_LL": "collective",
            "CudaGraph": "cuda_graph", "mystery_kernel": "other"}
WINDOWS = [("0", 100, 300), ("1", 400, 650)]
KERNELS = [  # (stream tid, name, start us, end us) on /device:GPU:0
    (7, GEMM, 110, 150), (7, "loop_add_fusion_1", 150, 160), (7, SDPA, 170, 220),
    (13, "MemcpyD2D", 140, 165), (13, "ncclDevKernel_AllReduce_Sum_f32_RING_LL", 230, 240), (13, CUTLASS, 250, 270),
    (7, GEMM, 410, 470), (7, "loop_add_fusion_1", 480, 490), (7, "mystery_kernel", 500, 506),
    (13, "CudaGraph", 450, 520), (7, SDPA, 640, 660),  # past the step's end: counts 640-650
    (7, "loop_add_fusion_1", 700, 720),  # in no step
]


def _x(pid, tid, name, start, end, **args):
  return {"ph": "X", "pid": pid, "tid": tid, "ts": start, "dur": end - start, "name": name,
          **({"args": {k: str(v) for k, v in args.items()}} if args else {})}


def _meta(pid, name, tid=None):
  if tid is None:
    return {"ph": "M", "pid": pid, "name": "process_name", "args": {"name": name}}
  return {"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": name}}


def gpu_trace() -> dict:
  events = [_meta(701, "/host:CPU"), _meta(701, "python", 1), _meta(1, "/device:GPU:0"),
            _meta(1, "Stream #7(Compute)", 7), _meta(1, "Stream #13(Compute,MemcpyD2D)", 13),
            _meta(1, "CUPTI overhead", 99), _meta(2, "/device:GPU:1"), _meta(2, "Stream #7(Compute)", 7)]
  events += [_x(701, 1, "profile_step", w0, w1, step_num=n) for n, w0, w1 in WINDOWS]
  events += [_x(701, 1, "cuLaunchKernel", 105, 108, hlo_op="fusion.1"),  # host work: not device time
             _x(1, 99, "Overhead", 120, 200), _x(2, 7, GEMM, 100, 300)]  # not a stream of GPU 0
  events += [_x(1, tid, name, start, end, hlo_op="op") for tid, name, start, end in KERNELS]
  return {"displayTimeUnit": "ns", "traceEvents": events + [{}]}


def _covered(intervals) -> set:
  return set().union(*(range(a, b) for a, b in intervals)) if intervals else set()


def _rows(markdown: str) -> list:
  return [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines()
          if line.startswith("| ") and not line.startswith("| per step") and not line.startswith("| top ")]


def test_gpu_like_trace_every_number_against_a_hand_reduction():
  r = trace_reduce.reduce_trace(gpu_trace(), top=20)
  assert (r["trace_kind"], r["device"], r["other_devices"]) == ("gpu", "/device:GPU:0", ["/device:GPU:1"])
  assert r["threads"] == ["Stream #13(Compute,MemcpyD2D)", "Stream #7(Compute)"]
  expected_steps, totals, calls = [], {}, {}
  for _, w0, w1 in WINDOWS:
    clipped = [(name, max(a, w0), min(b, w1)) for _, name, a, b in KERNELS if min(b, w1) > max(a, w0)]
    cats = {}
    for name, a, b in clipped:
      cat = cats.setdefault(CATEGORY[name], [0, 0])
      cat[0], cat[1] = cat[0] + 1, cat[1] + (b - a)
      totals[name] = totals.get(name, 0) + (b - a)
      calls[name] = calls.get(name, 0) + 1
    summed, busy = sum(b - a for _, a, b in clipped), len(_covered([(a, b) for _, a, b in clipped]))
    expected_steps.append({"wall": w1 - w0, "busy": busy, "overlap": summed - busy, "idle": w1 - w0 - busy, "cats": cats})
  for step, exp in zip(r["steps"], expected_steps):
    assert step["wall_ms"] == pytest.approx(exp["wall"] / 1e3)
    assert step["busy_ms"] == pytest.approx(exp["busy"] / 1e3)
    assert step["overlap_ms"] == pytest.approx(exp["overlap"] / 1e3)
    assert step["idle_ms"] == pytest.approx(exp["idle"] / 1e3)
    got = {c: (v["calls"], pytest.approx(v["ms"])) for c, v in step["categories"].items() if v["calls"]}
    assert got == {c: (n, pytest.approx(us / 1e3)) for c, (n, us) in exp["cats"].items()}
  assert r["outside_steps"]["events"] == 1 and r["outside_steps"]["ms"] == pytest.approx(0.020)

  n, all_us = len(WINDOWS), sum(totals.values())
  mean = lambda key: sum(e[key] for e in expected_steps) / n / 1e3  # noqa: E731
  markdown = trace_reduce.to_markdown(r, "synthetic")
  assert "cuda_graph: whole CUDA graphs" in markdown
  rows = _rows(markdown)
  split = {row[0]: row[1:] for row in rows[:-len(totals)]}
  for cat in set(CATEGORY.values()):
    n_calls = sum(e["cats"].get(cat, (0, 0))[0] for e in expected_steps) / n
    ms = sum(e["cats"].get(cat, (0, 0))[1] for e in expected_steps) / n / 1e3
    assert split[cat] == [f"{n_calls:g}", f"{ms:.3f}", f"{100 * ms / mean('wall'):.1f}%"]
  overlap_row = next(v for k, v in split.items() if k.startswith("overlap"))
  assert overlap_row == ["", f"-{mean('overlap'):.3f}", f"-{100 * mean('overlap') / mean('wall'):.1f}%"]
  assert next(v for k, v in split.items() if k.startswith("idle")) == [
      "", f"{mean('idle'):.3f}", f"{100 * mean('idle') / mean('wall'):.1f}%"]
  assert split["step wall"] == ["", f"{mean('wall'):.3f}", "100.0%"]
  ranked = sorted(totals, key=lambda k: (-totals[k], k))
  top_rows = rows[-len(totals):]
  assert [row[1:] for row in top_rows] == [
      [CATEGORY[k], str(calls[k]), f"{totals[k] / 1e3:.3f}", f"{totals[k] / 1e3 / n:.3f}",
       f"{100 * totals[k] / all_us:.1f}%"] for k in ranked]
  assert [row[0] for row in top_rows] == [f"`{trace_reduce.short_name(k)}`" for k in ranked]
  assert [k["hlo_ops"] for k in r["top"]] == [[("op", calls[k])] for k in ranked]  # every synthetic kernel: hlo_op 'op'
  assert trace_reduce.short_name(CUTLASS) == "cutlass::Kernel2<…>"
  assert trace_reduce.short_name(GEMM) == GEMM[:63] + "…"


def test_cpu_trace_counts_only_innermost_ops_and_ignores_end_markers():
  events = [_meta(701, "/host:CPU"), _meta(701, "python", 1), _meta(701, "tf_XLAEigen/1", 2),
            _meta(701, "tf_XLAPjRtCpuClient/3", 3), _x(701, 1, "profile_step", 0, 120, step_num=0),
            _x(701, 2, "while.1", 10, 100, hlo_op="while.1"), _x(701, 2, "dot.2", 20, 40, hlo_op="dot.2"),
            _x(701, 2, "end: dot.2", 40, 41), _x(701, 2, "fusion.3", 50, 60, hlo_op="fusion.3"),
            _x(701, 3, "copy.4", 30, 70, hlo_op="copy.4")]
  r = trace_reduce.reduce_trace({"traceEvents": events})
  ops = [(20, 40), (50, 60), (30, 70)]  # the while loop holds dot.2 and fusion.3 on its thread
  busy, summed = len(_covered(ops)), sum(b - a for a, b in ops)
  (step,) = r["steps"]
  assert r["trace_kind"] == "cpu" and r["device"] == "/host:CPU"
  assert (step["busy_ms"], step["overlap_ms"], step["idle_ms"]) == pytest.approx(
      (busy / 1e3, (summed - busy) / 1e3, (120 - busy) / 1e3))
  assert {k["name"]: k["category"] for k in r["top"]} == {"dot.2": "matmul", "fusion.3": "elementwise",
                                                          "copy.4": "elementwise"}
  assert "CPU trace" in trace_reduce.to_markdown(r)


@pytest.mark.parametrize("name,category", [
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT", "matmul"), ("gemm_fusion_dot_12", "matmul"),
    ("void gemv2T_kernel_val<int, int, float>(float)", "matmul"), ("ynn_fusion.27", "matmul"), ("dot.5", "matmul"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_3", "attention"),
    ("triton_softmax_3", "elementwise"), ("input_reduce_fusion_2", "elementwise"), ("copy.2", "elementwise"),
    ("void cub::DeviceRadixSortOnesweepKernel<int>(int)", "elementwise"), ("MemcpyH2D", "memcpy"),
    ("Memset", "memcpy"), ("ncclDevKernel_AllGather_RING_LL", "collective"), ("CudaGraph", "cuda_graph"),
    ("call.12", "other"), ("void cudnn::fusion::compute_dot_do_o_specialized<bf16>(int)", "attention"),
    ("mha_forward", "attention")])
def test_classification_table(name, category):
  assert trace_reduce.classify(name) == category


def test_an_attention_call_s_memset_counts_as_attention():
  """The H200's trace: each cuDNN backward call's 1.69 GB workspace memset ('Memset 3', hlo_op
  dot_product_attention_bwd.N); a memset of another op stays a memset."""
  assert trace_reduce.classify("Memset 3", "dot_product_attention_bwd.70") == "attention"
  assert trace_reduce.classify("Memset 3", "loop_broadcast_fusion.3") == "memcpy"


def test_readme_lists_every_classification_rule():
  readme = (REPO / "benchmarks" / "README.md").read_text()
  for category, pattern, _ in trace_reduce.CATEGORIES + trace_reduce.HLO_OP_RULES:
    assert category in readme and (not pattern or f"{category} `{pattern}`" in readme), category


def test_bad_traces_give_one_line_errors(tmp_path):
  not_json = tmp_path / "notes.txt"
  not_json.write_text("hello")
  with pytest.raises(UserError, match="notes.txt: not a readable trace JSON"):
    trace_reduce.load(str(not_json))
  no_steps = {"traceEvents": [e for e in gpu_trace()["traceEvents"] if e.get("name") != "profile_step"]}
  with pytest.raises(UserError, match="no step windows"):
    trace_reduce.reduce_trace(no_steps, source="t.json")
  no_streams = {"traceEvents": [_meta(1, "/device:GPU:0"), _meta(1, "XLA Ops", 5)]}
  with pytest.raises(UserError, match=r"/device:GPU:0: no thread named 'Stream #\.\.\.' \(threads: \['XLA Ops'\]\)"):
    trace_reduce.device_events(no_streams)
  cpu_only = {"traceEvents": [e for e in gpu_trace()["traceEvents"] if e.get("pid") == 701]}
  with pytest.raises(UserError, match="t.json: the run was on a GPU but the trace has no '/device:GPU:<n>' process"):
    trace_reduce.reduce_trace(cpu_only, source="t.json", expect="gpu")
  with pytest.raises(UserError, match=r"the run was on the CPU but the trace has a GPU process \(/device:GPU:0\)"):
    trace_reduce.reduce_trace(gpu_trace(), expect="cpu")
  with pytest.raises(UserError, match=r"no device work in the trace: .* \(processes: \['/device:TPU:0'\]\)"):
    trace_reduce.device_events({"traceEvents": [_meta(3, "/device:TPU:0"), _x(3, 1, "fusion", 0, 5)]})
  with pytest.raises(UserError, match="no perfetto_trace.json.gz"):
    trace_reduce.find_trace(str(tmp_path))
  with pytest.raises(SystemExit):
    profile.parse_args(["--keep_trace"])  # needs --out_dir


def test_summary_shows_a_failed_profile_as_one_line(tmp_path, monkeypatch):
  from gpt2_lora_jax.bench import records
  monkeypatch.setenv(records.RECORDS_ENV, str(tmp_path / "profile.jsonl"))
  monkeypatch.setenv(records.STAGE_ENV, "profile")
  records.emit("profile", error="UserError: t.json: no step windows", trace_note="kept: t.json (0.05 MB)")
  markdown = run_summary.to_markdown(run_summary.summarize(str(tmp_path), "run", ["profile"]))
  assert "## Where the time goes (profile)\n\nFailed: UserError: t.json: no step windows (kept: t.json (0.05 MB))\n" in markdown


def test_command_buffer_flags_go_into_xla_flags_and_are_described(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
  args, rest = profile.parse_args(["--profile_command_buffers", "--preset=gpt2"])
  assert rest == ["--preset=gpt2"]
  flags = profile.set_xla_flag(profile.command_buffer_mode(args))
  assert flags == "--xla_force_host_platform_device_count=1 --xla_enable_command_buffers_during_profiling=true"
  assert os.environ["XLA_FLAGS"] == flags and profile.effective_mode(flags) == "profiled"
  assert profile.effective_mode(flags + " --xla_gpu_enable_command_buffer=") == "off"
  assert profile.effective_mode("--xla_gpu_autotune_level=0") == "default"
  with pytest.raises(SystemExit):
    profile.parse_args(["--no_command_buffer", "--profile_command_buffers"])


def test_keep_trace_skips_a_trace_over_the_limit(tmp_path, monkeypatch):
  path = tmp_path / "t.trace.json.gz"
  path.write_bytes(gzip.compress(json.dumps(gpu_trace()).encode()))
  monkeypatch.setattr(profile, "MAX_TRACE_BYTES", os.path.getsize(path) - 1)
  kept = profile.keep_trace(str(path), str(tmp_path), "profile_x")
  assert kept["trace_file"] is None and "not kept" in kept["trace_note"]
  assert not (tmp_path / "profile_x.trace.json.gz").exists()


def test_profile_module_imports_no_jax_so_xla_flags_can_be_set_first():
  code = "import sys, gpt2_lora_jax.bench.profile; bad = {'jax', 'ml_collections', 'datasets'} & set(sys.modules); assert not bad, bad"
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO,
                        env={**os.environ, "PYTHONPATH": str(REPO)})
  assert proc.returncode == 0, proc.stderr[-2000:]


def _independent_cpu_reading(trace: dict) -> list:
  """Per step (wall, summed, busy) in us from a raw CPU trace, by brute force: ops are events with
  an hlo_op arg that hold no other such event of their thread; busy is a sweep over endpoints."""
  events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
  ops = [e for e in events if "hlo_op" in e.get("args", {})]
  leaves = [a for a in ops if not any(b is not a and b["tid"] == a["tid"] and b["ts"] >= a["ts"] and
                                      b["ts"] + b["dur"] <= a["ts"] + a["dur"] for b in ops)]
  out = []
  for w in sorted((e for e in events if "step_num" in e.get("args", {})), key=lambda e: e["ts"]):
    w0, w1 = w["ts"], w["ts"] + w["dur"]
    spans = [(max(e["ts"], w0), min(e["ts"] + e["dur"], w1)) for e in leaves]
    spans = [(a, b) for a, b in spans if b > a]
    points = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans], key=lambda p: (p[0], -p[1]))
    busy, depth, since = 0.0, 0, None
    for t, step in points:
      if depth == 0 and step == 1:
        since = t
      depth += step
      if depth == 0:
        busy += t - since
    out.append((w1 - w0, sum(b - a for a, b in spans), busy))
  return out


def test_cpu_capture_end_to_end_through_the_cli_and_the_summary(tmp_path):
  out = tmp_path / "out"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
         "GPU_CHECK_RECORDS": str(tmp_path / "profile.jsonl"), "GPU_CHECK_STAGE": "profile",
         "PYTHONPATH": str(REPO)}
  cmd = [sys.executable, "-m", "gpt2_lora_jax.bench.profile", "--setting=user", "--n_layer=1", "--n_embd=32",
         "--n_head=2", "--vocab_size=256", "--seq_len=32", "--batch_size=2", "--segments=hh", "--max_segments=8",
         "--warmup_steps=1", "--steps=2", "--top=5", f"--out_dir={out}", "--keep_trace", "--no_command_buffer"]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (result_path,) = out.glob("profile_*.json")
  result = json.loads(result_path.read_text())
  assert result["trace_kind"] == "cpu" and result["device"] == "/host:CPU"
  assert result["command_buffers"].startswith("off") and "--xla_gpu_enable_command_buffer=" in result["xla_flags"].split()
  assert [s["step_num"] for s in result["steps"]] == ["0", "1"]
  (trace_path,) = out.glob("*.trace.json.gz")
  assert result["trace_file"] == str(trace_path) and result["trace_bytes"] == os.path.getsize(trace_path)
  with gzip.open(trace_path, "rt") as f:
    reference = _independent_cpu_reading(json.load(f))
  for step, (wall, summed, busy) in zip(result["steps"], reference):
    assert summed > 0 and busy > 0
    assert (step["wall_ms"], step["summed_ms"], step["busy_ms"]) == pytest.approx(
        (wall / 1e3, summed / 1e3, busy / 1e3), rel=1e-9)
  markdown = (out / result_path.name.replace(".json", ".md")).read_text()
  assert markdown == result["markdown"] and markdown in proc.stdout and "CPU trace" in markdown
  s = run_summary.summarize(str(tmp_path), "run", ["profile"])
  assert [p["stage"] for p in s["profile"]] == ["profile"]
  assert "## Where the time goes (profile)\n\n" + markdown in run_summary.to_markdown(s)
