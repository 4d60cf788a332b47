"""The train settings of the GPU check: what users run (configs/gpt2_hh.py, and configs/dpo_hh.py for
DPO) and what PEFT is timed at. Standard library only: the configs are read, not imported (importing
them needs ml_collections, which a GPU machine may lack)."""
from __future__ import annotations

import ast
import os

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")
USER_CONFIG = os.path.join(CONFIGS, "gpt2_hh.py")
DPO_CONFIG = os.path.join(CONFIGS, "dpo_hh.py")
# What PEFT is timed at (peft_peer.py): LoRA r8, alpha 16, no dropout, no remat, no scan.
LIKE_PEFT = {"lora_rank": 8, "lora_alpha": 16.0, "lora_dropout": 0.0, "scan_layers": False, "remat": "none"}
# configs/seed_study.py's model and LoRA settings (gpt2-medium, one 1024-token row per step);
# tests/test_levers.py checks them against the loaded config.
SEED_STUDY = {"lora_rank": 1, "lora_alpha": 1.0, "lora_dropout": 0.0, "remat": "none", "scan_layers": False,
              "lora_targets": ("c_attn", "c_proj", "c_fc", "lm_head")}


def user_settings(preset: str, path: str = USER_CONFIG) -> dict:
  """BenchConfig fields of what configs/gpt2_hh.py:<preset> runs, read from the file's syntax tree
  (importing it needs ml_collections, which a GPU machine may lack): its `c.model.*` and `c.lora.*`
  literals, the same for every size (remat 'auto' included: the benchmark chooses as a run does),
  and SCAN_LAYERS[preset].
  tests/test_bench.py checks them against the loaded config."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  found, scan = {}, None
  for node in ast.walk(tree):
    if not isinstance(node, ast.Assign) or len(node.targets) != 1:
      continue
    target = node.targets[0]
    if isinstance(target, ast.Name) and target.id == "SCAN_LAYERS":
      scan = ast.literal_eval(node.value)
    elif (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Attribute)
        and isinstance(target.value.value, ast.Name) and target.value.attr in ("model", "lora")):
      try:
        found[f"{target.value.attr}.{target.attr}"] = ast.literal_eval(node.value)
      except ValueError:  # not a literal (e.g. f"openai-community/{size}"): not a benchmark field
        pass
  return {"lora_rank": int(found["lora.rank"]), "lora_alpha": float(found["lora.alpha"]),
          "lora_dropout": float(found["lora.dropout"]),
          "lora_dropout_rng": found.get("lora.dropout_rng", "packed"),
          "lora_fused_matmul": bool(found.get("lora.fused_matmul", False)), "lora_targets": tuple(found["lora.targets"]),
          "scan_layers": bool(scan[preset] if scan is not None else found["model.scan_layers"]),
          "remat": found["model.remat"],
          "attention": found["model.attention_impl"], "dtype": found["model.dtype"],
          "param_dtype": found["model.base_param_dtype"]}


def _literals(path: str) -> tuple[dict, dict]:
  """({'section.name': value} of a config file's `c.<section>.<name> = <literal>` lines (the last one
  wins), {NAME: value} of its top-level `NAME = <literal>` lines)."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  fields, names = {}, {}
  for node in ast.walk(tree):
    if not isinstance(node, ast.Assign) or len(node.targets) != 1:
      continue
    target = node.targets[0]
    try:
      value = ast.literal_eval(node.value)
    except ValueError:  # not a literal (e.g. REMAT[size])
      continue
    if isinstance(target, ast.Name):
      names[target.id] = value
    elif (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Attribute)
          and isinstance(target.value.value, ast.Name)):
      fields[f"{target.value.attr}.{target.attr}"] = value
  return fields, names


def dpo_settings(preset: str, path: str = DPO_CONFIG, base_path: str = USER_CONFIG) -> dict:
  """What configs/dpo_hh.py:<preset> runs, read as user_settings reads configs/gpt2_hh.py (which it
  builds on): user_settings(preset) with dpo_hh.py's own c.lora.* / c.model.* literals over them, the
  batch of gpt2_hh.py's RECIPE, train.micro_batches, and dpo.loss / beta / reference_free.
  tests/test_bench_dpo_step.py checks them against the loaded config."""
  out = user_settings(preset, base_path)
  base_fields, base_names = _literals(base_path)
  fields, _ = _literals(path)
  keys = {"lora.rank": "lora_rank", "lora.alpha": "lora_alpha", "lora.dropout": "lora_dropout",
          "lora.targets": "lora_targets", "model.scan_layers": "scan_layers", "model.attention_impl": "attention",
          "model.dtype": "dtype", "model.base_param_dtype": "param_dtype"}
  for key, name in keys.items():
    if key in fields:
      out[name] = type(out[name])(fields[key])
  if preset not in base_names.get("RECIPE", {}):
    raise ValueError(f"{base_path}: no RECIPE entry for {preset!r}")
  merged = {**base_fields, **fields}
  out.update(batch_size=int(base_names["RECIPE"][preset][0]), micro_batches=int(merged["train.micro_batches"]),
             dpo_loss=str(merged["dpo.loss"]), dpo_beta=float(merged["dpo.beta"]),
             dpo_reference_free=bool(merged["dpo.reference_free"]))
  return out
