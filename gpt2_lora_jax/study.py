"""SFT, then DPO from the SFT adapters, then base vs SFT vs DPO: the stages of one workdir.

  <workdir>/sft/   the SFT run on data.field texts (train.run): checkpoints, metrics.jsonl, loss.png
  <workdir>/dpo/   DPO on the same rows' (chosen, rejected) pairs, its policy starting from the SFT
                   adapters and its reference the SFT model (dpo.py): checkpoints, metrics.jsonl,
                   loss.png, preference.png
  <workdir>/eval/  the three models on the same seeded held-out prompts, scored by the same reward
                   model, and report.md (evaluate.compare)
A stage that already finished is skipped, one that stopped resumes (train.run's checkpoints).
"""
from __future__ import annotations

import os

from gpt2_lora_jax import dpo, evaluate, experiment, reward_filter, train
from gpt2_lora_jax.errors import UserError

SFT_DIR, DPO_DIR = "sft", "dpo"


def dpo_config(config, init_from: str):
  """The DPO stage's config: dpo.steps and dpo.lr in place of train.steps and optim.lr when set."""
  dpo.check_config(config.dpo)
  c = config.copy_and_resolve_references()
  if c.dpo.steps > 0:
    c.train.steps = c.dpo.steps
  if c.dpo.lr > 0:
    c.optim.lr = c.dpo.lr
  c.dpo.init_from = init_from
  return c


def check_no_reward_filter(config):
  """DPO trains on every pair: data.reward_filter (SFT rows by the reward of their final reply) is refused
  rather than ignored."""
  if reward_filter.active(config.data):
    raise UserError("data.reward_filter filters SFT training rows, and DPO does not filter its pairs: train "
                    "the SFT stage with it (--mode=train), then DPO from that run without it "
                    "(--mode=dpo --config.dpo.init_from=<that workdir> --config.data.reward_filter.keep_fraction=1.0 "
                    "--config.data.reward_filter.min_reward=-inf)")


def train_dpo(config, workdir: str) -> dict:
  """--mode=dpo: DPO in `workdir`, the policy's adapters from dpo.init_from ('' = fresh)."""
  check_no_reward_filter(config)
  config = dpo_config(config, config.dpo.init_from)
  exp = experiment.build(config)
  dpo.start(exp, workdir)  # the policy's starting adapters (its reference) and what resuming checks
  return train.run(exp, workdir, dpo.objective)


def run(config, workdir: str) -> str:
  """--mode=preference_study: SFT -> DPO -> three-way evaluation; returns the report's path."""
  dpo.check_config(config.dpo)  # before an SFT stage trains
  check_no_reward_filter(config)
  sft_dir, dpo_dir = os.path.join(workdir, SFT_DIR), os.path.join(workdir, DPO_DIR)
  train.run(experiment.build(config), sft_dir)
  train_dpo(dpo_config(config, sft_dir), dpo_dir)
  return evaluate.compare(config, workdir, {evaluate.SFT: sft_dir, evaluate.DPO: dpo_dir})
