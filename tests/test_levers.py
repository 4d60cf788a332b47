"""bench/levers.py: each variant is its base setting with one change, and a CPU smoke run records
every variant's compile and steps."""
import json
import os
import pathlib
import subprocess
import sys

from gpt2_lora_jax.bench import levers, settings

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_variants_are_their_setting_plus_their_change():
  user = settings.user_settings("gpt2")
  base = levers.bench_config("user", "gpt2", 16, 1024)
  for field, value in user.items():
    assert getattr(base, field) == value, field
  assert levers.bench_config("user_nodrop", "gpt2", 16, 1024).lora_dropout == 0.0
  scan = levers.bench_config("like_peft_scan", "gpt2", 16, 1024)
  assert (scan.lora_rank, scan.lora_dropout, scan.remat, scan.scan_layers) == (8, 0.0, "none", True)
  assert levers.bench_config("user_pallas", "gpt2-xl", 8, 1024).attention == "pallas"
  # every variant but a setting's own differs from that setting in what its name says, nothing else
  for name, (setting, over, _) in levers.VARIANTS.items():
    cfg, ref = levers.bench_config(name, "gpt2", 4, 1024), levers.bench_config(setting, "gpt2", 4, 1024)
    differs = {f for f in ("lora_rank", "lora_dropout", "lora_dropout_rng", "remat", "scan_layers", "attention",
                           "lora_targets", "lora_fused_matmul") if getattr(cfg, f) != getattr(ref, f)}
    assert differs <= set(over), (name, differs)


def test_seed_setting_is_what_configs_seed_study_runs():
  from gpt2_lora_jax import config as config_lib
  import importlib.util
  spec = importlib.util.spec_from_file_location("seed_study", REPO / "configs" / "seed_study.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  s = settings.SEED_STUDY
  assert (c.lora.rank, c.lora.alpha, c.lora.dropout, tuple(c.lora.targets)) == (
      s["lora_rank"], s["lora_alpha"], s["lora_dropout"], s["lora_targets"])
  assert (c.model.remat, bool(c.model.get("scan_layers", False))) == (s["remat"], s["scan_layers"])
  assert c.train.batch_size == 1 and c.model.name.endswith("gpt2-medium")
  del config_lib


def test_cpu_smoke_records_every_variant(tmp_path):
  log = tmp_path / "levers.jsonl"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
         "GPU_CHECK_RECORDS": str(log), "GPU_CHECK_STAGE": "levers_test"}
  proc = subprocess.run([sys.executable, "-m", "gpt2_lora_jax.bench.levers", "--smoke", "--batch_size=2",
                         "--timed_steps=2", "--variants=user,user_nodrop+like_peft,nope"],
                        capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
  assert proc.returncode == 2 and "unknown ['nope']" in proc.stderr  # a typo is a usage error
  proc = subprocess.run([sys.executable, "-m", "gpt2_lora_jax.bench.levers", "--smoke", "--batch_size=2",
                         "--timed_steps=2", "--variants=user,user_nodrop,user_no_triton_gemm+like_peft"],
                        capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  recs = [json.loads(line) for line in log.read_text().splitlines()]
  assert all(r["stage"] == "levers_test" and r["kind"] == "lever" for r in recs)
  phases = [(r["variant"], r["phase"]) for r in recs if r["phase"] != "device"]
  # configs/gpt2_hh.py's remat 'auto' is chosen once, on the group's first variant (remat.py)
  (choice,) = [r["remat_choice"] for r in recs if r["phase"] == "remat"]
  assert choice["policy"] == "none" and choice["bytes_per_device"]["none"] <= choice["budget_bytes"]
  assert phases == [("user", "remat"), ("user", "compiled"), ("user_nodrop", "compiled"), ("user_no_triton_gemm", "compiled"),
                    ("user", "timed"), ("user_nodrop", "timed"), ("user_no_triton_gemm", "timed"),
                    ("like_peft", "compiled"), ("like_peft", "timed")]
  timed = {r["variant"]: r for r in recs if r["phase"] == "timed"}
  assert timed["user_nodrop"]["baseline"] == "user" and timed["like_peft"]["baseline"] == "like_peft"
  assert timed["user_nodrop"]["lora_dropout"] == 0.0 and timed["user"]["lora_dropout"] > 0
  assert timed["user_no_triton_gemm"]["xla_options"] == {"xla_gpu_enable_triton_gemm": False}
  assert {r["remat"] for r in timed.values()} == {"none"}
  for r in timed.values():
    assert r["tokens_per_s"] == r["batch_size"] * r["seq_len"] / r["step_time_s"]
    assert len(r["step_times_s"]) == 2 and r["attention_path"] == "xla"
