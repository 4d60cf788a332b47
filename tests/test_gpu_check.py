"""benchmarks/gpu_check.sh --cpu_smoke: one run of the check's stages that differ in kind, at tiny
shapes on the CPU, then what each stage recorded (bench/levers.py, bench/e2e.py, bench/dpo_step.py
are checked here on the records of that one run, not in runs of their own)."""
import json
import statistics

import pytest

from gpt2_lora_jax.bench import settings
from test_e2e import PHASES


def test_gpu_check_script_cpu_smoke(tmp_path):
  """benchmarks/gpu_check.sh --cpu_smoke at tiny shapes, with two stages killed by SIGKILL mid-way
  (GPU_CHECK_KILL_AFTER): the JAX train stage after its second record (the matmul, then the train
  step; before its own files) and the PyTorch stage after its first child (PEFT eager). What comes
  back is at most 8 files, no folders: the summary (every stage with its status), the logs archive
  with each stage's record log, and the numbers written before each kill are all there; the stages
  after a kill still ran. (Every stage of the smoke mode: benchmarks/README.md; this runs the ones
  that differ in kind, to keep the test short: the preflight, the XLA A/B, a train stage, the
  profile, the levers, PyTorch, `main` end to end, the DPO step.) The summary lists the stages in
  the check's order (part 1, then part 2)."""
  import io
  import os
  import pathlib
  import subprocess
  import sys
  import tarfile
  from gpt2_lora_jax.bench import preflight, xla_attention
  repo = pathlib.Path(__file__).resolve().parents[1]
  stages = ["preflight", "xla_attention", "gpt2_b16_like_peft", "gpt2_b16_torch", "profile_gpt2_b16_user",
            "levers_gpt2_b16", "e2e_gpt2-medium", "dpo_step_gpt2"]
  env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_STAGES": ",".join(stages), "TMPDIR": str(tmp_path),
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
         "GPU_CHECK_KILL_AFTER": "gpt2_b16_like_peft:2,gpt2_b16_torch:1"}
  out = tmp_path / "out"
  proc = subprocess.run(["bash", str(repo / "benchmarks" / "gpu_check.sh"), "--cpu_smoke", str(out)],
                        capture_output=True, text=True, env=env, timeout=900)
  assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]  # the killed stages
  files = sorted(p.name for p in out.iterdir())
  assert files == ["console.log", "logs.tar.gz", "summary.json", "summary.md"]  # <= 8 files, no folders
  summary = json.loads((out / "summary.json").read_text())
  assert [(s["stage"], s["status"]) for s in summary["stages"]] == [
      ("gpt2_b16_like_peft", "killed (SIGKILL)"), ("profile_gpt2_b16_user", "ok"), ("levers_gpt2_b16", "ok"),
      ("gpt2_b16_torch", "killed (SIGKILL)"), ("e2e_gpt2-medium", "ok"), ("preflight", "ok"),
      ("dpo_step_gpt2", "ok"), ("xla_attention", "ok")]
  markdown = (out / "summary.md").read_text()
  for s in summary["stages"]:
    assert f"| {s['stage']} | {s['status']} |" in markdown
  assert markdown.index("Did every path run") < markdown.index("## Targets") < markdown.index("## Stages")
  with tarfile.open(out / "logs.tar.gz") as tar:
    logs = {pathlib.PurePath(m.name).name: m for m in tar.getmembers() if m.isfile()}
    read = lambda name: tar.extractfile(logs[name]).read().decode()
    jsonl = {name: [json.loads(line) for line in io.StringIO(read(f"{name}.jsonl"))] for name in stages}
    assert "torch_gpt2_b16_torch_peft_eager.json" in logs  # the child's own file
  # Preflight: every case, phase by phase, as JSON lines; each ran here.
  pre = jsonl["preflight"]
  for case in preflight.CASES:
    last = "second_step" if case.startswith("train") else "second_call"
    assert [r["phase"] for r in pre if r.get("case") == case][-1] == last, case
  assert {p["case"]: p["status"] for p in summary["paths"]} == {c: "ok" for c in ("platform",) + preflight.CASES}
  assert {r["case"] for r in jsonl["xla_attention"] if r["phase"] == "steady"} == set(xla_attention.CASES) - {"nn_cudnn"}
  # The killed JAX stage kept what it had measured (it died before writing its bench_*.json).
  assert [r["kind"] for r in jsonl["gpt2_b16_like_peft"]] == ["matmul", "train"]
  assert not [name for name in logs if name.startswith("bench_")]
  like = jsonl["gpt2_b16_like_peft"][1]
  assert like["lora_rank"] == 8 and like["lora_dropout"] == 0.0 and like["tokens_per_s"] > 0
  # The killed PyTorch stage kept PEFT eager, written before the next child began.
  (eager,) = jsonl["gpt2_b16_torch"]
  assert eager["impl"] == "peft_eager" and eager["tokens_per_s"] > 0 and eager["trainable_params"] == like["trainable_params"]
  (row,) = summary["train"]
  assert row["stage"] == "gpt2_b16_like_peft" and row["peft_eager"]["tokens_per_s"] == eager["tokens_per_s"]
  assert [m["stage"] for m in summary["matmul"]] == ["gpt2_b16_like_peft"]
  # The new stages: each one's records reached the summary and its section of summary.md.
  (prof,) = summary["profile"]
  assert prof["stage"] == "profile_gpt2_b16_user" and "error" not in prof and "## Where the time goes" in markdown
  levers = {v["variant"]: v for v in summary["levers"]}
  assert set(levers) == {"user", "user_no_triton_gemm", "like_peft"}
  assert levers["user_no_triton_gemm"]["xla_options"] == {"xla_gpu_enable_triton_gemm": False}
  assert levers["user_no_triton_gemm"]["time_over_baseline"] == (
      levers["user_no_triton_gemm"]["step_time_s"] / levers["user"]["step_time_s"])
  (e2e,) = summary["e2e"]
  assert e2e["status"] == "ok" and e2e["case"] == "smoke"
  for section in ("## Levers", "## What a user waits for"):
    assert section in markdown
  check_levers(jsonl["levers_gpt2_b16"])
  check_e2e(jsonl["e2e_gpt2-medium"], next(tmp_path.glob("e2e_*")) / "run")
  check_dpo_step(jsonl["dpo_step_gpt2"])


def check_levers(recs):
  """The levers stage (smoke variants 'user,user_no_triton_gemm+like_peft'): configs/gpt2_hh.py's
  remat 'auto' chosen once, on the group's first variant (remat.py); compiled then timed per group."""
  assert all(r["kind"] == "lever" for r in recs)
  (choice,) = [r["remat_choice"] for r in recs if r["phase"] == "remat"]
  assert choice["policy"] == "none" and choice["bytes_per_device"]["none"] <= choice["budget_bytes"]
  phases = [(r["variant"], r["phase"]) for r in recs if r["phase"] != "device"]
  assert phases == [("user", "remat"), ("user", "compiled"), ("user_no_triton_gemm", "compiled"),
                    ("user", "timed"), ("user_no_triton_gemm", "timed"), ("like_peft", "compiled"),
                    ("like_peft", "timed")]
  timed = {r["variant"]: r for r in recs if r["phase"] == "timed"}
  assert timed["user_no_triton_gemm"]["baseline"] == "user" and timed["like_peft"]["baseline"] == "like_peft"
  assert timed["user_no_triton_gemm"]["xla_options"] == {"xla_gpu_enable_triton_gemm": False}
  assert timed["user"]["remat"] == timed["user_no_triton_gemm"]["remat"] == "none"
  assert timed["like_peft"]["lora_dropout"] == 0.0 and timed["user"]["lora_dropout"] > 0
  for r in timed.values():
    assert r["tokens_per_s"] == r["batch_size"] * r["seq_len"] / r["step_time_s"]
    assert r["step_time_s"] == statistics.median(r["step_times_s"]) and r["attention_path"] == "xla"


def check_e2e(recs, workdir):
  """`main` end to end (smoke): every phase recorded in order, each its end less the previous end,
  summing to the run's total; the speed agrees with the run's metrics.jsonl; what ran: 4 steps,
  held-out loss of both models, 2 prompts each, nothing scored."""
  assert [r["phase"] for r in recs] == PHASES + ["done"] and {r["case"] for r in recs} == {"smoke"}
  phases, done = recs[:-1], recs[-1]
  timings = json.loads((workdir / "timings.json").read_text())
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
  metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  laps = [m["step_time_s"] for m in metrics if m["split"] == "train" and "step_time_s" in m]
  assert done["timed_steps"] == len(laps) >= 1
  assert abs(done["step_time_s_median"] - statistics.median(laps)) <= 1e-9
  assert abs(done["tokens_per_s"] - 2 * 128 / statistics.median(laps)) <= 1e-6 * done["tokens_per_s"]
  assert done["heldout_passes"] == len([m for m in metrics if m["split"] == "eval" and m["step"] > 0]) >= 1
  assert metrics[-1]["step"] == 4
  out = workdir / "eval" / "step_4"
  assert set(json.loads((out / "heldout.json").read_text())) == {"base", "finetuned"}
  generations = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
  assert sorted(g["model"] for g in generations) == ["base", "base", "finetuned", "finetuned"]
  assert not (out / "scores.jsonl").exists() and "no reward model" in (out / "report.md").read_text()


def check_dpo_step(recs):
  """The DPO step against the SFT step (smoke: configs/dpo_hh.py:gpt2's settings at tiny width):
  both timed with their FLOPs and memory; the first DPO step exactly at its reference here."""
  assert [r["program"] for r in recs] == ["sft", "dpo", "dpo_over_sft"]
  sft, dpo_row, ratio = recs
  want = settings.dpo_settings("gpt2")
  for r in (sft, dpo_row):
    assert r["kind"] == "dpo_step" and r["step_time_s"] > 0
    assert r["tokens_per_s"] == pytest.approx(r["batch_size"] * r["seq_len"] / r["step_time_s"])
    assert r["matmul_flops_per_step"] > 0 and r["memory_analysis"]["temp_size_in_bytes"] > 0 and r["pairs"] > 0
    assert r["lora_rank"] == want["lora_rank"] and r["scan_layers"] == want["scan_layers"]
    assert want["remat"] == "auto" and r["remat_setting"] == "auto" and r["remat"] == r["remat_choice"]["policy"]
  assert dpo_row["step0_margin"] == 0.0 and dpo_row["step0_logps_equal"] is True
  assert abs(dpo_row["step0_loss_minus_log2"]) <= 1e-6
  assert ratio["step0_margin"] == 0.0
  assert ratio["step_time_ratio"] == pytest.approx(dpo_row["step_time_s"] / sft["step_time_s"])
  assert ratio["matmul_flops_ratio"] == pytest.approx(dpo_row["matmul_flops_per_step"] / sft["matmul_flops_per_step"])
