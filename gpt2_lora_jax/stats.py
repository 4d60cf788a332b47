"""The evaluation's statistics: bootstrap intervals, paired differences, win rates, lengths.

Pure functions of the rows in generations.jsonl / scores.jsonl (see report.py for the files);
report.py turns their summary into report.md and plots.

Percentile bootstrap (seeded) 95% intervals for each model's mean reward, for the paired mean
difference over prompts both models answered, for the win rate (a tie counts as half a win), for
the share of correct answers and for KL estimates. Held-out preference accuracies (ties count half)
get Wilson score intervals, and two models on the same pairs a paired bootstrap interval of their
difference and McNemar's exact test.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

BASE, TUNED = "base", "finetuned"
# Length-matched comparison: two answers count as the same length within 20% (see length_matched).
LENGTH_TOLERANCE = 0.2


def bootstrap_ci(values, statistic=np.mean, n_boot: int = 10000, level: float = 0.95, seed: int = 0):
  """(statistic(values), low, high): percentile bootstrap over resampled rows, seeded."""
  values = np.asarray(values, np.float64)
  if len(values) == 0:
    return math.nan, math.nan, math.nan
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, len(values), size=(n_boot, len(values)))
  stats = statistic(values[idx], axis=1)
  low, high = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
  return float(statistic(values)), float(low), float(high)


def wins(tuned, base):
  """Per-pair win of tuned over base: 1, 0.5 for a tie, 0."""
  tuned, base = np.asarray(tuned, np.float64), np.asarray(base, np.float64)
  return (tuned > base) + 0.5 * (tuned == base)


def win_rate(tuned, base) -> float:
  return float(np.mean(wins(tuned, base))) if len(tuned) else math.nan


def paired(scores: Sequence[dict], base: str = BASE, tuned: str = TUNED):
  """(ids, base rewards, tuned rewards) over the prompt ids both models were scored on."""
  by_model = {base: {}, tuned: {}}
  for s in scores:
    if s["model"] in by_model:
      by_model[s["model"]][s["id"]] = s["reward"]
  ids = sorted(set(by_model[base]) & set(by_model[tuned]), key=str)
  return (ids, np.array([by_model[base][i] for i in ids], np.float64),
          np.array([by_model[tuned][i] for i in ids], np.float64))


def length_stats(lengths) -> dict:
  x = np.asarray(lengths, np.float64)
  if len(x) == 0:
    return {"mean": math.nan, "median": math.nan, "p90": math.nan}
  return {"mean": float(x.mean()), "median": float(np.median(x)), "p90": float(np.percentile(x, 90))}


def correlations(x, y) -> dict:
  """Pearson and Spearman (Pearson of ranks, ties averaged); nan when undefined."""
  from scipy import stats
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
    return {"pearson": math.nan, "spearman": math.nan}
  return {"pearson": float(np.corrcoef(x, y)[0, 1]),
          "spearman": float(np.corrcoef(stats.rankdata(x), stats.rankdata(y))[0, 1])}


def model_pairs(models: Sequence[str]) -> list[tuple[str, str]]:
  """(later, earlier) for every two models: with (base, sft, dpo), sft vs base, dpo vs base, dpo vs sft."""
  return [(models[j], models[i]) for j in range(len(models)) for i in range(j)]


def length_matched(a_rewards, b_rewards, a_lengths, b_lengths, tolerance: float = LENGTH_TOLERANCE):
  """Indices of the prompts whose two answers' token counts differ by at most `tolerance` of the
  longer one (and at most 2 tokens for short answers): a comparison that length cannot explain."""
  a_len, b_len = np.asarray(a_lengths, np.float64), np.asarray(b_lengths, np.float64)
  return np.flatnonzero(np.abs(a_len - b_len) <= np.maximum(2.0, tolerance * np.maximum(a_len, b_len)))


def pair_stats(r_a, r_b, n_boot: int, seed: int) -> dict:
  """Paired mean difference (a minus b) and win rate of a over b, with bootstrap intervals."""
  r_a, r_b = np.asarray(r_a, np.float64), np.asarray(r_b, np.float64)
  diff, d_low, d_high = bootstrap_ci(r_a - r_b, n_boot=n_boot, seed=seed)
  win, w_low, w_high = bootstrap_ci(wins(r_a, r_b), n_boot=n_boot, seed=seed)
  return {"n_pairs": len(r_a), "mean_difference": diff, "difference_ci": [d_low, d_high],
          "win_rate": win, "win_rate_ci": [w_low, w_high],
          "n_wins": int(np.sum(r_a > r_b)), "n_ties": int(np.sum(r_a == r_b)),
          "n_losses": int(np.sum(r_a < r_b))}


# --- comparing runs of a sweep on the same prompts and held-out rows (sweep_report.py) ------------

def resample_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
  """(n_boot, n) row indices drawn with replacement: the resamples bootstrap_ci draws for n rows."""
  return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def ratio_ci(num, den, n_boot: int = 10000, level: float = 0.95, seed: int = 0):
  """(sum(num) / sum(den), low, high): a ratio of sums (a held-out loss: NLL over loss tokens, per
  packed row) with a percentile bootstrap interval over the rows."""
  num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
  if len(num) == 0:
    return math.nan, math.nan, math.nan
  idx = resample_indices(len(num), n_boot, seed)
  stats = num[idx].sum(1) / den[idx].sum(1)
  low, high = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
  return float(num.sum() / den.sum()), float(low), float(high)


def paired_bootstrap(a, b, n_boot: int, seed: int, ratio: bool = False) -> tuple[float, np.ndarray]:
  """(estimate, its n_boot bootstrap replicates) of a minus b over the same rows, resampled together.

  ratio False: a, b are per-prompt values; the statistic is the mean of a - b. ratio True: a, b are
  (numerators, denominators) per row of two models (held-out NLL and loss tokens per packed row);
  the statistic is sum(a num) / sum(a den) - sum(b num) / sum(b den)."""
  if ratio:
    (an, ad), (bn, bd) = ([np.asarray(v, np.float64) for v in x] for x in (a, b))
    idx = resample_indices(len(an), n_boot, seed)
    boot = an[idx].sum(1) / ad[idx].sum(1) - bn[idx].sum(1) / bd[idx].sum(1)
    return float(an.sum() / ad.sum() - bn.sum() / bd.sum()), boot
  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  return float(d.mean()), d[resample_indices(len(d), n_boot, seed)].mean(1)


def bootstrap_p(boot) -> float:
  """Two-sided bootstrap p-value of 'no difference': twice the smaller share of replicates on either
  side of 0 (at most 1). A percentile interval of the same replicates at level 1 - a leaves out 0
  when p < a."""
  boot = np.asarray(boot, np.float64)
  return float(min(1.0, 2.0 * min(np.mean(boot <= 0), np.mean(boot >= 0))))


def holm(pvalues) -> tuple[list[float], list[float]]:
  """Holm's step-down procedure (Holm 1979) over m tests: (adjusted p-values, each test's level).

  Sorted ascending, the i-th smallest p (i = 1..m) is tested at alpha / (m - i + 1); its adjusted
  p-value is max over j <= i of min(1, (m - j + 1) p_(j)), and it is rejected at family-wise level
  alpha when that is below alpha. Returned per test in the given order: the adjusted p-value and
  the divisor m - i + 1 of its step (an interval for it at level 1 - alpha / divisor)."""
  p = np.asarray(pvalues, np.float64)
  m = len(p)
  order = np.argsort(p, kind="stable")
  adjusted, divisors = np.empty(m), np.empty(m)
  running = 0.0
  for i, k in enumerate(order):
    running = max(running, min(1.0, (m - i) * p[k]))
    adjusted[k], divisors[k] = running, m - i
  return adjusted.tolist(), divisors.tolist()


Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(successes: float, n: int, z: float = Z_95) -> tuple[float, float]:
  """Wilson's score interval for a proportion (Wilson 1927); successes may hold halves (ties)."""
  if n == 0:
    return math.nan, math.nan
  p = successes / n
  center = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
  return max(0.0, center - half), min(1.0, center + half)


def mcnemar_exact(b: int, c: int) -> float:
  """Two-sided exact McNemar p-value: b and c pairs where only one of two classifiers is right;
  under no difference b ~ Binomial(b + c, 1/2). p = min(1, 2 P(X <= min(b, c)))."""
  n = b + c
  if n == 0:
    return 1.0
  tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
  return min(1.0, 2 * tail / 2 ** n)  # exact integers, one rounding


def accuracy(outcomes) -> dict:
  """Mean of per-pair outcomes (1 right, 0.5 tie, 0 wrong) with its Wilson interval."""
  o = np.asarray(outcomes, np.float64)
  low, high = wilson_interval(float(o.sum()), len(o))
  return {"accuracy": float(o.mean()) if len(o) else math.nan, "ci": [low, high], "n": len(o),
          "n_ties": int(np.sum(o == 0.5))}


def paired_accuracy_test(o_a, o_b, n_boot: int, seed: int) -> dict:
  """Accuracy of a minus b on the same pairs: paired bootstrap interval (ties count half) and the
  exact McNemar test over the pairs where neither ties (b: only a right; c: only b right)."""
  o_a, o_b = np.asarray(o_a, np.float64), np.asarray(o_b, np.float64)
  diff, low, high = bootstrap_ci(o_a - o_b, n_boot=n_boot, seed=seed)
  decided = (o_a != 0.5) & (o_b != 0.5)
  b = int(np.sum(decided & (o_a == 1) & (o_b == 0)))
  c = int(np.sum(decided & (o_a == 0) & (o_b == 1)))
  return {"difference": diff, "difference_ci": [low, high], "mcnemar_b": b, "mcnemar_c": c,
          "mcnemar_p": mcnemar_exact(b, c), "n_pairs": len(o_a), "n_with_a_tie": int(np.sum(~decided))}


def preference_summary(raw: dict, models: Sequence[str], n_boot: int, seed: int) -> dict:
  """Accuracies of preference.json's pairs (preference_eval.py): per model, the share of pairs whose
  chosen reply has the higher summed log-prob and the higher log-prob per token (length-normalised);
  per two models (later, earlier), the later's implicit-reward accuracy against the earlier (DPO's
  accuracy when the earlier is its reference) and paired tests of both accuracies. Ties count half."""
  tokens = np.maximum(np.asarray(raw["reply_tokens"], np.float64), 1.0)  # (P, 2)
  logps = {m: np.asarray(v, np.float64).reshape(-1, 2) for m, v in raw["logps"].items()}
  models = [m for m in models if m in logps] + [m for m in logps if m not in models]
  outcomes = {m: {"summed": wins(lp[:, 0], lp[:, 1]),
                  "per_token": wins(lp[:, 0] / tokens[:, 0], lp[:, 1] / tokens[:, 1])}
              for m, lp in logps.items()}
  out = {"pairs": int(raw["pairs"]), "models": {}, "implicit": {}, "implicit_ci": {}, "paired": {},
         "chosen_shorter_share": float(np.mean(tokens[:, 0] < tokens[:, 1])) if len(tokens) else math.nan,
         "data": raw.get("data", {})}
  for m in models:
    summed, per_token = accuracy(outcomes[m]["summed"]), accuracy(outcomes[m]["per_token"])
    out["models"][m] = {"logp_accuracy": summed["accuracy"], "logp_accuracy_ci": summed["ci"],
                        "length_normalised_accuracy": per_token["accuracy"],
                        "length_normalised_ci": per_token["ci"],
                        "logp_chosen": float(logps[m][:, 0].mean()), "logp_rejected": float(logps[m][:, 1].mean())}
  for a, b in model_pairs(models):
    ratio = logps[a] - logps[b]
    implicit = accuracy(wins(ratio[:, 0], ratio[:, 1]))
    out["implicit"][f"{a} vs {b}"] = implicit["accuracy"]
    out["implicit_ci"][f"{a} vs {b}"] = {"ci": implicit["ci"], "n_ties": implicit["n_ties"]}
    out["paired"][f"{a} vs {b}"] = {
        kind: paired_accuracy_test(outcomes[a][kind], outcomes[b][kind], n_boot, seed)
        for kind in ("summed", "per_token")}
  return out


def drift_summary(rows: Sequence[dict], pairs: Optional[dict], n_boot: int, seed: int) -> dict:
  """Per (model, reference) of drift.jsonl (preference_eval.py): the mean of log pi_model - log
  pi_reference over the model's own answers (a KL estimate) with a bootstrap interval, per answer
  token, beside the model's paired reward gain over the reference (summary['pairs'])."""
  out = {}
  for key in dict.fromkeys((r["model"], r["reference"]) for r in rows):
    mine = [r for r in rows if (r["model"], r["reference"]) == key]
    ratio = np.array([r["logp_model"] - r["logp_reference"] for r in mine])
    kl, low, high = bootstrap_ci(ratio, n_boot=n_boot, seed=seed)
    tokens = sum(r["n_tokens"] for r in mine)
    gain = (pairs or {}).get(f"{key[0]} vs {key[1]}")
    out[f"{key[0]} vs {key[1]}"] = {
        "model": key[0], "reference": key[1], "n_answers": len(mine), "kl": kl, "kl_ci": [low, high],
        "kl_per_token": float(ratio.sum() / tokens) if tokens else math.nan,
        "temperature": mine[0]["temperature"], "top_k": mine[0]["top_k"], "top_p": mine[0]["top_p"],
        "reward_gain": gain["mean_difference"] if gain else None,
        "reward_gain_ci": gain["difference_ci"] if gain else None}
  return out


def summarize(generations: list[dict], scores: Optional[list[dict]] = None,
              heldout: Optional[dict] = None, *, base: str = BASE, tuned: str = TUNED,
              models: Optional[Sequence[str]] = None, preference: Optional[dict] = None,
              drift: Optional[Sequence[dict]] = None, n_boot: int = 10000, seed: int = 0) -> dict:
  """Every number the report shows, as a JSON-able dict.

  models: the models compared, in order; default every model in the files, base and tuned first.
  Every two are paired (model_pairs: later minus earlier); summary['paired'] is the (tuned, base)
  pair. preference: held-out preference log-probs (preference.json, written by evaluate.compare);
  drift: each model's answers scored under earlier models (drift.jsonl).
  """
  models = (list(models) if models else
            [base, tuned] + sorted({g["model"] for g in generations} - {base, tuned}))
  out = {"models": {}, "base": base, "tuned": tuned, "model_order": models}
  gen_by_key = {(g["id"], g["model"]): g for g in generations}
  for m in models:
    rows = [g for g in generations if g["model"] == m]
    stops = {}
    for g in rows:
      stops[g.get("stop_reason", "unknown")] = stops.get(g.get("stop_reason", "unknown"), 0) + 1
    out["models"][m] = {
        "n_answers": len(rows), "stop_reasons": stops,
        "n_prompts_truncated": sum(bool(g.get("prompt_truncated")) for g in rows),
        "n_empty_answers": sum(not g["answer"].strip() for g in rows),
        "answer_tokens": length_stats([g["n_answer_tokens"] for g in rows])}
    graded = [bool(g["correct"]) for g in rows if "correct" in g]
    if graded:
      share, low, high = bootstrap_ci(graded, n_boot=n_boot, seed=seed)
      out["models"][m].update(n_graded=len(graded), n_correct=int(sum(graded)), correct_share=share,
                              correct_ci=[low, high])
  if base in models and tuned in models and all("n_graded" in out["models"][m] for m in (base, tuned)):
    right = {(g["id"], g["model"]): float(bool(g["correct"])) for g in generations if "correct" in g}
    ids = sorted({i for i, m in right if m == base and (i, tuned) in right}, key=str)
    diff, low, high = bootstrap_ci([right[(i, tuned)] - right[(i, base)] for i in ids], n_boot=n_boot,
                                   seed=seed)
    out["correct_paired"] = {"n_pairs": len(ids), "difference": diff, "difference_ci": [low, high]}
  if scores is not None:
    for m in models:
      rows = [s for s in scores if s["model"] == m]
      rewards = [s["reward"] for s in rows]
      lengths = [gen_by_key[(s["id"], m)]["n_answer_tokens"] for s in rows]
      mean, low, high = bootstrap_ci(rewards, n_boot=n_boot, seed=seed)
      out["models"][m].update(
          n_scored=len(rows), reward_mean=mean, reward_ci=[low, high],
          reward_std=float(np.std(rewards, ddof=1)) if len(rows) > 1 else math.nan,
          n_scored_truncated=sum(bool(s.get("truncated")) for s in rows),
          n_scored_empty=sum(bool(s.get("empty_answer")) for s in rows),
          reward_vs_length=correlations(lengths, rewards))
    out["pairs"] = {}
    for a, b in model_pairs(models):
      ids, r_b, r_a = paired(scores, b, a)
      stats = pair_stats(r_a, r_b, n_boot, seed)
      len_a = [gen_by_key[(i, a)]["n_answer_tokens"] for i in ids]
      len_b = [gen_by_key[(i, b)]["n_answer_tokens"] for i in ids]
      keep = length_matched(r_a, r_b, len_a, len_b)
      stats["answer_tokens_mean"] = {a: float(np.mean(len_a)) if ids else math.nan,
                                     b: float(np.mean(len_b)) if ids else math.nan}
      stats["length_matched"] = {"tolerance": LENGTH_TOLERANCE,
                                 **pair_stats(r_a[keep], r_b[keep], n_boot, seed)}
      out["pairs"][f"{a} vs {b}"] = stats
    if f"{tuned} vs {base}" in out["pairs"]:
      out["paired"] = out["pairs"][f"{tuned} vs {base}"]
  if heldout:
    out["heldout"] = {m: {"loss": float(v["loss"]),
                          "perplexity": float(v.get("perplexity", math.exp(float(v["loss"])))),
                          "tokens": None if v.get("tokens") is None else int(v["tokens"])}
                      for m, v in heldout.items()}
  if preference:
    out["preference"] = (preference_summary(preference, models, n_boot, seed) if "logps" in preference
                         else preference)
  if drift:
    out["drift"] = drift_summary(drift, out.get("pairs"), n_boot, seed)
  return out


# --- plots --------------------------------------------------------------------------------------
