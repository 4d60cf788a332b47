"""The GPU check's record log: one JSON object per line, appended the moment a number exists.

Every measuring process of benchmarks/gpu_check.sh (the preflight, the XLA attention A/B, the
benchmark and each of its PyTorch children's parents) calls `emit(kind, ...)`; the line is written,
flushed and fsynced before the process goes on, so a stage that crashes or hangs later loses
nothing it had measured. summary.py folds the log into the run's summary. Standard library
only (no jax, torch, ml_collections or datasets): importable anywhere.

Environment (set by gpu_check.sh per stage; without GPU_CHECK_RECORDS nothing is written):
  GPU_CHECK_RECORDS      the JSONL file to append to
  GPU_CHECK_STAGE        the stage name stored in every record
  GPU_CHECK_KILL_AFTER   'STAGE:N[,STAGE:N]': the process of stage STAGE kills itself with SIGKILL
                         right after its N-th record, as a hard crash would (the CPU smoke test's
                         fault injection)
"""
from __future__ import annotations

import datetime
import faulthandler
import json
import os
import signal
import threading

RECORDS_ENV, STAGE_ENV, KILL_ENV = "GPU_CHECK_RECORDS", "GPU_CHECK_STAGE", "GPU_CHECK_KILL_AFTER"
_written = {"count": 0}
_lock = threading.Lock()


def add_case_flags(parser, cases: tuple, case_timeout_s: float):
  """--cases, --case_timeout_s and --stall_dump_s, as every staged command takes them."""
  parser.add_argument("--cases", default=",".join(cases), help=f"comma-separated, in order, from {cases}")
  parser.add_argument("--case_timeout_s", type=float, default=case_timeout_s,
                      help="a case still running then is abandoned")
  parser.add_argument("--stall_dump_s", type=float, default=30.0, help="seconds between stack dumps (stderr)")


def chosen_cases(parser, args, cases: tuple) -> list:
  """The --cases asked for, in order (an unknown name is a usage error); starts the stack dumps."""
  chosen = [c.strip() for c in args.cases.split(",") if c.strip()]
  unknown = sorted(set(chosen) - set(cases))
  if unknown:
    parser.error(f"--cases: unknown {unknown}; choose from {cases}")
  faulthandler.dump_traceback_later(args.stall_dump_s, repeat=True)
  return chosen


def stage() -> str:
  return os.environ.get(STAGE_ENV, "")


def error_text(e: BaseException) -> str:
  """'Type: message' for any exception, an empty message included (never indexes lines)."""
  message = " ".join(str(e).split())
  return f"{type(e).__name__}: {message[:500]}" if message else type(e).__name__


def emit(kind: str, **fields) -> dict:
  """Appends {'stage', 'kind', 'utc', **fields} to $GPU_CHECK_RECORDS (if set); returns the record."""
  record = {"stage": stage(), "kind": kind,
            "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **fields}
  path = os.environ.get(RECORDS_ENV)
  if not path:
    return record
  line = json.dumps(record, default=str) + "\n"
  with _lock:
    with open(path, "a") as f:
      f.write(line)
      f.flush()
      os.fsync(f.fileno())
    _written["count"] += 1
    for kill in os.environ.get(KILL_ENV, "").split(","):
      kill_stage, _, count = kill.strip().rpartition(":")
      if kill_stage and kill_stage == stage() and count.isdigit() and _written["count"] == int(count):
        os.kill(os.getpid(), signal.SIGKILL)
  return record


def read(path: str) -> tuple[list, int]:
  """(records, lines that are not a JSON object): a line cut short by a kill is counted, not kept."""
  records, bad = [], 0
  if not os.path.exists(path):
    return records, bad
  with open(path) as f:
    for line in f:
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        bad += 1
        continue
      if isinstance(record, dict):
        records.append(record)
      else:
        bad += 1
  return records, bad


class CaseTimeout(Exception):
  """A case's phase still ran at its deadline (its thread is left behind; see run_phases)."""


def call_with_deadline(fn, seconds: float):
  """fn() on a daemon thread: its value, its exception, or CaseTimeout after `seconds`.

  A compile or kernel that never returns cannot be interrupted in-process; the caller gives up on
  it and goes on to the next case, and should end the process with os._exit (any_timed_out)."""
  box = {}

  def target():
    try:
      box["value"] = fn()
    except BaseException as e:  # handed to the caller's thread
      box["error"] = e

  thread = threading.Thread(target=target, daemon=True)
  thread.start()
  thread.join(max(seconds, 0.0))
  if thread.is_alive():
    _timed_out["any"] = True
    raise CaseTimeout(f"still running after {seconds:.0f} s")
  if "error" in box:
    raise box["error"]
  return box["value"]


_timed_out = {"any": False}


def any_timed_out() -> bool:
  return _timed_out["any"]


def run_phases(kind: str, case: str, phases, deadline_s: float, **meta) -> dict:
  """Runs a case's phases in order, each `fn(previous value) -> (value, info dict)`, timed.

  After each phase it prints `case: phase N.NNs info` (flushed) and emits a record
  {kind, case, phase, seconds, **meta, **info}; an exception emits phase 'error' (with the phase it
  happened in and error_text), a phase past the case's deadline emits phase 'timeout'; either ends
  the case and the caller goes on. Returns {phase: seconds, ..., 'status': 'ok' | error text}."""
  import time
  out, value, start = {}, None, time.perf_counter()
  for name, fn in phases:
    t0 = time.perf_counter()
    try:
      value, info = call_with_deadline(lambda fn=fn, value=value: fn(value), deadline_s - (t0 - start))
    except CaseTimeout as e:
      emit(kind, case=case, phase="timeout", in_phase=name, seconds=time.perf_counter() - t0,
           error=str(e), **meta)
      print(f"{case}: TIMEOUT in {name}: {e}", flush=True)
      out["status"] = f"timeout in {name}"
      return out
    except Exception as e:  # recorded; the next case runs
      text = error_text(e)
      emit(kind, case=case, phase="error", in_phase=name, seconds=time.perf_counter() - t0, error=text, **meta)
      print(f"{case}: ERROR in {name}: {text}", flush=True)
      out["status"] = f"error in {name}: {text}"
      return out
    seconds = time.perf_counter() - t0
    out[name] = seconds
    emit(kind, case=case, phase=name, seconds=seconds, **meta, **info)
    extra = " ".join(f"{k}={v}" for k, v in info.items())
    print(f"{case}: {name} {seconds:.2f}s {extra}".rstrip(), flush=True)
  out["status"] = "ok"
  return out
