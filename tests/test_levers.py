"""bench/levers.py: each variant is its base setting with one change (its records are checked on the
GPU check's smoke run, tests/test_gpu_check.py)."""
import pathlib

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
