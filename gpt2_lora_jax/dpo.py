"""Direct preference optimisation on packed pairs (preference.py): per-reply log-probs, the reference,
the loss as a train-step loss_fn, and the adapters the policy starts from. The losses and the checks
of the dpo.* settings are in dpo_losses.py.

The forward is deterministic whatever lora.dropout says (TRL's DPOConfig disable_dropout=True): with
adapter dropout the policy's first forward differs from its reference's and DPO does not start at its
reference (loss log 2 + 0.065 and margin -0.117 at the first step from SFT adapters trained with
lora.dropout=0.05, fp32). The run says so once in its log.

The reference. It is the model the policy starts from: the frozen base plus the adapters at the start
(the SFT adapters when dpo.init_from names an SFT run, else the fresh ones). A copy of those adapters
rides in the step's frozen tree (train.Objective.initial_copy_key; never trained, never saved: its
identity is recorded with every checkpoint, see start()). Each step computes the reference's log-probs
by the very forward it runs for the policy: dpo_forward.policy_and_reference runs one loop body over
the two adapter trees [reference, policy], so both come out of the same compiled code on the same
rows grouped the same way, and only the policy's iteration is differentiated (a custom VJP keeps the
policy's residuals and runs its backward once: the reference costs one forward). At the first step
the two trees are equal and so, bitwise, are the two results: loss log 2 and margin 0 exactly, on
any number of devices and in bf16. Held-out evaluation runs the same loss_fn. Reference-free
settings (dpo.reference_free, 'simpo', 'sft') run the policy only.

The cost (tests/test_dpo_cost.py, CPU compiler). The step's matmul FLOPs, each loop counted per trip,
are exactly those of the reference-free step plus one forward over the same rows. The design this
replaced (jax.lax.map over both trees inside the differentiated loss) also ran the loop's backward for
the reference, its result discarded: twice the forward and backward work of a reference-free step.
Two alternatives were measured and rejected. A reference log-prob cache filled in one pass before
the first step was another program with another row grouping: a bf16 base started ~5e-4 off log 2
on one device, and 1 vs 2 devices gave reference log-probs up to 0.045 nats apart. A reference
forward traced apart from the policy's inside the same step (outside the value_and_grad) started
5.6e-5 off log 2 on one device (bf16, unscanned blocks, 2 micro-batches; test_dpo_reference.py's
case). Here the first step's loss is float32's log 2 (0.6931471824645996, 1.9e-9 from log 2) and its
margin 0 on 1, 4 and 8 CPU devices, bf16 base and compute, with micro-batches, scanned and unscanned
blocks (tests/test_dpo_reference.py).
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from gpt2_lora_jax import dpo_losses, lora
from gpt2_lora_jax.dpo_forward import policy_and_reference, reply_logps, reply_stats  # noqa: F401  (dpo.reply_logps)
from gpt2_lora_jax.dpo_losses import LOSSES, check_config, loss  # noqa: F401  (dpo.check_config, dpo.loss)
from gpt2_lora_jax.errors import UserError

# Top-level key of the step's frozen tree that holds the reference adapters (train.Objective).
REFERENCE_KEY = "dpo_reference"


def make_loss_fn(model, dpo_cfg):
  """The DPO loss as a train-step loss_fn: (loss summed over pairs, pairs, {metric: sum over pairs}).

  `frozen` holds the base and, unless the settings are reference-free, the reference adapters under
  REFERENCE_KEY. rng is unused: the forward is deterministic. The batch carries pair_mask (B, J);
  J (pairs a row can hold) is read from its shape. Metrics, as TRL's DPOTrainer logs them (rewards/*,
  logps/*, logits/*), each a mean over pairs: reward_chosen, reward_rejected, margin, accuracy (ties
  count half), logp_chosen, logp_rejected, ref_logp_chosen, ref_logp_rejected, logits_chosen and
  logits_rejected (the mean over a reply's tokens of the mean logit over the vocabulary).
  """
  check_config(dpo_cfg)
  with_reference = dpo_losses.uses_reference(dpo_cfg)

  def loss_fn(trainable, frozen, mbatch, rng):
    del rng  # deterministic (TRL's disable_dropout)
    base = {k: v for k, v in frozen.items() if k != REFERENCE_KEY}
    J = mbatch["pair_mask"].shape[-1]
    if with_reference:
      policy, ref = policy_and_reference(model, trainable, frozen[REFERENCE_KEY], base, mbatch, 2 * J)
      ref_BJ2 = ref["logps"].reshape(-1, J, 2)
    else:
      policy = reply_stats(model, lora.combine(trainable, base), mbatch, 2 * J)
      ref_BJ2 = jnp.zeros_like(policy["logps"]).reshape(-1, J, 2)
    policy_BJ2, tokens_BJ2 = policy["logps"].reshape(-1, J, 2), policy["tokens"].reshape(-1, J, 2)
    logits_BJ2 = policy["logit_sums"].reshape(-1, J, 2) / jnp.maximum(tokens_BJ2, 1.0)
    mask_BJ = mbatch["pair_mask"]
    args = (policy_BJ2[..., 0], policy_BJ2[..., 1], ref_BJ2[..., 0], ref_BJ2[..., 1])
    losses = dpo_losses.combined_loss(*args, tokens_BJ2[..., 0], tokens_BJ2[..., 1], dpo_cfg)
    chosen_reward, rejected_reward = dpo_cfg.beta * (args[0] - args[2]), dpo_cfg.beta * (args[1] - args[3])
    total = lambda x: jnp.sum(jax.lax.stop_gradient(x) * mask_BJ)
    wins = (chosen_reward > rejected_reward).astype(jnp.float32) + 0.5 * (chosen_reward == rejected_reward)
    aux = {"reward_chosen": total(chosen_reward), "reward_rejected": total(rejected_reward),
           "margin": total(chosen_reward - rejected_reward), "accuracy": total(wins),
           "logp_chosen": total(policy_BJ2[..., 0]), "logp_rejected": total(policy_BJ2[..., 1]),
           "ref_logp_chosen": total(ref_BJ2[..., 0]), "ref_logp_rejected": total(ref_BJ2[..., 1]),
           "logits_chosen": total(logits_BJ2[..., 0]), "logits_rejected": total(logits_BJ2[..., 1])}
    return jnp.sum(losses * mask_BJ), jnp.sum(mask_BJ), aux

  return loss_fn


@functools.partial(jax.jit, static_argnames=("model", "num_replies"))
def _forward_logps(model, params, batch, num_replies: int):
  """reply_logps compiled once per (model, shapes): modules compare by value."""
  return reply_logps(model, params, batch, num_replies)


def reference_logps(model, trainable, frozen, pairs, mesh, batch_size: int, local: bool = False) -> np.ndarray:
  """(N, J, 2) log-probs of every reply under trainable + frozen (no dropout): one pass over `pairs`
  (evaluation's held-out preference accuracy of each model).

  Every process passes the same (placed) trees and gets the whole array (an all-gather of each batch).
  local: `mesh` holds this process's devices only and it reads every row itself (evaluation).
  """
  process_index, process_count = (0, 1) if local else (jax.process_index(), jax.process_count())
  from gpt2_lora_jax import preference, sharding
  R = 2 * pairs.pairs_per_row
  params = lora.combine(trainable, frozen)
  out = np.zeros((pairs.num_rows, pairs.pairs_per_row, 2), np.float32)
  for first, batch in zip(range(0, pairs.num_rows, batch_size),
                          preference.eval_batches(pairs, batch_size, process_index, process_count)):
    logps = _forward_logps(model, params, sharding.global_batch(batch, mesh), R)
    logps = sharding.fetch_to_host(logps).reshape(-1, pairs.pairs_per_row, 2)
    n = min(batch_size, pairs.num_rows - first)
    out[first:first + n] = logps[:n]
  return out * pairs.pair_mask()[..., None]


def forward_note(config) -> str:
  """The one log line on the forward's dropout."""
  return (f"DPO: deterministic forward (lora.dropout={config.lora.dropout} is not applied, as TRL's "
          "disable_dropout); the reference's log-probs come from the same forward in every step"
          if dpo_losses.uses_reference(config.dpo) else
          f"DPO: deterministic forward (lora.dropout={config.lora.dropout} is not applied, as TRL's "
          f"disable_dropout); reference-free (dpo.loss={config.dpo.loss!r}, "
          f"dpo.reference_free={config.dpo.reference_free})")


def objective(exp, cache_dir):
  """train.Objective for DPO on the (chosen, rejected) pairs of config.data (see train.run)."""
  from gpt2_lora_jax import metrics as metrics_lib, preference, train
  cfg = exp.config
  loss_fn = make_loss_fn(exp.model, cfg.dpo)
  if jax.process_index() == 0:
    print(forward_note(cfg), flush=True)

  def build_data(split, log):
    return preference.build(cfg.data, exp.tokenizer, split, cfg.train.batch_size, cache_dir, log=log)

  def plot(workdir, window):
    metrics_lib.plot_loss(workdir, window)
    plot_preference_metrics(metrics_lib.read(os.path.join(workdir, metrics_lib.METRICS_FILE)),
                            os.path.join(workdir, PREFERENCE_PLOT), window)

  return train.Objective(
      build_data=build_data, batch_for_step=preference.batch_for_step,
      eval_batches=preference.eval_batches, loss_fn=loss_fn,
      loss_fn_for=lambda model: make_loss_fn(model, cfg.dpo),
      eval_fn=lambda trainable, frozen, batch: loss_fn(trainable, frozen, batch, None),
      denominator_name="pairs", plot=plot,
      initial_copy_key=REFERENCE_KEY if dpo_losses.uses_reference(cfg.dpo) else "")


PREFERENCE_PLOT = "preference.png"


def plot_preference_metrics(records: list[dict], path: str, window: int):
  """Preference accuracy (train, mean per `window` steps, and held-out) and the reward margin."""
  from gpt2_lora_jax import metrics as metrics_lib
  train = [r for r in records if r["split"] == "train" and "accuracy" in r]
  held_out = [r for r in records if r["split"] == "eval" and "accuracy" in r]
  if not train or "://" in path:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (acc, margin) = plt.subplots(1, 2, figsize=(11, 4))
  steps = [r["step"] for r in train]
  for ax, key, label in ((acc, "accuracy", "preference accuracy"), (margin, "margin", "reward margin")):
    values = [r[key] for r in train]
    ax.plot(steps, values, lw=0.6, alpha=0.4, label=f"train {label} (logged steps)")
    centers, means = metrics_lib.window_means(steps, values, window)
    ax.plot(centers, means, lw=2, label=f"train, mean per {window} steps")
    if held_out:
      ax.plot([r["step"] for r in held_out], [r[key] for r in held_out], lw=2, marker="s",
              color="tab:red", label=f"held-out {label}")
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  acc.set_title("DPO: share of pairs with chosen reward > rejected")
  margin.set_title("DPO: beta (log-ratio chosen - log-ratio rejected)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


# --- where the policy starts, and the reference it is measured against -------------------------------

def init_adapters(exp, init_from: str, step: int | None = None) -> tuple[dict, dict]:
  """(exp.params with the trainable leaves of the SFT checkpoint at `init_from`, the reference's
  identity for experiment.run_settings). init_from: a workdir, its checkpoints/ dir or one step's
  dir ('' = exp.params' fresh adapters); step: that checkpoint step (None: the one init_from names,
  else the latest). Refuses another base or layout. Every process gets the full host values."""
  from gpt2_lora_jax import checkpoint, sharding
  if not init_from:
    trainable, _ = lora.split(exp.params, exp.labels)
    return exp.params, reference_identity("", None, trainable)
  trainable, saved_meta, where, step = checkpoint.read_trainable(init_from, step)
  # Dropout is how an adapter trains, not what it is: the DPO run may use another rate.
  expected = dict(exp.meta, lora=dict(exp.meta["lora"], dropout=saved_meta.get("lora", {}).get("dropout")))
  try:
    checkpoint.check_meta(saved_meta, expected, where)
  except checkpoint.CheckpointMismatchError as e:
    raise checkpoint.CheckpointMismatchError(
        f"dpo.init_from={init_from!r}: {e} DPO starts from an SFT run of the same base and LoRA "
        "layout (or set dpo.init_from='' to start from fresh adapters).") from None
  trainable = sharding.fetch_to_host(trainable)  # leaves of an fsdp run may span processes
  _, frozen = lora.split(exp.params, exp.labels)
  return (lora.combine(trainable, frozen),
          reference_identity(checkpoint.checkpoints_dir(init_from)[0], step, trainable))


def reference_identity(directory: str, step: int | None, trainable) -> dict:
  """What a DPO checkpoint records about its reference: the checkpoints directory dpo.init_from
  resolves to ('' for fresh adapters), its step and an exact fingerprint of its adapters."""
  from gpt2_lora_jax import checkpoint
  return {"dpo.init_from": directory, "dpo.reference_step": step,
          "dpo.reference_fingerprint": checkpoint.tree_fingerprint(trainable)}


def start(exp, workdir: str):
  """Sets exp.params (the policy's starting adapters: the reference) and exp.meta['run'] (dpo.*
  settings and the reference's identity, which resuming checks) for DPO in `workdir`.

  Resuming, the reference is reloaded from the step that workdir's checkpoint recorded, not from
  dpo.init_from's latest checkpoint (which may have moved on since); if that step no longer exists
  the run is refused, unless train.allow_changed_config (then the latest step, and the change is
  named when the checkpoint is restored).
  """
  from gpt2_lora_jax import checkpoint, experiment
  cfg = exp.config
  init_from = cfg.dpo.init_from
  saved = checkpoint.latest_meta(workdir)
  recorded = (saved[1].get("run") or {}) if saved else {}
  step = None
  if init_from and recorded.get("dpo.init_from") == checkpoint.checkpoints_dir(init_from)[0]:
    step = recorded.get("dpo.reference_step")
    try:
      exp.params, identity = init_adapters(exp, init_from, step)
    except FileNotFoundError as e:
      if not cfg.train.allow_changed_config:
        raise UserError(
            f"dpo.init_from={init_from!r}: the DPO run in {workdir} was trained against step {step} of it, "
            f"which is gone ({e}); resuming against another reference would change its loss. Restore "
            f"that checkpoint, start DPO in a fresh --workdir, or pass "
            f"{checkpoint.ALLOW_FLAG} to continue against the latest step.") from None
      exp.params, identity = init_adapters(exp, init_from)
  else:
    exp.params, identity = init_adapters(exp, init_from)
  exp.meta["run"] = experiment.run_settings(cfg, identity)
