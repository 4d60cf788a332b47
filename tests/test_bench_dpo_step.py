"""bench.dpo_step: its settings are configs/dpo_hh.py's, and its smoke run on 2 CPU devices records both
steps and a first DPO step exactly at its reference. No duration is asserted."""
import importlib.util

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
