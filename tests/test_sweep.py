"""--mode=sweep end to end on configs/tiny.py: a sweep stopped in its second run and rerun skips the
finished run (nothing retrained, the base not evaluated again), resumes the stopped one, and reports
both; a config that changes a finished run is then refused in one line, before anything runs."""
import json
import os
import signal
import subprocess
import sys
import time

from conftest import REPO, TINY_CONFIG, train_losses

SWEEP = ["--mode=sweep", "--config.train.steps=8", "--config.train.ckpt_every=4", "--config.train.eval_every=0",
         "--config.sweep.runs=((('lora.rank', 2),), (('train.steps', 16),))", "--config.sweep.metric=heldout_loss"]


def command(workdir, *flags):
  return [sys.executable, "-m", "gpt2_lora_jax.main", f"--config={TINY_CONFIG}", f"--workdir={workdir}", *SWEEP, *flags]


ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def snapshot(directory):
  """{relative path: (mtime, size)} of every file under directory."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      out[os.path.relpath(path, directory)] = (os.stat(path).st_mtime_ns, os.stat(path).st_size)
  return out


def test_a_stopped_sweep_resumes_and_a_changed_finished_run_is_refused(tmp_path):
  workdir = tmp_path / "sweep"
  first, second = workdir / "runs" / "rank=2", workdir / "runs" / "steps=16"
  proc = subprocess.Popen(command(workdir), env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None and (
      not (second / "metrics.jsonl").exists() or not train_losses(second)):
    time.sleep(0.1)
  proc.send_signal(signal.SIGTERM)  # in the second run's training loop: it checkpoints and stops
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
  assert json.loads((first / "sweep_run.json").read_text())["done"]["step"] == 8
  stopped_at = max(int(d) for d in os.listdir(second / "checkpoints") if d.isdigit())
  assert 1 <= stopped_at < 16
  finished, base = snapshot(first), snapshot(workdir / "base_eval")

  rerun = subprocess.run(command(workdir), env=ENV, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "sweep: rank=2 finished at step 8; skipped" in rerun.stdout
  assert f"resumed from {second / 'checkpoints'}/{stopped_at}" in rerun.stdout
  assert "evaluating the base" not in rerun.stdout
  assert snapshot(first) == finished and snapshot(workdir / "base_eval") == base  # nothing redone
  assert sorted(train_losses(second)) == list(range(1, 17))  # every step once
  # Both runs' reports hold the base's one evaluation: the same answers, the same held-out loss.
  base_answers = [json.loads(l) for l in (workdir / "base_eval" / "generations.jsonl").read_text().splitlines()]
  for run in (first, second):
    step = json.loads((run / "sweep_run.json").read_text())["done"]["step"]
    answers = [json.loads(l) for l in (run / "eval" / f"step_{step}" / "generations.jsonl").read_text().splitlines()]
    assert [a for a in answers if a["model"] == "base"] == base_answers
  summary = json.loads((workdir / "sweep_summary.json").read_text())
  assert sorted(r["name"] for r in summary["runs"]) == ["rank=2", "steps=16"] and not summary["not_finished"]
  assert [c["other"] for c in summary["comparisons"]] == [summary["runs"][1]["name"]]
  assert (workdir / "sweep_report.md").exists() and (workdir / "sweep_loss.png").exists()

  everything = snapshot(workdir)
  refused = subprocess.run(command(workdir, "--config.optim.lr=0.02"), env=ENV, cwd=REPO, capture_output=True,
                           text=True, timeout=600)
  assert refused.returncode == 1
  (line,) = refused.stderr.strip().splitlines()
  assert line.startswith("error: checkpoint ") and "(sweep run 'rank=2')" in line
  assert "optim.lr: 0.01 -> 0.02" in line
  assert snapshot(workdir) == everything  # refused before anything ran
