"""The optimizer: AdamW + global-norm clipping on trainable leaves, nothing at all on frozen ones.

    optax.multi_transform({'trainable': chain(clip_by_global_norm, adamw(schedule)),
                           'frozen':    set_to_zero()}, labels)      # labels from lora.labels

Why clipping sits inside the 'trainable' branch: multi_transform hands each branch only its own
leaves (the others are masked out), so clip_by_global_norm measures the norm of the trainable
gradients alone. A clip in front of multi_transform would see every gradient, including the frozen
weights' gradients, which value_and_grad does compute (they are not zero, only unused); the norm would
then depend on parameters that never move, and XLA could no longer drop the frozen weight-gradient
matmuls, because the norm would read them. With set_to_zero as the frozen leaves' only consumer, those
matmuls are dead code and the LoRA step costs about 2/3 of a full fine-tuning step.

Optimizer state: AdamW's moments exist only for trainable leaves (masked leaves hold optax.MaskedNode,
no array) and set_to_zero has no state, so a checkpoint of the state never holds the frozen base.
Rank 0 (lora.labels marks every leaf trainable) is full fine-tuning through the same code.

Weight decay (optim.weight_decay > 0) applies to the matmul weights only (kernels and LoRA factors):
leaves whose '/'-joined path matches optim.no_decay (default: biases, layer-norm scales, the wte and
wpe embeddings) are not decayed. karpathy/nanoGPT's configure_optimizers and transformers' Trainer
also leave biases and layer norms undecayed; minGPT left embeddings undecayed too (nanoGPT decays
them). optim.no_decay='' decays every trainable leaf.
"""
from __future__ import annotations

import re

import jax
import optax
from gpt2_lora_jax.errors import UserError

SCHEDULES = ("cosine", "linear", "constant")


def make_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup 0 -> lr over warmup_steps, then cosine to lr * min_lr_ratio at total_steps,
  linear to 0 at total_steps, or constant lr. optim_cfg: config.default_config().optim."""
  lr, warmup = float(optim_cfg.lr), int(optim_cfg.warmup_steps)
  if optim_cfg.schedule not in SCHEDULES:
    raise UserError(f"optim.schedule={optim_cfg.schedule!r}: choose one of {SCHEDULES}")
  if total_steps < 1:
    raise UserError(f"total_steps={total_steps}: must be >= 1")
  if not 0 <= warmup <= total_steps:
    raise UserError(f"optim.warmup_steps={warmup} must be in [0, total_steps={total_steps}]")
  if not lr > 0:
    raise UserError(f"optim.lr={lr}: must be > 0")
  decay_steps = max(total_steps - warmup, 1)
  if optim_cfg.schedule == "cosine":
    after = optax.cosine_decay_schedule(lr, decay_steps, alpha=float(optim_cfg.min_lr_ratio))
  elif optim_cfg.schedule == "linear":
    after = optax.linear_schedule(lr, 0.0, decay_steps)
  else:
    after = optax.constant_schedule(lr)
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def decay_mask(params, no_decay: str):
  """True for each leaf AdamW decays: those whose '/'-joined path no_decay does not fullmatch.
  Works on the masked trees multi_transform hands its branches (frozen leaves are MaskedNodes,
  which have no leaves)."""
  def decays(path, _):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    return not (no_decay and re.fullmatch(no_decay, name))
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim_cfg, total_steps: int, labels) -> optax.GradientTransformation:
  """AdamW (+ clipping by the trainable gradients' global norm) on 'trainable' leaves; frozen
  leaves get zero updates and no state. labels: a tree of 'trainable'/'frozen' (lora.labels)."""
  trainable = []
  if float(optim_cfg.clip_norm) > 0:  # 0 disables clipping
    trainable.append(optax.clip_by_global_norm(float(optim_cfg.clip_norm)))
  weight_decay = float(optim_cfg.weight_decay)
  mask = (lambda params: decay_mask(params, optim_cfg.no_decay)) if weight_decay > 0 else None
  trainable.append(optax.adamw(make_schedule(optim_cfg, total_steps), b1=float(optim_cfg.b1),
                               b2=float(optim_cfg.b2), eps=float(optim_cfg.eps),
                               weight_decay=weight_decay, mask=mask))
  return optax.multi_transform(
      {"trainable": optax.chain(*trainable), "frozen": optax.set_to_zero()}, labels)
