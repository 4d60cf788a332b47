"""Multi-host training on one machine: two real JAX processes on 127.0.0.1 (gloo CPU collectives).

Each process has 2 CPU devices; together they form the 4-device mesh that one process with 4
devices forms alone, so the losses must agree. A SIGTERM that reaches only one of the two processes
must stop both after the same step with one checkpoint, and that checkpoint (sharded over both
processes) must restore in a one-process, one-device run that continues with the uninterrupted losses.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np

from conftest import REPO, TINY_CONFIG, train_losses

STEPS = 12
# fsdp=4 spans both processes: every step all-gathers parameters across them.
FLAGS = ["--mode=train", f"--config.train.steps={STEPS}", "--config.train.ckpt_every=1000",
         "--config.train.eval_every=6", "--config.train.plot_every=6", "--config.mesh.fsdp=4"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_main(workdir, devices: int, *flags, process_id=None, num_processes=None, port=None, log=None):
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  command = [sys.executable, "-m", "gpt2_lora_jax.main", f"--config={TINY_CONFIG}", f"--workdir={workdir}",
             *flags]
  if num_processes:
    command += [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}",
                f"--process_id={process_id}"]
  return subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)


def finish(procs, timeout=400):
  """Waits for every process; kills the rest if one hangs (a stuck collective must not hang pytest)."""
  deadline = time.time() + timeout
  try:
    for p in procs:
      p.wait(timeout=max(1, deadline - time.time()))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return [p.returncode for p in procs]


def eval_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if r["split"] == "eval"}


def checkpoint_steps(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def test_two_processes_match_one_then_sigterm_on_one_stops_both_and_resumes_on_one_device(tmp_path):
  # The reference: one process with 4 devices, uninterrupted.
  reference = str(tmp_path / "one_process")
  with open(tmp_path / "one_process.log", "w") as log:
    codes = finish([start_main(reference, 4, *FLAGS, log=log)])
  assert codes == [0], (tmp_path / "one_process.log").read_text()[-3000:]
  expected = train_losses(reference)
  assert sorted(expected) == list(range(1, STEPS + 1))

  # Two processes x 2 devices; SIGTERM to process 1 only, once training is under way.
  two = str(tmp_path / "two_processes")
  port = free_port()
  logs = [open(tmp_path / f"process_{i}.log", "w") for i in range(2)]
  procs = [start_main(two, 2, *FLAGS, process_id=i, num_processes=2, port=port, log=logs[i]) for i in range(2)]
  metrics_path = os.path.join(two, "metrics.jsonl")
  deadline = time.time() + 300
  while (time.time() < deadline and all(p.poll() is None for p in procs)
         and (not os.path.exists(metrics_path) or len(train_losses(two)) < 3)):
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)
  codes = finish(procs)
  for f in logs:
    f.close()
  outputs = [(tmp_path / f"process_{i}.log").read_text() for i in range(2)]
  assert codes == [128 + signal.SIGTERM] * 2, "\n\n".join(o[-3000:] for o in outputs)
  stopped_at = checkpoint_steps(two)
  assert len(stopped_at) == 1 and 3 <= stopped_at[0] < STEPS, (stopped_at, "signal came too late?")
  stop = stopped_at[0]
  for output in outputs:  # both stopped after the same step, the one checkpointed
    assert f"at step {stop}; checkpoint saved" in output, output[-3000:]

  # Process 0 alone wrote the metrics: every step once, the one-process losses.
  with open(metrics_path) as f:
    train_steps = [r["step"] for r in map(json.loads, f) if r["split"] == "train"]
  assert train_steps == list(range(1, stop + 1))
  got = train_losses(two)
  np.testing.assert_allclose([got[s] for s in range(1, stop + 1)], [expected[s] for s in range(1, stop + 1)],
                             rtol=1e-5)
  assert os.path.exists(os.path.join(two, "data_summary.json"))

  # The two-process checkpoint (fsdp=4 over both processes) resumes in one process on one device.
  with open(tmp_path / "resume.log", "w") as log:
    codes = finish([start_main(two, 1, *FLAGS[:-1], "--config.mesh.fsdp=1", log=log)])
  resumed_output = (tmp_path / "resume.log").read_text()
  assert codes == [0], resumed_output[-3000:]
  assert f"resumed from {two}/checkpoints/{stop}" in resumed_output
  got = train_losses(two)
  assert sorted(got) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([got[s] for s in range(1, STEPS + 1)], [expected[s] for s in range(1, STEPS + 1)],
                             rtol=1e-5)
  reference_eval, got_eval = eval_losses(reference), eval_losses(two)
  assert sorted(got_eval) == sorted(reference_eval) == [0, 6, 12]
  np.testing.assert_allclose([got_eval[s] for s in sorted(got_eval)],
                             [reference_eval[s] for s in sorted(reference_eval)], rtol=1e-5)


def test_bucket_workdir_metrics_are_written_whole(tmp_path, monkeypatch):
  """gs:// workdirs: metrics go through etils.epath, rewritten whole (buckets cannot append)."""
  from etils import epath

  from gpt2_lora_jax import metrics
  bucket = tmp_path / "bucket"
  bucket.mkdir()
  monkeypatch.setattr(metrics, "_epath", lambda p: epath.Path(str(p).replace("gs://bucket", str(bucket))))
  monkeypatch.setitem(sys.modules, "tensorboardX", None)  # its own GCS writer would need credentials
  workdir = "gs://bucket/run"
  writer = metrics.MetricsWriter(workdir, total_steps=6)
  for step in range(1, 5):
    writer.write(step, "train", {"loss": 5.0 - step})
  assert not (bucket / "run" / "metrics.jsonl").exists()  # nothing until a checkpoint/plot/exit
  writer.flush()
  assert [r["step"] for r in metrics.read(f"{workdir}/metrics.jsonl")] == [1, 2, 3, 4]
  writer.write(5, "train", {"loss": 0.5})
  writer.close()
  assert len(metrics.read(f"{workdir}/metrics.jsonl")) == 5
  assert metrics.plot_loss(workdir, window=2) == f"{workdir}/loss.png"
  assert (bucket / "run" / "loss.png").read_bytes()[:4] == b"\x89PNG"

  # A run resumed from step 3 drops what followed it, then appends its own records.
  writer = metrics.MetricsWriter(workdir, total_steps=6, start_step=3)
  writer.write(4, "train", {"loss": 9.0})
  writer.close()
  assert [(r["step"], r["loss"]) for r in metrics.read(f"{workdir}/metrics.jsonl")] == \
      [(1, 4.0), (2, 3.0), (3, 2.0), (4, 9.0)]
  metrics.write_text(f"{workdir}/data_summary.json", "{}")
  assert (bucket / "run" / "data_summary.json").read_text() == "{}"
  assert not os.path.exists("gs:")  # nothing went to a local directory named after the bucket
