"""The evaluation's statistics: bootstrap intervals, paired differences, win rates, lengths.

Pure functions of the rows in generations.jsonl / scores.jsonl (see report.py for the files);
report.py turns their summary into report.md and plots.

Percentile bootstrap (seeded) 95% intervals for each model's mean reward, for the paired mean
difference over prompts both models answered, for the win rate (a tie counts as half a win), and
for the share of correct answers.
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


def summarize(generations: list[dict], scores: Optional[list[dict]] = None,
              heldout: Optional[dict] = None, *, base: str = BASE, tuned: str = TUNED,
              models: Optional[Sequence[str]] = None, preference: Optional[dict] = None,
              n_boot: int = 10000, seed: int = 0) -> dict:
  """Every number the report shows, as a JSON-able dict.

  models: the models compared, in order; default every model in the files, base and tuned first.
  Every two are paired (model_pairs: later minus earlier); summary['paired'] is the (tuned, base)
  pair. preference: held-out preference accuracies (preference.json, written by evaluate.compare).
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
    out["preference"] = preference
  return out


# --- plots --------------------------------------------------------------------------------------
