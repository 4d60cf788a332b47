"""Direct preference optimisation on packed pairs (preference.py): the loss, per-reply log-probs, the
reference, and the policy's starting adapters.

Losses (dpo.loss), per pair, with log-ratios c = log pi(y_w|x) - log ref(y_w|x) for the chosen reply
and r = log pi(y_l|x) - log ref(y_l|x) for the rejected one (Rafailov et al. 2023, Eq. 7):
  'sigmoid'       -log sigmoid(beta (c - r))
  'conservative'  cDPO (Mitchell 2023): labels flipped with probability eps = dpo.label_smoothing,
                  -(1 - eps) log sigmoid(beta (c - r)) - eps log sigmoid(-beta (c - r))
  'ipo'           IPO (Azar et al. 2023, Eq. 17): (c' - r' - 1 / (2 beta))^2, where c', r' are the
                  log-ratios per reply token, as TRL's DPOTrainer computes IPO (its comment: the
                  paper's results correspond to this length-normalised form, confirmed with the authors).
Implicit rewards are beta c and beta r; accuracy is the share of pairs with beta c > beta r.

The reference. It is the model the policy starts from: the frozen base, plus the SFT adapters when
dpo.init_from names an SFT run (those adapters are where the policy starts). Its log-probs are
computed once, before the first step, by one forward pass over every packed row with the initial
policy (no dropout), and cached as PreferenceData.ref_logps (8 bytes a pair); batches carry them.
So no second model (and no second copy of the base or of the adapters) is ever held, and the train
step costs what an SFT step on the same tokens costs. The trade-off against computing them in every
step: the up-front pass is a forward over the whole split (about a third of an epoch's compute, the
forward of a training step without its backward), paid again on every start and resume (the pass
rebuilds it from dpo.init_from); for runs shorter than about a third of an epoch on-the-fly would be
cheaper. A pair sees exactly the same reference numbers in every epoch.
"""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from gpt2_lora_jax import lora
from gpt2_lora_jax import loss as loss_lib
from gpt2_lora_jax.errors import UserError

LOSSES = ("sigmoid", "conservative", "ipo")


def check_config(dpo_cfg):
  """Errors naming the setting, before anything is loaded."""
  problems = []
  if not dpo_cfg.beta > 0:
    problems.append(f"dpo.beta={dpo_cfg.beta}: must be > 0 (DPO's usual range is 0.01 to 0.5)")
  if dpo_cfg.loss not in LOSSES:
    problems.append(f"dpo.loss={dpo_cfg.loss!r}: choose one of {LOSSES}")
  elif dpo_cfg.loss == "conservative" and not 0.0 < dpo_cfg.label_smoothing < 0.5:
    problems.append(f"dpo.label_smoothing={dpo_cfg.label_smoothing}: dpo.loss='conservative' needs it "
                    "in (0, 0.5), the probability that a pair's labels are flipped")
  elif dpo_cfg.loss != "conservative" and dpo_cfg.label_smoothing != 0.0:
    problems.append(f"dpo.label_smoothing={dpo_cfg.label_smoothing} applies only to "
                    "dpo.loss='conservative'; set it to 0 or choose that loss")
  if problems:
    raise UserError("invalid config:\n  " + "\n  ".join(problems))


def loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta: float, kind: str = "sigmoid",
         label_smoothing: float = 0.0, chosen_tokens=None, rejected_tokens=None):
  """(per-pair loss, chosen reward, rejected reward) from summed reply log-probs, all shaped alike.

  chosen_tokens / rejected_tokens: reply lengths in tokens (needed by 'ipo' only).
  """
  if not beta > 0:
    raise UserError(f"dpo.beta={beta}: must be > 0")
  chosen_ratio = policy_chosen - ref_chosen
  rejected_ratio = policy_rejected - ref_rejected
  if kind == "ipo":
    delta = (chosen_ratio / jnp.maximum(chosen_tokens, 1.0)
             - rejected_ratio / jnp.maximum(rejected_tokens, 1.0))
    losses = (delta - 1.0 / (2.0 * beta)) ** 2
  elif kind in ("sigmoid", "conservative"):
    z = beta * (chosen_ratio - rejected_ratio)
    eps = label_smoothing if kind == "conservative" else 0.0
    losses = -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)
  else:
    raise UserError(f"dpo.loss={kind!r}: choose one of {LOSSES}")
  return losses, beta * chosen_ratio, beta * rejected_ratio


def reply_logps(model, params, batch, rng, deterministic: bool, num_replies: int,
                chunk: int = loss_lib.DEFAULT_CHUNK):
  """(B, R) log-probability of each reply of each row, summed over its own target tokens only.

  batch: a preference batch (inputs, targets, positions, segment_ids, reply_index (B, T) with -1
  off replies). R = num_replies = 2 J. The head is the supervised loss's (loss.token_logps: fp32
  accumulated logits, `chunk` positions at a time, never the whole batch's logits).
  """
  rngs = None if deterministic else {"dropout": rng}
  h_BTD = model.apply({"params": params}, batch["inputs"], position_ids=batch["positions"],
                      segment_ids=batch["segment_ids"], deterministic=deterministic, rngs=rngs,
                      return_hidden=True)
  cfg = model.config
  spec = loss_lib.HeadSpec(vocab_size=cfg.vocab_size, tied=cfg.tie_word_embeddings, dtype=cfg.dtype,
                           lora_scale=float(model.lora_scale or 0.0), lora_dropout=model.lora_dropout,
                           deterministic=deterministic, chunk=chunk)
  logp_BT = loss_lib.token_logps(h_BTD, loss_lib.head_from_params(params, cfg.tie_word_embeddings),
                                 batch["targets"], spec, None if deterministic else rng)
  onehot_BTR = (batch["reply_index"][..., None] == jnp.arange(num_replies)).astype(jnp.float32)
  return jnp.einsum("bt,btr->br", logp_BT, onehot_BTR)


def reply_tokens(batch, num_replies: int):
  """(B, R) target tokens of each reply."""
  return jnp.sum(batch["reply_index"][..., None] == jnp.arange(num_replies), axis=1).astype(jnp.float32)


METRICS = ("reward_chosen", "reward_rejected", "margin", "accuracy", "logp_chosen", "logp_rejected",
           "ref_logp_chosen", "ref_logp_rejected")


def make_loss_fn(model, dpo_cfg):
  """The DPO loss as a train-step loss_fn: (loss summed over pairs, pairs, {metric: sum over pairs}).

  rng None: deterministic (held-out evaluation). The batch carries pair_mask (B, J) and the cached
  ref_logps (B, J, 2); J (pairs a row can hold) is read from their shape.
  """
  check_config(dpo_cfg)

  def loss_fn(trainable, frozen, mbatch, rng):
    J = mbatch["pair_mask"].shape[-1]
    R = 2 * J
    params = lora.combine(trainable, frozen)
    policy_BJ2 = reply_logps(model, params, mbatch, rng, rng is None, R).reshape(-1, J, 2)
    tokens_BJ2 = reply_tokens(mbatch, R).reshape(-1, J, 2)
    ref_BJ2 = mbatch["ref_logps"]
    mask_BJ = mbatch["pair_mask"]
    losses, chosen_reward, rejected_reward = loss(
        policy_BJ2[..., 0], policy_BJ2[..., 1], ref_BJ2[..., 0], ref_BJ2[..., 1], beta=dpo_cfg.beta,
        kind=dpo_cfg.loss, label_smoothing=dpo_cfg.label_smoothing, chosen_tokens=tokens_BJ2[..., 0],
        rejected_tokens=tokens_BJ2[..., 1])
    total = lambda x: jnp.sum(x * mask_BJ)
    aux = {"reward_chosen": total(chosen_reward), "reward_rejected": total(rejected_reward),
           "margin": total(chosen_reward - rejected_reward),
           "accuracy": total((chosen_reward > rejected_reward).astype(jnp.float32)),
           "logp_chosen": total(policy_BJ2[..., 0]), "logp_rejected": total(policy_BJ2[..., 1]),
           "ref_logp_chosen": total(ref_BJ2[..., 0]), "ref_logp_rejected": total(ref_BJ2[..., 1])}
    return total(losses), jnp.sum(mask_BJ), aux

  return loss_fn


def reference_logps(model, trainable, frozen, pairs, mesh, batch_size: int) -> np.ndarray:
  """(N, J, 2) log-probs of every reply under trainable + frozen (no dropout): one pass over `pairs`.

  Every process passes the same (placed) trees and gets the whole array (an all-gather of each batch).
  """
  from gpt2_lora_jax import preference, sharding
  R = 2 * pairs.pairs_per_row
  fn = jax.jit(lambda t, f, b: reply_logps(model, lora.combine(t, f), b, None, True, R),
               out_shardings=sharding.batch_sharding(mesh))
  out = np.zeros((pairs.num_rows, pairs.pairs_per_row, 2), np.float32)
  for first, local in zip(range(0, pairs.num_rows, batch_size),
                          preference.eval_batches(pairs, batch_size, jax.process_index(), jax.process_count())):
    local.pop("ref_logps", None)
    logps = fn(trainable, frozen, sharding.global_batch(local, mesh))
    logps = sharding.fetch_to_host(logps).reshape(-1, pairs.pairs_per_row, 2)
    n = min(batch_size, pairs.num_rows - first)
    out[first:first + n] = logps[:n]
  return out * pairs.pair_mask()[..., None]


def objective(exp, cache_dir):
  """train.Objective for DPO on the (chosen, rejected) pairs of config.data (see train.run)."""
  from gpt2_lora_jax import metrics as metrics_lib, preference, train
  cfg = exp.config
  loss_fn = make_loss_fn(exp.model, cfg.dpo)

  def build_data(split, log):
    return preference.build(cfg.data, exp.tokenizer, split, cfg.train.batch_size, cache_dir, log=log)

  def prepare(train_pairs, eval_pairs, state, frozen, mesh):
    """The reference log-probs: the initial policy (the reference) over every pair, once."""
    ref = lambda pairs: None if pairs is None else dataclasses.replace(pairs, ref_logps=reference_logps(
        exp.model, state["trainable"], frozen, pairs, mesh, cfg.train.batch_size))
    return ref(train_pairs), ref(eval_pairs)

  def plot(workdir, window):
    metrics_lib.plot_loss(workdir, window)
    plot_preference_metrics(metrics_lib.read(os.path.join(workdir, metrics_lib.METRICS_FILE)),
                            os.path.join(workdir, PREFERENCE_PLOT), window)

  return train.Objective(
      build_data=build_data, batch_for_step=preference.batch_for_step,
      eval_batches=preference.eval_batches, loss_fn=loss_fn,
      eval_fn=lambda trainable, frozen, batch: loss_fn(trainable, frozen, batch, None),
      denominator_name="pairs", prepare=prepare, plot=plot)


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


# --- where the policy starts -----------------------------------------------------------------------

def init_adapters(exp, init_from: str) -> dict:
  """exp.params with the trainable leaves of the SFT checkpoint at `init_from` (a workdir, its
  checkpoints/ dir, or one step's dir); exp.params unchanged for ''. Refuses another base or layout."""
  if not init_from:
    return exp.params
  from gpt2_lora_jax import checkpoint
  trainable, saved_meta, where = checkpoint.read_trainable(init_from)
  # Dropout is how an adapter trains, not what it is: the DPO run may use another rate.
  expected = dict(exp.meta, lora=dict(exp.meta["lora"], dropout=saved_meta.get("lora", {}).get("dropout")))
  try:
    checkpoint.check_meta(saved_meta, expected, where)
  except checkpoint.CheckpointMismatchError as e:
    raise checkpoint.CheckpointMismatchError(
        f"dpo.init_from={init_from!r}: {e} DPO starts from an SFT run of the same base and LoRA "
        "layout (or set dpo.init_from='' to start from fresh adapters).") from None
  _, frozen = lora.split(exp.params, exp.labels)
  return lora.combine(jax.tree.map(np.asarray, trainable), frozen)

