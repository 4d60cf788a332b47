"""report.md's sections on the held-out sample's subsets, held-out preference accuracy and reward
against KL (numbers from stats.preference_summary and stats.drift_summary), and fmt, the format of
every float in report.md (here, below report.py, so that neither module imports the other back)."""
from __future__ import annotations

import math
from typing import Optional, Sequence


def fmt(x, digits: int = 4) -> str:
  """How every float appears in report.md (tests format the numbers they recompute the same way)."""
  return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _ci(ci, digits: int = 3) -> str:
  return f"[{fmt(ci[0], digits)}, {fmt(ci[1], digits)}]"


def subsets_section(cfg: Optional[dict], preference: Optional[dict]) -> list[str]:
  """Per subset of the eval split: its rows, the held-out sample, the rows of held-out loss, the
  preference pairs and the prompts (eval_config.json's 'subsets', preference.json's data summary)."""
  subsets = (cfg or {}).get("subsets")
  if not subsets:
    return []
  data = (cfg or {}).get("data", {})
  pairs = ((preference or {}).get("data") or {}).get("subsets", {})
  lines = [f"- Held-out rows: a sample of data.max_eval_rows={data.get('max_eval_rows')} (0: all) drawn "
           f"with data.eval_seed={data.get('eval_seed')}, stratified over the eval split's subsets in "
           "proportion to their rows; the prompts are a sample of its rows, stratified the same way.", "",
           "| subset | rows in the split | held-out sample | held-out loss rows | preference pairs | prompts |",
           "|---|---|---|---|---|---|"]
  for name, c in subsets.items():
    lines.append(f"| {name} | {c['rows_in_split']} | {c['heldout_rows']} | {c['heldout_loss_rows']} | "
                 f"{pairs.get(name, {}).get('rows_used', 'n/a')} | {c['prompts']} |")
  return lines + [""]


def preference_section(preference: Optional[dict], models: Sequence[str]) -> list[str]:
  """Held-out preference accuracy; nothing when it was not measured."""
  if not preference:
    return []
  lines = ["## Held-out preference accuracy", "",
           f"On {preference['pairs']} held-out (chosen, rejected) pairs. Log-prob accuracy: the share of "
           "pairs where the model gives the chosen reply a higher summed log-probability than the "
           "rejected one; length-normalised: a higher log-probability per reply token (a summed "
           "log-prob favours the shorter reply"
           + (f", and the chosen reply is the shorter one in {fmt(100 * preference['chosen_shorter_share'], 1)}% "
              "of these pairs" if "chosen_shorter_share" in preference else "")
           + "). Implicit-reward accuracy of a model against an earlier one (its DPO reference, when it "
           "is the SFT model): the share where log pi(chosen) - log ref(chosen) > log pi(rejected) - "
           "log ref(rejected), DPO's preference accuracy. Ties count half; intervals are 95% Wilson "
           "score intervals.", ""]
  if "chosen_shorter_share" not in preference:  # an older preference.json: accuracies only
    lines += ["| model | log-prob accuracy | mean log p(chosen) | mean log p(rejected) |", "|---|---|---|---|"]
    lines += [f"| {m} | {fmt(v['logp_accuracy'])} | {fmt(v['logp_chosen'], 2)} | {fmt(v['logp_rejected'], 2)} |"
              for m, v in ((m, preference["models"].get(m)) for m in models) if v]
    return lines + [""]
  lines += ["| model | log-prob accuracy | 95% CI | length-normalised accuracy | 95% CI | mean log p(chosen) "
            "| mean log p(rejected) |", "|---|---|---|---|---|---|---|"]
  for m in models:
    v = preference["models"].get(m)
    if v:
      lines.append(f"| {m} | {fmt(v['logp_accuracy'])} | {_ci(v['logp_accuracy_ci'])} | "
                   f"{fmt(v['length_normalised_accuracy'])} | {_ci(v['length_normalised_ci'])} | "
                   f"{fmt(v['logp_chosen'], 2)} | {fmt(v['logp_rejected'], 2)} |")
  lines += ["", "| model vs reference | implicit-reward accuracy | 95% CI | tied pairs |", "|---|---|---|---|"]
  for name, acc in preference["implicit"].items():
    ci = preference["implicit_ci"][name]
    lines.append(f"| {name} | {fmt(acc)} | {_ci(ci['ci'])} | {ci['n_ties']} |")
  lines += ["", "Paired tests on the same pairs (first model minus second): the accuracy difference with a "
            "paired bootstrap 95% interval, and McNemar's exact test over the pairs where only one of "
            "the two is right (b: only the first, c: only the second; pairs where either ties are left "
            "out of it).", "",
            "| pair | accuracy | difference | 95% CI | b | c | McNemar exact p |", "|---|---|---|---|---|---|---|"]
  for name, tests in preference["paired"].items():
    for kind, label in (("summed", "log-prob"), ("per_token", "length-normalised")):
      t = tests[kind]
      lines.append(f"| {name} | {label} | {fmt(t['difference'])} | {_ci(t['difference_ci'])} | "
                   f"{t['mcnemar_b']} | {t['mcnemar_c']} | {fmt(t['mcnemar_p'])} |")
  cut = (preference.get("data") or {}).get("cut_because_paired")
  if cut:
    lines += ["", f"Pairs lose prompt turns when chosen and rejected do not fit one row together: "
              f"{preference['data']['rows_truncated']['count']} of these pairs were cut, "
              f"{cut['truncated']['count']} only because paired (each sequence fits a row alone); "
              f"{cut['skipped']['count']} were skipped only because paired (preference.py)."]
  return lines + [""]


def drift_section(drift: Optional[dict]) -> list[str]:
  """Reward against KL (stats.drift_summary); nothing when it was not measured."""
  if not drift:
    return []
  first = next(iter(drift.values()))
  greedy = not first["temperature"]
  lines = ["## Reward against KL", "",
           "As in the DPO paper's reward/KL frontier: for each model and an earlier one, the model's own "
           "answers to the prompts scored under both, log pi_model(answer) - log pi_earlier(answer) "
           "summed over the answer's tokens. "
           + ("The answers are greedy, so the mean is a log-ratio on them, not a KL estimate. " if greedy else
              f"Both are scored at the sampling temperature {first['temperature']}, so the mean over "
              "prompts estimates KL(model || earlier) of the distributions the answers were drawn from"
              + (f" (top_k {first['top_k']} / top_p {first['top_p']} truncation is not applied in the "
                 "scoring)" if first["top_k"] or first["top_p"] < 1.0 else "") + ". ")
           + "Beside it, the model's paired mean reward gain over the earlier model (the Reward section); "
           "intervals are 95% percentile bootstrap.", "",
           "| model vs earlier | answers | KL estimate (nats/answer) | 95% CI | per answer token | "
           "reward gain | 95% CI |", "|---|---|---|---|---|---|---|"]
  for name, d in drift.items():
    gain_ci = _ci(d["reward_gain_ci"], 4) if d["reward_gain_ci"] else "n/a"
    lines.append(f"| {name} | {d['n_answers']} | {fmt(d['kl'])} | {_ci(d['kl_ci'], 4)} | "
                 f"{fmt(d['kl_per_token'])} | {fmt(d['reward_gain'])} | {gain_ci} |")
  return lines + [""]
