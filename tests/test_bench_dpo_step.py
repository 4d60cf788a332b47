"""bench.dpo_step: its settings are configs/dpo_hh.py's, and its smoke run on 2 CPU devices records both
steps and a first DPO step exactly at its reference. No duration is asserted."""
import importlib.util
import json
import math

import pytest

from conftest import REPO
from gpt2_lora_jax.bench import dpo_step, records, settings


def test_dpo_settings_are_what_configs_dpo_hh_runs():
  """bench.settings reads configs/dpo_hh.py (and gpt2_hh.py under it) without ml_collections: it must
  agree with the loaded config for every size."""
  spec = importlib.util.spec_from_file_location("dpo_hh_config", REPO / "configs" / "dpo_hh.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for size in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"):
    c = module.get_config(size)
    assert settings.dpo_settings(size) == {
        "lora_rank": c.lora.rank, "lora_alpha": c.lora.alpha, "lora_dropout": c.lora.dropout,
        "lora_dropout_rng": c.lora.dropout_rng, "lora_fused_matmul": c.lora.fused_matmul,
        "lora_targets": tuple(c.lora.targets), "scan_layers": c.model.scan_layers, "remat": c.model.remat,
        "attention": c.model.attention_impl, "dtype": c.model.dtype, "param_dtype": c.model.base_param_dtype,
        "batch_size": c.train.batch_size, "micro_batches": c.train.micro_batches, "dpo_loss": c.dpo.loss,
        "dpo_beta": c.dpo.beta, "dpo_reference_free": c.dpo.reference_free}


def test_smoke_run_records_both_steps_and_an_exact_start(tmp_path, monkeypatch):
  log = tmp_path / "records.jsonl"
  monkeypatch.setenv(records.RECORDS_ENV, str(log))
  monkeypatch.setenv(records.STAGE_ENV, "dpo_step")
  out = tmp_path / "out"
  assert dpo_step.main(["--smoke", "--num_devices=2", "--micro_batches=2", f"--out_dir={out}"]) == 0
  rows, bad = records.read(str(log))
  assert bad == 0 and [r["program"] for r in rows] == ["sft", "dpo", "dpo_over_sft"]
  sft, dpo_row, ratio = rows
  for r in (sft, dpo_row):
    assert r["kind"] == "dpo_step" and r["stage"] == "dpo_step" and r["step_time_s"] > 0
    assert r["tokens_per_s"] == pytest.approx(4 * 128 / r["step_time_s"])
    assert r["matmul_flops_per_step"] > 0 and r["memory_analysis"]["temp_size_in_bytes"] > 0
    assert r["batch_size"] == 4 and r["micro_batches"] == 2 and r["num_devices"] == 2 and r["pairs"] > 0
    # configs/dpo_hh.py:gpt2's settings (gpt2 unrolled; remat 'auto' chosen here as a run chooses it)
    want = settings.dpo_settings("gpt2")
    assert r["lora_rank"] == 16 and r["scan_layers"] == want["scan_layers"] and r["dtype"] == "bfloat16"
    assert want["remat"] == "auto" and r["remat_setting"] == "auto" and r["remat"] == r["remat_choice"]["policy"]
  # The first DPO step starts at its reference on this device: margin exactly 0, loss float32's log 2.
  assert dpo_row["step0_margin"] == 0.0 and dpo_row["step0_logps_equal"] is True
  assert abs(dpo_row["step0_loss_minus_log2"]) <= 1e-6
  assert ratio["step0_margin"] == 0.0
  assert ratio["step_time_ratio"] == pytest.approx(dpo_row["step_time_s"] / sft["step_time_s"])
  assert ratio["matmul_flops_ratio"] == pytest.approx(dpo_row["matmul_flops_per_step"] / sft["matmul_flops_per_step"])
  (saved,) = out.glob("dpo_step_cpu_*.json")
  result = json.loads(saved.read_text())
  assert result["dpo_over_sft"]["step0_margin"] == 0.0 and math.isclose(
      result["dpo"]["step_time_s"], dpo_row["step_time_s"])
  assert "margin 0.0" in next(out.glob("dpo_step_cpu_*.md")).read_text()


@pytest.mark.parametrize("flags, words", [(["--preset=gpt3"], "--preset='gpt3'"),
                                          (["--dpo_loss=simpo"], "--dpo_loss='simpo'")])
def test_bad_flags_are_named_in_one_line(flags, words, capsys):
  with pytest.raises(SystemExit) as exit_info:
    dpo_step.parse_args(flags)
  assert exit_info.value.code == 2
  error = capsys.readouterr().err.strip().splitlines()[-1]
  assert words in error and error.startswith("python -m gpt2_lora_jax.bench.dpo_step: error:")


def test_summary_holds_the_dpo_records_and_targets(tmp_path, monkeypatch):
  """The GPU check's summary folds a dpo_step stage's records into a table and two targets."""
  from gpt2_lora_jax.bench import summary as run_summary
  monkeypatch.setenv(records.RECORDS_ENV, str(tmp_path / "dpo_step.jsonl"))
  monkeypatch.setenv(records.STAGE_ENV, "dpo_step")
  common = {"model": "gpt2", "batch_size": 32}
  records.emit("dpo_step", program="sft", step_time_s=0.1, **common)
  records.emit("dpo_step", program="dpo", step_time_s=0.16, step0_margin=0.0, **common)
  records.emit("dpo_step", program="dpo_over_sft", step_time_ratio=1.6, step0_margin=0.0, **common)
  s = run_summary.summarize(str(tmp_path), "run", ["dpo_step"])
  assert [r["program"] for r in s["dpo_step"]] == ["sft", "dpo", "dpo_over_sft"]
  met = {t["target"]: t["met"] for t in s["targets"]}
  assert met == {"DPO step gpt2 b32: step time / SFT step, same rows": False,
                 "DPO step gpt2 b32: first step's margin (at its reference)": True}
  assert "| dpo_step | gpt2 | 32 | dpo_over_sft |" in run_summary.to_markdown(s)
