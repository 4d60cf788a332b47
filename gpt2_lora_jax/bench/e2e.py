"""What a user waits for: the real `python -m gpt2_lora_jax.main`, end to end, timed by phase.

    python -m gpt2_lora_jax.bench.e2e --out_dir=DIR --data=ROWS.jsonl.gz [--steps=300] [--smoke]
        [--override=--config.KEY=VALUE ...] [--timeout_s=S]

Runs main (mode train_and_eval) as a child process in DIR/run, on the rows of --data (HH-RLHF rows
{"chosen": ..., "rejected": ...}, .jsonl or .jsonl.gz) for training and held-out alike (a timing
run: its held-out loss says nothing about generalisation), with a fresh JAX compilation cache in
DIR/jax_cache unless --compilation_cache_dir says otherwise (a first run's compile is measured):

  full     configs/seed_study.py's settings (gpt2-medium, LoRA r1 alpha 1 on c_attn, c_proj, c_fc and
           lm_head, loss on every token, Adam 1e-4 constant, one 1024-token row a step, bf16,
           attention 'auto', held-out loss on every row at step 0 and at the end) with a random
           init of that size (model.init='random', model.preset='gpt2-medium': nothing downloaded),
           the bundled tokenizer (model.tokenizer='offline'), --steps steps, --num_prompts prompts
           answered by the base and the fine-tuned model, no reward model (eval.reward_model='').
  --smoke  configs/tiny.py's 2-layer model (float32) on 2 rows of 128 tokens a step, 4 steps, 8
           held-out rows, 2 prompts: the same phases in tens of seconds on a CPU (tests/test_e2e.py).

The child prints one line per phase (`time: PHASE S s (E s from process start)`, timings.py); each is
echoed and recorded the moment it appears (records.emit, kind 'e2e': case (the preset or 'smoke'),
phase, seconds, end_s), so a run stopped at any point keeps the phases it finished. A phase met
twice (evaluation builds the model again) is recorded the second time as 'eval_<phase>'. At the end
one record with phase 'done' sums the run: to_first_step_s (first_step's end_s), total_s (the last
phase's end_s, the run's own clock), wall_s (this process's clock around the child), the training
loop's timed_steps / step_time_s_median / steps_per_s / tokens_per_s (steady state) and heldout_s /
heldout_passes / checkpoint_s / plot_s from DIR/run/timings.json, returncode, target_to_first_step_s
and to_first_step_met (to_first_step_s <= TARGET_TO_FIRST_STEP_S), command. A child
that fails records phase 'error' (in_phase: the last phase it finished; error: its last output
line), one still running at --timeout_s or when this process gets SIGTERM is killed and recorded
as phase 'timeout'. Exit code: the child's (124 after a timeout). Standard library only: this
process never touches the accelerator.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time

from gpt2_lora_jax.bench import records

TARGET_TO_FIRST_STEP_S = 60.0  # issue 22, item 3
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PHASE_LINE = re.compile(r"^time: (\w+) (-?[\d.]+) s \(([\d.]+) s from process start\)$")


def main_command(args, workdir: str) -> list:
  """The command line of the run: main with the mode's config file and overrides, then --override's."""
  data = os.path.abspath(args.data)
  common = ["--config.data.source=files", f"--config.data.train_files={data}",
            f"--config.data.eval_files={data}", "--config.eval.reward_model="]
  if args.smoke:
    config = os.path.join(REPO, "configs", "tiny.py")
    mode = ["--config.model.overrides.n_positions=128", "--config.data.max_length=128",
            "--config.train.batch_size=2", "--config.train.eval_every=4", "--config.data.max_eval_rows=8",
            "--config.eval.batch_size=2", f"--config.train.steps={args.steps or 4}",
            f"--config.eval.num_prompts={args.num_prompts or 2}"]
  else:
    config = os.path.join(REPO, "configs", "seed_study.py")
    mode = ["--config.model.init=random", f"--config.model.preset={args.preset}",
            "--config.model.tokenizer=offline", f"--config.train.steps={args.steps or 300}",
            f"--config.eval.num_prompts={args.num_prompts or 16}"]
  cache = args.compilation_cache_dir if args.compilation_cache_dir is not None \
      else os.path.join(args.out_dir, "jax_cache")
  return [sys.executable, "-m", "gpt2_lora_jax.main", f"--config={config}", f"--workdir={workdir}",
          "--mode=train_and_eval", f"--compilation_cache_dir={cache}", *common, *mode, *args.override]


class Phases:
  """The child's phase lines, recorded as they come; a repeated name becomes 'eval_<name>'."""

  def __init__(self, case: str):
    self.case, self.rows = case, []

  def add(self, line: str):
    m = PHASE_LINE.match(line.strip())
    if not m:
      return
    name = m.group(1) if m.group(1) not in [r["phase"] for r in self.rows] else f"eval_{m.group(1)}"
    row = {"phase": name, "seconds": float(m.group(2)), "end_s": float(m.group(3))}
    self.rows.append(row)
    records.emit("e2e", case=self.case, **row)

  @property
  def last(self) -> str:
    return self.rows[-1]["phase"] if self.rows else "start"


def run_child(command: list, phases: Phases, timeout_s: float | None) -> tuple:
  """(returncode or None after a timeout, last output line, wall seconds); the child's output is
  echoed line by line. SIGTERM here (gpu_check.sh's stage limit) ends the child as a timeout does."""
  t0 = time.perf_counter()
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           cwd=REPO, env=env, start_new_session=True)
  stopped = {"why": ""}

  def stop(why: str):
    stopped["why"] = why
    try:
      os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:  # it had ended already
      pass

  previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop("this process got SIGTERM"))
  timer = None
  if timeout_s:
    import threading
    timer = threading.Timer(timeout_s, lambda: stop(f"still running after {timeout_s:.0f} s"))
    timer.daemon = True
    timer.start()
  last = ""
  try:
    for line in child.stdout:
      print(line, end="", flush=True)
      if line.strip():
        last = line.strip()
      phases.add(line)
    child.wait()
  finally:
    if timer is not None:
      timer.cancel()
    signal.signal(signal.SIGTERM, previous)
  wall = time.perf_counter() - t0
  return (None if stopped["why"] else child.returncode), (stopped["why"] or last), wall


def read_timings(workdir: str) -> dict:
  path = os.path.join(workdir, "timings.json")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def summarize(phases: list, timings: dict, wall_s: float, returncode: int) -> dict:
  """The 'done' record's fields: the phases seen, the loop's speed from the run's timings.json, and
  this process's wall clock around the child."""
  train = timings.get("train", {})
  first = next((r["end_s"] for r in phases if r["phase"] == "first_step"), None)
  return {"to_first_step_s": first, "total_s": phases[-1]["end_s"] if phases else None,
          "wall_s": round(wall_s, 3), "returncode": returncode, "target_to_first_step_s": TARGET_TO_FIRST_STEP_S,
          "to_first_step_met": first is not None and first <= TARGET_TO_FIRST_STEP_S,
          **{k: train.get(k) for k in ("timed_steps", "step_time_s_median", "steps_per_s", "tokens_per_s",
                                       "heldout_s", "heldout_passes", "checkpoint_s", "plot_s")}}


def table(phases: list, done: dict) -> str:
  """The phases and the speed as a few lines of text."""
  lines = [f"{'phase':<18}{'seconds':>10}{'from start':>12}"]
  lines += [f"{r['phase']:<18}{r['seconds']:>10.1f}{r['end_s']:>12.1f}" for r in phases]
  first = done["to_first_step_s"]
  lines.append(f"to first step: {'-' if first is None else f'{first:.1f}'} s (target <= "
               f"{TARGET_TO_FIRST_STEP_S:.0f} s: {'met' if done['to_first_step_met'] else 'NOT met'})")
  if done.get("steps_per_s"):
    lines.append(f"steady state: {done['steps_per_s']:.2f} steps/s, {done['tokens_per_s']:,.0f} tokens/s "
                 f"(median of {done['timed_steps']} steps: {done['step_time_s_median']:.4f} s)")
  if done.get("heldout_passes") is not None:
    lines.append(f"in the training loop: held-out {done['heldout_s']:.1f} s ({done['heldout_passes']} passes), "
                 f"checkpoints {done['checkpoint_s']:.1f} s, plots {done['plot_s']:.1f} s")
  lines.append(f"total: {done['total_s']} s by the run's clock (its last phase), {done['wall_s']:.1f} s wall "
               "around it")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out_dir", required=True, help="where the run's workdir (run/) and cache go")
  parser.add_argument("--data", required=True, help="HH-RLHF rows, .jsonl or .jsonl.gz")
  parser.add_argument("--smoke", action="store_true", help="configs/tiny.py's model: a CPU check")
  parser.add_argument("--preset", default="gpt2-medium", help="model size of the full run")
  parser.add_argument("--steps", type=int, default=0, help="train steps (0: 300, smoke 4)")
  parser.add_argument("--num_prompts", type=int, default=0, help="prompts sampled (0: 16, smoke 2)")
  parser.add_argument("--override", action="append", default=[],
                      help="a further flag for main, e.g. --override=--config.model.scan_layers=True")
  parser.add_argument("--compilation_cache_dir", default=None,
                      help="JAX's persistent cache for the run (default: a fresh OUT_DIR/jax_cache)")
  parser.add_argument("--timeout_s", type=float, default=0.0, help="kill the run after this (0: never)")
  args = parser.parse_args(argv)
  if not os.path.isfile(args.data):
    parser.error(f"--data={args.data}: no such file; pass HH-RLHF rows (.jsonl or .jsonl.gz)")
  workdir = os.path.join(os.path.abspath(args.out_dir), "run")
  if os.path.exists(workdir):
    parser.error(f"{workdir} exists: a timed run starts from nothing; pass another --out_dir or remove it")
  os.makedirs(args.out_dir, exist_ok=True)
  case = "smoke" if args.smoke else args.preset
  command = main_command(args, workdir)
  print("running: " + " ".join(command), flush=True)
  phases = Phases(case)
  returncode, last, wall = run_child(command, phases, args.timeout_s)
  timings = read_timings(workdir)
  if returncode is None:
    records.emit("e2e", case=case, phase="timeout", in_phase=phases.last, seconds=round(wall, 3), error=last)
  elif returncode != 0:
    records.emit("e2e", case=case, phase="error", in_phase=phases.last, seconds=round(wall, 3),
                 error=f"exit {returncode}: {last[:500]}")
  done = summarize(phases.rows, timings, wall, 124 if returncode is None else returncode)
  records.emit("e2e", case=case, phase="done", seconds=round(wall, 3), command=" ".join(command), **done)
  print(table(phases.rows, done), flush=True)
  return done["returncode"]


if __name__ == "__main__":
  sys.exit(main())
