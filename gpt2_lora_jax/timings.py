"""What a user waits for: wall seconds from process start to the end of each phase of a run.

Library code marks where a phase ends (`mark('data')`); each mark is one log line and one entry of
the process's timeline, which train.run and evaluate.run write to <workdir>/timings.json:

  {"pid", "process_start_utc", "start_source": 'proc' (Linux's start time of this process) or
   'import' (when this module was imported, elsewhere),
   "phases": [{"phase", "end_s": seconds from process start, "seconds": since the previous mark}],
   "to_first_step_s": end_s of the first 'first_step', "total_s": end_s of the last phase,
   "train": {"timed_steps", "step_time_s_median", "steps_per_s", "tokens_per_s", "heldout_s",
             "heldout_passes", "checkpoint_s", "plot_s"} (train.run's loop)}

Phases, in the order a train_and_eval run meets them: startup (interpreter, imports, flags, config;
up to the first library phase), weights (base loaded or randomly initialised), model (adapters,
labels, fingerprint, stacking, tokenizer), data (train and held-out rows read, tokenised, packed),
state (placed on the devices, optimizer initialised, a checkpoint restored), initial_heldout (the
untrained model's held-out loss, compile included), probes (the attention probes of the step's
path, attention.py), compile (the train step traced, lowered, compiled), first_step (its metrics
on the host), training (every later step, held-out pass, checkpoint and plot); then evaluation's
own weights, model, restore, heldout, sampling, score_report. A process that trains twice (a
preference study, the demo's pre-training) lists every phase in order, names repeated, and "train"
holds its last training loop's.

Steady-state speed comes from StepTimer's clean laps (the wall time between consecutive metric
reads, which happen one step late anyway): no extra host sync.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import statistics
import time

_IMPORTED = time.perf_counter()
_phases: list = []
_sections: dict = {}


def _process_start() -> tuple:
  """(clock, its reading at process start, 'proc'): on Linux CLOCK_BOOTTIME and the process's start
  time from /proc (clock ticks after boot, 10 ms steps); elsewhere perf_counter at this import."""
  try:
    with open("/proc/self/stat") as f:
      ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start time, clock ticks after boot
    clock = lambda: time.clock_gettime(time.CLOCK_BOOTTIME)
    start = ticks / os.sysconf("SC_CLK_TCK")
    if 0 <= clock() - start < 86400 * 365:
      return clock, start, "proc"
  except (OSError, ValueError, IndexError, AttributeError):
    pass
  return time.perf_counter, _IMPORTED, "import"


_CLOCK, _START, START_SOURCE = _process_start()


def since_start() -> float:
  """Seconds since this process started."""
  return _CLOCK() - _START


def mark(phase: str) -> float:
  """Ends `phase` now: appends it to the timeline and logs one line. Returns its seconds."""
  end = round(since_start(), 3)
  seconds = round(end - (_phases[-1]["end_s"] if _phases else 0.0), 3)
  _phases.append({"phase": phase, "end_s": end, "seconds": seconds})
  if _is_main():
    print(f"time: {phase} {seconds:.3f} s ({end:.3f} s from process start)", flush=True)
  return seconds


def mark_startup():
  """Ends 'startup' (everything before the first library phase) unless a phase was marked already."""
  if not _phases:
    mark("startup")


def record(section: str, **values):
  """Adds values under `section` of timings.json (e.g. the training loop's speed)."""
  _sections.setdefault(section, {}).update(values)


@contextlib.contextmanager
def adding(totals: dict, key: str, count: str = ""):
  """`with adding(totals, key):` adds the block's wall seconds to totals[key] (and 1 to totals[count]):
  what the training loop spends outside its steps."""
  t0 = since_start()
  try:
    yield
  finally:
    totals[key] = totals.get(key, 0.0) + since_start() - t0
    if count:
      totals[count] = totals.get(count, 0) + 1


def summary() -> dict:
  first = [p["end_s"] for p in _phases if p["phase"] == "first_step"]
  return {"pid": os.getpid(),
          "process_start_utc": datetime.datetime.fromtimestamp(
              time.time() - since_start(), datetime.timezone.utc).isoformat(timespec="milliseconds"),
          "start_source": START_SOURCE, "phases": list(_phases),
          "to_first_step_s": first[0] if first else None,
          "total_s": _phases[-1]["end_s"] if _phases else None, **_sections}


def write(workdir: str):
  """<workdir>/timings.json: the timeline so far (process 0 only; a bucket workdir works too)."""
  if _is_main():
    from gpt2_lora_jax import metrics
    metrics.write_text(f"{workdir}/timings.json", json.dumps(summary(), indent=2))


def _is_main() -> bool:
  import jax
  return jax.process_index() == 0


@dataclasses.dataclass
class StepTimer:
  """Wall time between consecutive metric reads: the device time of a step at steady state.

  A lap that spans compilation, a held-out evaluation or a checkpoint is not a step time: after
  `interrupted()` the next lap is measured but reported as None, and not kept in `laps`.
  """
  last: float = dataclasses.field(default_factory=time.perf_counter)
  clean: bool = False  # the first lap includes compilation
  laps: list = dataclasses.field(default_factory=list)  # every clean lap, in seconds

  def lap(self):
    now = time.perf_counter()
    elapsed, self.last = now - self.last, now
    clean, self.clean = self.clean, True
    if clean:
      self.laps.append(elapsed)
    return elapsed if clean else None

  def interrupted(self):
    self.clean = False

  def speed(self, tokens_per_step: int) -> dict:
    """Steady-state speed from the median clean lap (only timed_steps 0 before any)."""
    if not self.laps:
      return {"timed_steps": 0}
    median = statistics.median(self.laps)
    return {"timed_steps": len(self.laps), "step_time_s_median": median, "steps_per_s": 1.0 / median,
            "tokens_per_s": tokens_per_step / median}
