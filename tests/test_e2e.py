"""bench/e2e.py: a failed run is recorded with its error. Its successful smoke run (every phase in
order, consistent with the run's own timings.json and metrics.jsonl) is checked on the GPU check's
smoke run (tests/test_gpu_check.py), which runs it as a stage; PHASES is the phases it records."""
import os
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


def test_a_failed_run_is_recorded_with_its_error(tmp_path, hh_test_file):
  result, found = run_e2e(tmp_path, f"--data={hh_test_file}", "--override=--config.train.stepz=3")
  assert result.returncode == 1
  error, done = found
  assert error["phase"] == "error" and error["in_phase"] == "start"
  assert error["error"].startswith("exit 1: error: no config key 'stepz'")
  assert done["phase"] == "done" and done["returncode"] == 1 and done["to_first_step_s"] is None
