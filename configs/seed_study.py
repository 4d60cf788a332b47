r"""The original study, as faithfully as its record allows, to reproduce and compare its loss curve.

Run:
  python -m gpt2_lora_jax.main --config=configs/seed_study.py --workdir=runs/seed_study

From the study's record:
- data: HH-RLHF's helpful-base subset. The study trained on 43,835 rows and tested on 2,354, the
  sizes of helpful-base's train and test splits (trl-internal-testing/hh-rlhf-helpful-base-trl-style
  lists num_examples 43835 / 2354); all four subsets hold 160,800 train rows.
- GPT-2 medium; LoRA rank 1, alpha 1 on qkv, attention output, both MLP matrices and the output head;
- loss on every token (no masking); Adam at a constant 1e-4 (no decay, no clipping);
- ~60k steps of one 1024-token row (about 61M training tokens); loss averaged per 1000 steps;
- 50 prompts answered by the base and the fine-tuned model and scored by the reward model;
- no stop at the next "Human:" turn, no truncation for the reward model, no error bars; the
  study's 1024-token windows crossed conversation boundaries.

Choices made here, not on the record: the `chosen` field of each row; held-out loss on all 2,354
test rows every 5,000 steps; bf16 compute and bf16 base storage (the study's precision is not
recorded; a P100 has no bfloat16 arithmetic); LoRA dropout 0; seed 0; the sampling settings of
config.py (temperature 0.7, at most 128 new tokens). Differences kept on purpose: rows are packed
whole conversations with attention kept inside each, sampling stops at "\n\nHuman:", and the reward
model sees the whole answer and the end of the dialogue (reward.py). Set
--config.data.packing=False to get one conversation per row instead.
"""
from gpt2_lora_jax.config import default_config


def get_config():
  c = default_config()
  c.model.name = "openai-community/gpt2-medium"
  c.model.dtype = "bfloat16"
  c.model.base_param_dtype = "bfloat16"
  c.model.attention_impl = "auto"  # cuDNN attention on NVIDIA GPUs where it applies; XLA elsewhere

  c.lora.rank = 1
  c.lora.alpha = 1.0  # scale alpha / r = 1
  c.lora.dropout = 0.0
  c.lora.targets = ("c_attn", "c_proj", "c_fc", "lm_head")  # c_proj = attention out and MLP out

  c.data.source = "hub"
  c.data.subset = "helpful-base"  # 43,835 train / 2,354 test rows, as the study had
  c.data.loss_mask = "all"  # the study trained on every token, Human turns included
  c.data.max_length = 1024
  c.data.max_eval_rows = 0  # every test row (no sample; prompts are still drawn with eval.seed)

  c.optim.lr = 1e-4
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 0
  c.optim.weight_decay = 0.0  # plain Adam
  c.optim.clip_norm = 0.0  # the study did not clip

  c.train.batch_size = 1  # one 1024-token row per step
  c.train.steps = 60000
  c.train.log_every = 100
  c.train.eval_every = 5000
  c.train.ckpt_every = 5000
  c.train.plot_every = 5000
  c.train.loss_avg_window = 1000  # the study's curve averaged per 1000 steps

  c.eval.num_prompts = 50  # the study scored 50 answers per model
  return c
