"""The two train settings of the GPU check: what users run (configs/gpt2_hh.py) and what PEFT is
timed at. Standard library only: configs/gpt2_hh.py is read, not imported (importing it needs
ml_collections, which a GPU machine may lack)."""
from __future__ import annotations

import ast
import os

USER_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs", "gpt2_hh.py")
# What PEFT is timed at (peft_peer.py): LoRA r8, alpha 16, no dropout, no remat, no scan.
LIKE_PEFT = {"lora_rank": 8, "lora_alpha": 16.0, "lora_dropout": 0.0, "scan_layers": False, "remat": "none"}


def user_settings(preset: str, path: str = USER_CONFIG) -> dict:
  """BenchConfig fields of what configs/gpt2_hh.py:<preset> runs, read from the file's syntax tree
  (importing it needs ml_collections, which a GPU machine may lack): its `c.model.*` and `c.lora.*`
  literals, the same for every size (remat 'auto' included: the benchmark chooses as a run does).
  tests/test_bench.py checks them against the loaded config."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  found = {}
  for node in ast.walk(tree):
    if not isinstance(node, ast.Assign) or len(node.targets) != 1:
      continue
    target = node.targets[0]
    if (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Attribute)
        and isinstance(target.value.value, ast.Name) and target.value.attr in ("model", "lora")):
      try:
        found[f"{target.value.attr}.{target.attr}"] = ast.literal_eval(node.value)
      except ValueError:  # not a literal (e.g. f"openai-community/{size}"): not a benchmark field
        pass
  return {"lora_rank": int(found["lora.rank"]), "lora_alpha": float(found["lora.alpha"]),
          "lora_dropout": float(found["lora.dropout"]), "lora_targets": tuple(found["lora.targets"]),
          "scan_layers": bool(found["model.scan_layers"]), "remat": found["model.remat"],
          "attention": found["model.attention_impl"], "dtype": found["model.dtype"],
          "param_dtype": found["model.base_param_dtype"]}
