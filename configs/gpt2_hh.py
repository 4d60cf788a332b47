r"""The recommended recipe: LoRA SFT of a pretrained GPT-2 on all of HH-RLHF's `chosen` dialogues.

Run (one GPU host, all its GPUs; the argument picks the size):
  python -m gpt2_lora_jax.main --config=configs/gpt2_hh.py:gpt2-medium --workdir=runs/gpt2m_hh

Sizes: gpt2 (124M), gpt2-medium (355M), gpt2-large (774M), gpt2-xl (1.5B).
"""
from gpt2_lora_jax.config import default_config

# Per size: (global batch of 1024-token rows, peak learning rate). Smaller models take larger steps.
RECIPE = {
    "gpt2": (32, 3e-4),
    "gpt2-medium": (32, 2e-4),
    "gpt2-large": (32, 1.5e-4),
    "gpt2-xl": (32, 1e-4),
}

# Per size, whether the blocks run under nn.scan. gpt2 unrolled: on one H200 its train step at PEFT's
# setting took 37.98 ms unrolled against 51.34 ms scanned (7.5 against 13.4 GiB of temporaries),
# compiled in 8.9 s (benchmarks/results/explore_h200_20261204.md). The larger sizes stay scanned
# until measured unrolled: the unrolled gpt2-xl step spent 32 s lowering and had not compiled 25 s
# later (the same file), against a 60 s budget for a step's compile.
SCAN_LAYERS = {"gpt2": False, "gpt2-medium": True, "gpt2-large": True, "gpt2-xl": True}


def get_config(size: str = "gpt2"):
  if size not in RECIPE:
    raise ValueError(f"configs/gpt2_hh.py:{size}: choose one of {sorted(RECIPE)}")
  batch, lr = RECIPE[size]
  c = default_config()
  c.model.name = f"openai-community/{size}"  # hub id; a local HF directory works too
  c.model.tokenizer = "gpt2"  # or 'offline': the same BPE, bundled
  c.model.dtype = "bfloat16"  # bf16 compute on GPU/TPU (use float32 on CPU)
  c.model.base_param_dtype = "bfloat16"  # the frozen base in bf16; adapters + Adam stay fp32
  # cuDNN attention on NVIDIA GPUs where it applies (each path checked once against XLA before its
  # first use, attention.py); XLA on CPU and TPU.
  c.model.attention_impl = "auto"
  # Blocks under nn.scan (SCAN_LAYERS): scanned, the gpt2-xl step compiles ~5x faster on CPU
  # (benchmarks/README.md, "Compile time, memory plan and remat per size"); unrolled, gpt2 runs faster.
  c.model.scan_layers = SCAN_LAYERS[size]
  # The first of 'none', 'dots', 'full' whose compiled train step fits the device's memory, chosen on
  # the device at hand (remat.py: a GPU's plan is far below the CPU's, and it depends on the batch,
  # micro-batches and mesh); the log names the choice and every policy's figure.
  c.model.remat = "auto"

  c.lora.rank = 16  # a choice, not tuned here
  c.lora.alpha = 32.0  # scale alpha / r = 2
  c.lora.dropout = 0.05
  c.lora.targets = ("c_attn", "c_proj", "c_fc")  # every block linear (attention and MLP)

  c.data.source = "hub"  # Anthropic/hh-rlhf, all four subsets, split 'train' / held-out 'test'
  c.data.subset = "all"
  c.data.loss_mask = "assistant"  # learn to answer, not to imitate the Human turns
  c.data.max_length = 1024
  c.data.packing = True
  # Held-out rows: a seeded sample of 2,000 test rows stratified over the subsets in use (data.py),
  # for held-out loss, preference accuracy and the evaluation's prompts alike.
  c.data.max_eval_rows = 2000
  c.data.eval_seed = 0

  c.optim.lr = lr
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 100
  c.optim.weight_decay = 0.0  # decay on low-rank adapters mostly shrinks them towards the base
  c.optim.clip_norm = 1.0

  c.train.batch_size = batch
  c.train.micro_batches = 1  # raise if a device runs out of memory
  c.train.steps = 3000  # 3000 x 32 rows x 1024 = 98M token positions; the epochs that makes:
  # steps_per_epoch in the run's data_summary.json
  c.train.log_every = 10
  c.train.eval_every = 250
  c.train.ckpt_every = 250
  c.train.plot_every = 250
  c.train.loss_avg_window = 100

  c.eval.num_prompts = 500  # drawn from the held-out sample, stratified the same way (eval.seed)
  return c
