r"""A tiny DPO config for tests: configs/tiny.py's model on the demo's preference pairs (the
rejected reply is a wrong answer or a refusal), fresh adapters, a handful of steps.

  python -m gpt2_lora_jax.main --config=configs/tiny_dpo.py --workdir=/tmp/tiny_dpo --mode=dpo
"""
import importlib.util
import os


def _config_file(name: str):
  """Another config of this directory (configs/ is a directory of files, not a package)."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(__file__), f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config():
  c = _config_file("tiny").get_config()
  c.model.overrides.n_positions = 128
  c.data.max_length = 128  # 64 would cut half the pairs (both segments share one row)
  c.data.demo_rows = 200
  c.data.max_eval_rows = 32
  c.dpo.loss = "sigmoid"
  c.dpo.beta = 0.5
  c.optim.lr = 1e-2
  c.train.steps = 24
  c.train.eval_every = 12
  c.train.ckpt_every = 12
  c.train.plot_every = 12
  return c
