"""DPO's losses per pair, from summed reply log-probs, and the checks of the dpo.* settings.

Per pair, with the summed log-probs of the chosen (w) and rejected (l) reply under the policy (pi) and
the reference (ref), log-ratios c = log pi(y_w|x) - log ref(y_w|x), r = log pi(y_l|x) - log ref(y_l|x),
z = c - r, reply lengths |y_w|, |y_l| in target tokens (at least 1), beta = dpo.beta and
eps = dpo.label_smoothing. Sources: TRL's DPOTrainer (huggingface/trl, trl/trainer/dpo_trainer.py)
in the release named with each formula: 0.28.0 (`dpo_loss`) or 0.29.0 (`_compute_loss`, a rewrite
that dropped label smoothing on 'sigmoid', rpo_alpha and reference_free; these formulas are unchanged
from 0.29.0 to 1.9.0). Issue 23 compared every per-pair loss with both releases: they agree to
<= 3e-13 in float64.
  'sigmoid'       DPO (Rafailov et al. 2023, Eq. 7): -log sigmoid(beta z)   (0.28.0 and 0.29.0)
  'conservative'  cDPO (Mitchell 2023): labels flipped with probability eps,
                  -(1 - eps) log sigmoid(beta z) - eps log sigmoid(-beta z)
                  (0.28.0: 'sigmoid' with label_smoothing = eps)
  'robust'        rDPO (Chowdhury et al. 2024): an unbiased loss under flip rate eps,
                  ((1 - eps)(-log sigmoid(beta z)) + eps log sigmoid(-beta z)) / (1 - 2 eps)
                  (0.28.0 and 0.29.0)
  'hinge'         SLiC (Zhao et al. 2023): relu(1 - beta z)   (0.28.0 and 0.29.0)
  'ipo'           IPO (Azar et al. 2023, Eq. 17) on per-token log-ratios:
                  (c / |y_w| - r / |y_l| - 1 / (2 beta))^2
                  (0.29.0 divides the summed log-ratios by the reply tokens; its comment: the paper's
                  results correspond to this length-normalised form. 0.28.0 divides each log-prob by
                  the reply tokens before the ratio: the same loss)
  'sigmoid_norm'  -log sigmoid(beta (c / |y_w| - r / |y_l|))   (TRL 1.4.0, its first release with it)
  'simpo'         SimPO (Meng et al. 2024, Eq. 6), reference-free:
                  -log sigmoid(beta log pi(y_w|x) / |y_w| - beta log pi(y_l|x) / |y_l| - gamma),
                  gamma = dpo.simpo_gamma (TRL 0.28.0's CPOTrainer, loss_type='simpo',
                  trl/experimental/cpo/cpo_trainer.py; CPOTrainer adds cpo_alpha (default 1.0) x the
                  chosen NLL, this term alone does not: add 'sft' for it)
  'sft'           the chosen reply's NLL per token, -log pi(y_w|x) / |y_w|   (0.29.0's 'sft')
dpo.loss may name several, joined by commas ('sigmoid,sft'), summed with dpo.loss_weights (1 each
by default), as TRL's loss_type list with loss_weights (0.28.0 and 0.29.0). dpo.rpo_alpha adds alpha
times the 'sft' term (0.28.0's rpo_alpha; RPO, Pang et al. 2024). Every term is per pair and averaged
over pairs: TRL's 'sft' and rpo_alpha average over the chosen tokens of the whole batch instead (a
long reply weighs more there). dpo.reference_free sets log ref = 0 for every term (0.28.0's
reference_free); 'simpo' and 'sft' never use the reference.

Logged implicit rewards are beta c and beta r (log ref = 0 when no term reads the reference), as
0.29.0 logs them for every loss. They differ from TRL's in three places:
  - 'ipo': 0.28.0 logs beta x the per-token log-ratios (its log-probs are already divided by the
    reply tokens), here (and in 0.29.0) beta x the summed ones;
  - 'simpo' alone: CPOTrainer logs beta log pi(y|x) / |y|, here beta log pi(y|x), summed;
  - dpo.reference_free: 0.28.0 still runs the reference and logs beta (log pi - log ref), here no
    reference runs and the rewards are beta log pi.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from gpt2_lora_jax.errors import UserError

LOSSES = ("sigmoid", "conservative", "robust", "hinge", "ipo", "sigmoid_norm", "simpo", "sft")
WITHOUT_REFERENCE = ("simpo", "sft")  # terms that never read the reference's log-probs
USES_LABEL_SMOOTHING = ("conservative", "robust")


def terms(dpo_cfg) -> list[tuple[str, float]]:
  """[(loss, weight)] of dpo.loss and dpo.loss_weights (unchecked: see check_config)."""
  kinds = [k.strip() for k in str(dpo_cfg.loss).split(",")]
  weights = list(dpo_cfg.get("loss_weights", ()) or ()) or [1.0] * len(kinds)
  return list(zip(kinds, [float(w) for w in weights]))


def uses_reference(dpo_cfg) -> bool:
  """Whether any term reads the reference's log-probs (else no reference forward runs)."""
  return not dpo_cfg.get("reference_free", False) and any(k not in WITHOUT_REFERENCE for k, _ in terms(dpo_cfg))


def check_config(dpo_cfg):
  """Errors naming the setting, one line each, before anything is loaded."""
  problems = []
  kinds = [k.strip() for k in str(dpo_cfg.loss).split(",")]
  weights = tuple(dpo_cfg.get("loss_weights", ()) or ())
  eps = dpo_cfg.label_smoothing
  if not dpo_cfg.beta > 0:
    problems.append(f"dpo.beta={dpo_cfg.beta}: must be > 0 (TRL's default is 0.1)")
  unknown = [k for k in kinds if k not in LOSSES]
  if unknown:
    problems.append(f"dpo.loss={dpo_cfg.loss!r}: {', '.join(map(repr, unknown))} unknown; choose from "
                    f"{LOSSES}, several joined by commas (e.g. 'sigmoid,sft')")
  elif len(set(kinds)) != len(kinds):
    problems.append(f"dpo.loss={dpo_cfg.loss!r} names a loss twice; weigh it with dpo.loss_weights instead")
  if weights and len(weights) != len(kinds):
    problems.append(f"dpo.loss_weights={weights}: {len(weights)} weights for the {len(kinds)} losses of "
                    f"dpo.loss={dpo_cfg.loss!r}; give one per loss (or () for 1 each)")
  elif any(not w > 0 for w in weights):
    problems.append(f"dpo.loss_weights={weights}: every weight must be > 0 (drop a loss from dpo.loss instead)")
  if "conservative" in kinds and not 0.0 < eps < 0.5:
    problems.append(f"dpo.label_smoothing={eps}: dpo.loss 'conservative' needs it in (0, 0.5), the "
                    "probability that a pair's labels are flipped")
  elif "robust" in kinds and not 0.0 <= eps < 0.5:
    problems.append(f"dpo.label_smoothing={eps}: dpo.loss 'robust' needs it in [0, 0.5), the "
                    "probability that a pair's labels are flipped")
  elif not set(kinds) & set(USES_LABEL_SMOOTHING) and eps != 0.0:
    problems.append(f"dpo.label_smoothing={eps} applies only to dpo.loss 'conservative' or 'robust'; "
                    "set it to 0 or choose one of them")
  if not dpo_cfg.get("rpo_alpha", 0.0) >= 0:
    problems.append(f"dpo.rpo_alpha={dpo_cfg.rpo_alpha}: must be >= 0 (the weight of the chosen reply's NLL)")
  if not dpo_cfg.get("simpo_gamma", 0.0) >= 0:
    problems.append(f"dpo.simpo_gamma={dpo_cfg.simpo_gamma}: must be >= 0 (SimPO's target reward margin)")
  if problems:
    raise UserError("invalid config:\n  " + "\n  ".join(problems))


def loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta: float, kind: str = "sigmoid",
         label_smoothing: float = 0.0, chosen_tokens=None, rejected_tokens=None, simpo_gamma: float = 0.0):
  """(per-pair loss, chosen reward, rejected reward) of one loss `kind`, all shaped alike.

  chosen_tokens / rejected_tokens: reply lengths in target tokens ('ipo', 'sigmoid_norm', 'simpo', 'sft').
  """
  if not beta > 0:
    raise UserError(f"dpo.beta={beta}: must be > 0")
  chosen_ratio = policy_chosen - ref_chosen
  rejected_ratio = policy_rejected - ref_rejected
  z = chosen_ratio - rejected_ratio
  eps = label_smoothing
  per_token = lambda x, n: x / jnp.maximum(n, 1.0)
  log_sig = jax.nn.log_sigmoid
  if kind == "sigmoid":
    losses = -log_sig(beta * z)
  elif kind == "conservative":
    losses = -(1.0 - eps) * log_sig(beta * z) - eps * log_sig(-beta * z)
  elif kind == "robust":
    losses = (-(1.0 - eps) * log_sig(beta * z) + eps * log_sig(-beta * z)) / (1.0 - 2.0 * eps)
  elif kind == "hinge":
    losses = jax.nn.relu(1.0 - beta * z)
  elif kind == "ipo":
    delta = per_token(chosen_ratio, chosen_tokens) - per_token(rejected_ratio, rejected_tokens)
    losses = (delta - 1.0 / (2.0 * beta)) ** 2
  elif kind == "sigmoid_norm":
    losses = -log_sig(beta * (per_token(chosen_ratio, chosen_tokens) - per_token(rejected_ratio, rejected_tokens)))
  elif kind == "simpo":
    losses = -log_sig(beta * per_token(policy_chosen, chosen_tokens)
                      - beta * per_token(policy_rejected, rejected_tokens) - simpo_gamma)
  elif kind == "sft":
    losses = -per_token(policy_chosen, chosen_tokens)
  else:
    raise UserError(f"dpo.loss={kind!r}: choose one of {LOSSES}")
  return losses, beta * chosen_ratio, beta * rejected_ratio


def combined_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens,
                  dpo_cfg):
  """Per-pair loss of dpo_cfg: the weighted sum of its terms, plus rpo_alpha x the chosen NLL per token."""
  total = 0.0
  for kind, weight in terms(dpo_cfg):
    losses, _, _ = loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=dpo_cfg.beta, kind=kind,
                        label_smoothing=dpo_cfg.label_smoothing, chosen_tokens=chosen_tokens,
                        rejected_tokens=rejected_tokens, simpo_gamma=dpo_cfg.get("simpo_gamma", 0.0))
    total = total + weight * losses
  alpha = dpo_cfg.get("rpo_alpha", 0.0)
  if alpha > 0:
    total = total + alpha * -policy_chosen / jnp.maximum(chosen_tokens, 1.0)
  return total
