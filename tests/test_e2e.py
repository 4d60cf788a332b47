"""bench/e2e.py: the real `python -m gpt2_lora_jax.main` on real HH-RLHF rows, timed by phase (smoke
mode on the CPU): every phase recorded the moment it ends, in order, each the difference of its end
and the previous one's, summing to the run's total; the speed agrees with the run's metrics.jsonl."""
import json
import os
import statistics
import subprocess
import sys

from conftest import REPO

PHASES = ["startup", "weights", "model", "data", "state", "initial_heldout", "probes", "compile", "first_step",
          "training", "eval_weights", "eval_model", "restore", "heldout", "sampling", "score_report"]


def run_e2e(tmp_path, *flags):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
         "GPU_CHECK_RECORDS": str(tmp_path / "records.jsonl"), "GPU_CHECK_STAGE": "e2e_smoke"}
  # The test process's compilation cache (conftest), as the other tiny runs use it.
  cache = os.environ.get("JAX_COMPILATION_CACHE_DIR", "")
  result = subprocess.run([sys.executable, "-m", "gpt2_lora_jax.bench.e2e", f"--out_dir={tmp_path / 'out'}",
                           "--smoke", f"--compilation_cache_dir={cache}", *flags],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
  from gpt2_lora_jax.bench import records
  found, bad = records.read(str(tmp_path / "records.jsonl"))
  assert bad == 0
  return result, [r for r in found if r["kind"] == "e2e"]


def test_smoke_run_records_every_phase_consistently(tmp_path, hh_test_file):
  result, found = run_e2e(tmp_path, f"--data={hh_test_file}")
  assert result.returncode == 0, result.stdout[-3000:]
  assert [r["phase"] for r in found] == PHASES + ["done"]
  assert {r["case"] for r in found} == {"smoke"} and {r["stage"] for r in found} == {"e2e_smoke"}
  phases, done = found[:-1], found[-1]
  workdir = tmp_path / "out" / "run"
  timings = json.loads((workdir / "timings.json").read_text())
  # The records (read from the run's log lines as they came) are the run's own timeline.
  assert [{k: r[k] for k in ("phase", "seconds", "end_s")} for r in phases] == \
      [dict(p, phase=r["phase"]) for p, r in zip(timings["phases"], phases)]
  previous = 0.0
  for r in phases:  # in order; each phase is its end less the previous end (both rounded to 1 ms)
    assert r["end_s"] >= previous and abs(r["seconds"] - (r["end_s"] - previous)) <= 1e-3
    previous = r["end_s"]
  assert abs(sum(r["seconds"] for r in phases) - done["total_s"]) <= 1e-3 * len(phases)
  assert done["total_s"] == phases[-1]["end_s"] <= done["wall_s"]
  assert done["to_first_step_s"] == next(r["end_s"] for r in phases if r["phase"] == "first_step")
  assert done["to_first_step_met"] == (done["to_first_step_s"] <= done["target_to_first_step_s"])
  assert done["returncode"] == 0

  # Steady-state speed: the median of the clean step times metrics.jsonl holds, 2 rows x 128 tokens.
  metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  laps = [m["step_time_s"] for m in metrics if m["split"] == "train" and "step_time_s" in m]
  assert done["timed_steps"] == len(laps) >= 1
  assert abs(done["step_time_s_median"] - statistics.median(laps)) <= 1e-9
  assert abs(done["steps_per_s"] * statistics.median(laps) - 1) <= 1e-9
  assert abs(done["tokens_per_s"] - 2 * 128 / statistics.median(laps)) <= 1e-6 * done["tokens_per_s"]
  # Held-out passes inside the loop: every evaluation record after the untrained model's.
  assert done["heldout_passes"] == len([m for m in metrics if m["split"] == "eval" and m["step"] > 0]) >= 1

  # What was run: 4 steps, held-out loss of both models, 2 prompts each, nothing scored.
  assert metrics[-1]["step"] == 4
  out = workdir / "eval" / "step_4"
  assert set(json.loads((out / "heldout.json").read_text())) == {"base", "finetuned"}
  generations = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
  assert sorted(g["model"] for g in generations) == ["base", "base", "finetuned", "finetuned"]
  assert not (out / "scores.jsonl").exists() and "no reward model" in result.stdout + (out / "report.md").read_text()


def test_a_failed_run_is_recorded_with_its_error(tmp_path, hh_test_file):
  result, found = run_e2e(tmp_path, f"--data={hh_test_file}", "--override=--config.train.stepz=3")
  assert result.returncode == 1
  error, done = found
  assert error["phase"] == "error" and error["in_phase"] == "start"
  assert error["error"].startswith("exit 1: error: no config key 'stepz'")
  assert done["phase"] == "done" and done["returncode"] == 1 and done["to_first_step_s"] is None
