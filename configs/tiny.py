r"""A tiny config for tests: 2 layers, width 32, 64-token rows, a handful of steps.

  python -m gpt2_lora_jax.main --config=configs/tiny.py --workdir=/tmp/tiny
"""
from gpt2_lora_jax.config import default_config


def get_config():
  c = default_config()
  c.model.init = "random"
  c.model.overrides.n_layer = 2
  c.model.overrides.n_embd = 32
  c.model.overrides.n_head = 4
  c.model.overrides.n_positions = 64
  c.model.tokenizer = "offline"
  c.lora.rank = 4
  c.lora.alpha = 8.0
  c.lora.dropout = 0.0
  # The head adapter lets a random-init base learn the answers' token statistics within a few steps.
  c.lora.targets = ("c_attn", "c_proj", "c_fc", "lm_head")
  c.data.source = "demo"
  c.data.demo_rows = 400
  c.data.max_length = 64
  c.data.max_eval_rows = 64  # a held-out pass costs ~1 s on CPU (the 50,257-way head dominates)
  c.optim.lr = 1e-2
  c.optim.warmup_steps = 2
  c.train.batch_size = 8
  c.train.steps = 12
  c.train.log_every = 2
  c.train.eval_every = 6
  c.train.ckpt_every = 4
  c.train.plot_every = 6
  c.train.loss_avg_window = 4
  c.eval.num_prompts = 8
  c.eval.max_new_tokens = 8
  c.eval.batch_size = 8
  c.eval.reward_model = ""
  return c
