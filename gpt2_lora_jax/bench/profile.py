"""Where the time goes: a few steps of one benchmark setting under jax.profiler, reduced to a table.

    python -m gpt2_lora_jax.bench.profile --preset=gpt2 --setting=user --batch_size=16 --seq_len=1024 \\
        --segments=hh --steps=3 --out_dir=DIR [--top=15] [--keep_trace] [--no_command_buffer]
    python -m gpt2_lora_jax.bench.profile --reduce=TRACE.json.gz [--top=15] [--out_dir=DIR]

Capture: the step the benchmark times (run_setup.train_setup for the harness.BenchConfig the flags
describe; every flag of `python -m gpt2_lora_jax.bench` is accepted), lowered and compiled,
max(`warmup_steps`, 1) untimed steps, then --steps steps inside `jax.profiler.trace(tmp,
create_perfetto_trace=True)`, each inside `jax.profiler.StepTraceAnnotation('profile_step',
step_num=i)` and ended by block_until_ready, so each step's window is in the trace.

Reduce: trace_reduce.py (standard library only; its docstring says how device work, steps and
categories are recognised). --reduce reduces a trace file brought back from elsewhere.

Output: the Markdown tables on stdout; with --out_dir, profile_<run>.json (the whole reduction and
how it ran) and profile_<run>.md; one record of kind 'profile' through records.emit (the GPU
check's summary shows its tables). --keep_trace copies the trace JSON (already gzipped, one file)
to DIR/profile_<run>.trace.json.gz when it is at most 16 MB; a larger one is skipped with a note.
Nothing else of the capture is kept (the temporary trace folder is removed).

Command buffers (XLA's CUDA graphs), recorded in `command_buffers`. XLA runs a command buffer's
thunks one by one while a profiler session is active unless
--xla_enable_command_buffers_during_profiling=true (its default is false; CommandBufferThunk in
XLA's sources), so by default the profiled step launches kernels one by one even where the
benchmarked step replays CUDA graphs. --no_command_buffer sets --xla_gpu_enable_command_buffer=
(no command buffers at all, as the GPU check's flag_no_command_buffer stage runs);
--profile_command_buffers sets --xla_enable_command_buffers_during_profiling=true (command buffers
run as in the benchmark; a graph recorded as one event is reported as category cuda_graph). Both
are set in XLA_FLAGS before jax is imported; `command_buffers` describes the XLA_FLAGS the run had
(a flag already there counts too).
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import traceback

from gpt2_lora_jax.bench import records, trace_reduce
from gpt2_lora_jax.errors import UserError, describe_exception

STEP_NAME = "profile_step"
MAX_TRACE_BYTES = 16_000_000
COMMAND_BUFFERS = {  # mode -> (XLA flag, what it means)
    "default": ("", "XLA default: command buffers are bypassed while the profiler runs, kernels launch one by one"),
    "off": ("--xla_gpu_enable_command_buffer=", "off (--xla_gpu_enable_command_buffer=)"),
    "profiled": ("--xla_enable_command_buffers_during_profiling=true",
                 "kept while profiling (--xla_enable_command_buffers_during_profiling=true)"),
}


def parse_args(argv=None) -> tuple[argparse.Namespace, list]:
  """This tool's flags, and the rest (the benchmark's flags, for harness.parse_args)."""
  parser = argparse.ArgumentParser(
      prog="python -m gpt2_lora_jax.bench.profile", description=__doc__.split("\n")[0], allow_abbrev=False,
      epilog="Every flag of `python -m gpt2_lora_jax.bench` (harness.BenchConfig: --preset, --setting, "
             "--batch_size, --seq_len, --segments, --warmup_steps, ...) is accepted too.")
  parser.add_argument("--steps", type=int, default=3, help="steps captured (default: 3)")
  parser.add_argument("--top", type=int, default=15, help="kernels in the top table (default: 15)")
  parser.add_argument("--out_dir", default="", help="where profile_<run>.json/.md (and the trace) go; '' = print only")
  parser.add_argument("--keep_trace", action="store_true", help="copy the trace JSON (<= 16 MB) to --out_dir")
  parser.add_argument("--no_command_buffer", action="store_true", help="XLA_FLAGS += --xla_gpu_enable_command_buffer=")
  parser.add_argument("--profile_command_buffers", action="store_true",
                      help="XLA_FLAGS += --xla_enable_command_buffers_during_profiling=true")
  parser.add_argument("--reduce", default="", help="reduce this trace file only (no capture, no jax)")
  parser.add_argument("--step_name", default="", help=f"step events' name (default: {STEP_NAME!r} when capturing, "
                      "any event with a step_num arg with --reduce)")
  args, rest = parser.parse_known_args(argv)
  if args.steps < 1 or args.top < 1:
    parser.error(f"--steps={args.steps} --top={args.top}: both must be at least 1")
  if args.keep_trace and not args.out_dir:
    parser.error("--keep_trace needs --out_dir (where the trace is copied)")
  if args.no_command_buffer and args.profile_command_buffers:
    parser.error("--no_command_buffer and --profile_command_buffers exclude each other: choose one")
  if args.reduce and rest:
    parser.error(f"--reduce takes no benchmark flags (got {' '.join(rest)}): it only reads the trace")
  return args, rest


def command_buffer_mode(args) -> str:
  return "off" if args.no_command_buffer else "profiled" if args.profile_command_buffers else "default"


def effective_mode(xla_flags: str) -> str:
  """The command-buffer mode an XLA_FLAGS string sets ('off' wins: no command buffers to keep)."""
  flags = xla_flags.split()
  return next((mode for mode in ("off", "profiled") if COMMAND_BUFFERS[mode][0] in flags), "default")


def set_xla_flag(mode: str) -> str:
  """Appends the mode's flag to XLA_FLAGS (call before jax is imported); returns XLA_FLAGS."""
  flag = COMMAND_BUFFERS[mode][0]
  if flag and flag not in os.environ.get("XLA_FLAGS", "").split():
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
  return os.environ.get("XLA_FLAGS", "")


def capture(cfg, steps: int, trace_dir: str, step_name: str = STEP_NAME) -> dict:
  """Runs cfg's train step under the profiler (module docstring); the trace path and host timings."""
  import jax
  from gpt2_lora_jax.bench import run_setup
  run = run_setup.train_setup(cfg)
  state, frozen, batch = run.state, run.frozen, run.batch
  compiled, _, compile_s, remat_fields = run_setup.compiled_step(run, cfg)
  warmup = max(cfg.warmup_steps, 1)  # a first run does one-time work (a 47 ms dot on the CPU smoke shape)
  for _ in range(warmup):
    state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready((state, metrics))
  host_s = []
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for i in range(steps):
      t0 = time.perf_counter()
      with jax.profiler.StepTraceAnnotation(step_name, step_num=i):
        state, metrics = compiled(state, frozen, batch)
        jax.block_until_ready((state, metrics))
      host_s.append(time.perf_counter() - t0)
  return {"trace_path": trace_reduce.find_trace(trace_dir), "compile_s": compile_s, "warmup_steps": warmup,
          "host_step_ms": [s * 1e3 for s in host_s], "final_loss": float(metrics["loss"]),
          "setting": {**run_setup.setting_fields(cfg), **remat_fields}}


def keep_trace(path: str, out_dir: str, stem: str) -> dict:
  """Copies the trace to out_dir/<stem>.trace.json.gz if at most MAX_TRACE_BYTES; what happened."""
  size = os.path.getsize(path)
  if size > MAX_TRACE_BYTES:
    return {"trace_bytes": size, "trace_file": None,
            "trace_note": f"trace {size / 1e6:.1f} MB > {MAX_TRACE_BYTES / 1e6:.0f} MB: not kept"}
  dest = os.path.join(out_dir, f"{stem}.trace.json.gz")
  if path.endswith(".gz"):
    shutil.copyfile(path, dest)
  else:  # a plain JSON trace given to --reduce: gzip it
    import gzip
    with open(path, "rb") as src, gzip.open(dest, "wb") as dst:
      shutil.copyfileobj(src, dst)
  size = os.path.getsize(dest)
  return {"trace_bytes": size, "trace_file": dest, "trace_note": f"kept: {dest} ({size / 1e6:.2f} MB)"}


def _stem(text: str) -> str:
  return "profile_" + re.sub(r"[^A-Za-z0-9.-]+", "_", text).strip("_")


def write_outputs(result: dict, markdown: str, out_dir: str, stem: str) -> dict:
  os.makedirs(out_dir, exist_ok=True)
  paths = {"json": os.path.join(out_dir, f"{stem}.json"), "markdown": os.path.join(out_dir, f"{stem}.md")}
  with open(paths["json"], "w") as f:
    json.dump(result, f, indent=1, default=str)
  with open(paths["markdown"], "w") as f:
    f.write(markdown)
  return paths


def main(argv=None) -> int:
  args, rest = parse_args(argv)
  mode = command_buffer_mode(args)
  result = {"command_buffers": "unknown (reduced from a file)", "xla_flags": "", "steps_requested": args.steps}
  if not args.reduce:
    result["xla_flags"] = set_xla_flag(mode)
    mode = effective_mode(result["xla_flags"])
    result["command_buffers"] = COMMAND_BUFFERS[mode][1]
  trace_dir = ""
  try:
    if args.reduce:
      trace_path, name = args.reduce, os.path.basename(args.reduce)
      title, stem = f"Profile of {name}", _stem(name.split(".")[0].removeprefix("profile_"))
      result["source"] = trace_path
    else:
      from gpt2_lora_jax.bench import harness  # imports jax: after XLA_FLAGS is set
      try:
        cfg = harness.parse_args(rest)
      except ValueError as e:  # BenchConfig's checks name the flag and its choices
        raise UserError(f"benchmark flags: {e}") from e
      if cfg.stall_dump_s > 0:
        faulthandler.dump_traceback_later(cfg.stall_dump_s, repeat=True)
      trace_dir = tempfile.mkdtemp(prefix="gpt2_lora_jax_profile_")
      result.update(capture(cfg, args.steps, trace_dir, args.step_name or STEP_NAME))
      result["device_info"] = harness.device_info()
      trace_path = result.pop("trace_path")
      s = result["setting"]
      title = (f"{s['model']} b{s['batch_size']} x {s['seq_len']}, {s['setting']} setting, "
               f"command buffers {COMMAND_BUFFERS[mode][1].split(':')[0]}")
      stem = _stem(f"{s['model']}_{s['setting']}_b{s['batch_size']}_{mode}")
      result["host_step_ms_median"] = statistics.median(result["host_step_ms"])
    result["title"] = title
    if args.keep_trace:
      os.makedirs(args.out_dir, exist_ok=True)
      result.update(keep_trace(trace_path, args.out_dir, stem))  # before reducing: kept even if that fails
      print(result["trace_note"], file=sys.stderr, flush=True)
    platform = result.get("device_info", {}).get("platform", "")
    expect = platform and ("cpu" if platform == "cpu" else "gpu")  # '' for --reduce: any kind
    step_name = args.step_name if args.reduce else args.step_name or STEP_NAME
    reduced = trace_reduce.reduce_trace(trace_reduce.load(trace_path), top=args.top, step_name=step_name,
                                        source=trace_path, expect=expect)
  except UserError as e:  # bad input: one line, no traceback
    result["error"] = describe_exception(e)
    records.emit("profile", **result)
    print(f"error: {e}", file=sys.stderr)
    return 1
  except Exception as e:  # a bug (ours, or a trace format not met before): recorded, traceback on stderr
    result["error"] = describe_exception(e)
    records.emit("profile", **result)
    traceback.print_exc()
    return 1
  finally:
    if trace_dir:
      shutil.rmtree(trace_dir, ignore_errors=True)
  result.update(reduced)
  markdown = trace_reduce.to_markdown(reduced, result["title"])
  result["markdown"] = markdown
  if args.out_dir:
    result["files"] = write_outputs(result, markdown, args.out_dir, stem)
  records.emit("profile", **result)
  print(markdown, flush=True)
  if "files" in result:
    print(f"wrote {result['files']['json']} and {result['files']['markdown']}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
