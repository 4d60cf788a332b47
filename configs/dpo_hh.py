r"""Preference tuning on HH-RLHF: LoRA SFT on the `chosen` dialogues, then DPO on the (chosen,
rejected) pairs of the same rows, starting from the SFT adapters; then base vs SFT vs DPO.

Run (one GPU host; the argument picks the size, as in configs/gpt2_hh.py):
  python -m gpt2_lora_jax.main --config=configs/dpo_hh.py:gpt2 --workdir=runs/dpo_hh --mode=preference_study

Stages in the workdir: sft/ (SFT run), dpo/ (DPO run), eval/step_<N>/ (report.md); see study.py.
Only DPO, from an SFT run made elsewhere:
  python -m gpt2_lora_jax.main --config=configs/dpo_hh.py:gpt2 --workdir=runs/dpo_only --mode=dpo \
      --config.dpo.init_from=runs/gpt2_hh
(that run must have the same base and LoRA layout: rank, alpha, targets).
"""
import importlib.util
import os


def _config_file(name: str):
  """Another config of this directory (configs/ is a directory of files, not a package)."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(__file__), f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(size: str = "gpt2"):
  c = _config_file("gpt2_hh").get_config(size)  # model, LoRA layout, data, SFT schedule
  # No dropout in the SFT stage either, as TRL's DPOConfig (disable_dropout=True). The DPO forward is
  # deterministic whatever this says, so DPO starts exactly at its reference, the SFT model (loss log 2
  # and margin 0 at step 0).
  c.lora.dropout = 0.0

  # The loss (dpo_losses.py has each formula and its paper; --mode=show_config lists every dpo key):
  # 'sigmoid' (DPO), 'conservative' (cDPO) or 'robust' (rDPO) with label_smoothing, 'hinge' (SLiC),
  # 'ipo', 'sigmoid_norm', 'simpo' (reference-free, margin simpo_gamma), 'sft'; several joined by
  # commas and weighted, e.g. loss='sigmoid,sft' with loss_weights=(1.0, 0.2) (or rpo_alpha=0.2).
  c.dpo.loss = "sigmoid"
  c.dpo.loss_weights = ()  # 1 for each loss
  c.dpo.beta = 0.1  # TRL's DPOConfig default
  c.dpo.label_smoothing = 0.0
  c.dpo.reference_free = False  # True: reference log-probs 0, no reference forward
  c.dpo.rpo_alpha = 0.0  # > 0 adds that weight x the chosen reply's NLL per token
  c.dpo.simpo_gamma = 0.5  # 'simpo' only (TRL's CPOConfig default)
  # About one epoch of pairs: on the harmless-base test split 2,303 pairs pack into 745 rows of 1024
  # tokens (3.1 a row, measured with preference.build); HH-RLHF's 160,800 train rows then make ~52k
  # rows, ~1,600 steps at batch 32.
  c.dpo.steps = 1600
  c.dpo.lr = c.optim.lr / 10  # a starting point, not tuned here: DPO moves a model already fitted
  c.dpo.init_from = ""  # --mode=preference_study sets it to <workdir>/sft
  return c
