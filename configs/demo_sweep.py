r"""The offline demo as a sweep: does a higher learning rate help, and does reward-filtered data?

  python -m gpt2_lora_jax.main --config=configs/demo_sweep.py --workdir=/tmp/gpt2_lora_demo_sweep --mode=sweep

The recipe is configs/demo.py (a small GPT-2 pre-trained from random weights on wrong replies, then
LoRA on the right ones, CPU, nothing downloaded), except that 40% of its training rows end in a wrong
reply (data.demo_wrong_share), as real HH-RLHF "chosen" replies are sometimes poor, so that the reward
filter has something to find. The runs, each 150 LoRA steps on the same pre-trained base:
  - every training row, the top 50% and the top 25% by the demo scorer's reward of their final reply
    (data.reward_filter.keep_fraction; the scores are computed once and cached in <workdir>/cache);
  - the recipe's learning rate (8e-3) and a quarter of it, on every row.
Every run answers the same 96 held-out prompts (greedy), graded by each task's key fact and scored
by the demo scorer; sweep_report.md ranks the runs by the paired reward difference over the base
and compares the best with every other run (paired bootstrap, Holm). The demo scorer is a tiny
classifier trained on the demo's right vs wrong replies, not a judge of answer quality.
"""
import importlib.util
import os


def get_config():
  spec = importlib.util.spec_from_file_location("demo_config", os.path.join(os.path.dirname(__file__), "demo.py"))
  demo = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(demo)
  c = demo.get_config()
  c.data.demo_wrong_share = 0.4
  c.eval.num_prompts = 96
  c.sweep.grid = (("data.reward_filter.keep_fraction", (1.0, 0.5, 0.25)),)
  c.sweep.runs = ((("optim.lr", 2e-3),),)
  c.sweep.metric = "reward_difference"
  return c
