"""Statistics, plots and eval/report.md, computed only from the files the eval stages leave behind.

Inputs (in the eval dir unless given):
  generations.jsonl  one line per (prompt, model): {'id': prompt id shared by both models,
                     'model': 'base' | 'finetuned', 'prompt', 'answer', 'stop_reason',
                     'n_answer_tokens', 'prompt_tokens', 'prompt_truncated', 'prompt_tokens_cut',
                     optional 'reference'}
                     (generation_rows builds these from sample.generate's results)
  scores.jsonl       from `python -m gpt2_lora_jax.reward`: {'id', 'model', 'reward', 'n_tokens',
                     'truncated', the cut counts, 'empty_answer'}; optional (absent: scoring skipped,
                     say why)
  heldout.json       optional {'base': {'loss': mean token NLL, 'tokens': n}, 'finetuned': {...}}
  metrics.jsonl      optional training log {'step', 'split': 'train'|'eval', 'loss', ...}
Outputs: report.md, summary.json (every number in the report), reward_hist.png, loss_curve.png.

Statistics: percentile bootstrap (seeded) 95% intervals for each model's mean reward, for the
paired mean difference (fine-tuned minus base over prompts both models answered) and for the win
rate (fine-tuned reward > base; a tie counts as half a win).
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional, Sequence

import numpy as np

from gpt2_lora_jax import metrics as metrics_lib

BASE, TUNED = "base", "finetuned"
SKIP_REASON_FILE = "scoring_skipped.txt"  # evaluate.py writes why scoring was skipped here


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def generation_rows(ids: Sequence, prompts: Sequence[str], results: Sequence[dict], model: str,
                    references: Optional[Sequence[str]] = None) -> list[dict]:
  """generations.jsonl lines for one model from sample.generate's results (same order as prompts)."""
  rows = []
  for k, (pid, prompt, r) in enumerate(zip(ids, prompts, results)):
    row = {"id": pid, "model": model, "prompt": prompt, "answer": r["answer"],
           "stop_reason": r["stop_reason"], "n_answer_tokens": r["n_answer_tokens"],
           "n_generated_tokens": len(r["tokens"]), "prompt_tokens": r["prompt_tokens"],
           "prompt_truncated": r["truncated"], "prompt_tokens_cut": r["prompt_tokens_cut"]}
    if references is not None:
      row["reference"] = references[k]
    rows.append(row)
  return rows


# --- statistics ---------------------------------------------------------------------------------
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


def summarize(generations: list[dict], scores: Optional[list[dict]] = None,
              heldout: Optional[dict] = None, *, base: str = BASE, tuned: str = TUNED,
              n_boot: int = 10000, seed: int = 0) -> dict:
  """Every number the report shows, as a JSON-able dict."""
  out = {"models": {}, "base": base, "tuned": tuned}
  gen_by_key = {(g["id"], g["model"]): g for g in generations}
  for m in (base, tuned):
    rows = [g for g in generations if g["model"] == m]
    stops = {}
    for g in rows:
      stops[g.get("stop_reason", "unknown")] = stops.get(g.get("stop_reason", "unknown"), 0) + 1
    out["models"][m] = {
        "n_answers": len(rows), "stop_reasons": stops,
        "n_prompts_truncated": sum(bool(g.get("prompt_truncated")) for g in rows),
        "n_empty_answers": sum(not g["answer"].strip() for g in rows),
        "answer_tokens": length_stats([g["n_answer_tokens"] for g in rows])}
  if scores is not None:
    for m in (base, tuned):
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
    ids, r_base, r_tuned = paired(scores, base, tuned)
    diff, d_low, d_high = bootstrap_ci(r_tuned - r_base, n_boot=n_boot, seed=seed)
    win, w_low, w_high = bootstrap_ci(wins(r_tuned, r_base), n_boot=n_boot, seed=seed)
    out["paired"] = {"n_pairs": len(ids), "mean_difference": diff, "difference_ci": [d_low, d_high],
                     "win_rate": win, "win_rate_ci": [w_low, w_high],
                     "n_wins": int(np.sum(r_tuned > r_base)), "n_ties": int(np.sum(r_tuned == r_base)),
                     "n_losses": int(np.sum(r_tuned < r_base))}
  if heldout:
    out["heldout"] = {m: {"loss": float(v["loss"]),
                          "perplexity": float(v.get("perplexity", math.exp(float(v["loss"])))),
                          "tokens": v.get("tokens")} for m, v in heldout.items()}
  return out


# --- plots --------------------------------------------------------------------------------------
def _pyplot():
  import matplotlib
  matplotlib.use("Agg")  # files only; no display on servers
  import matplotlib.pyplot as plt
  return plt


def plot_reward_histogram(scores: list[dict], models: Sequence[str], path: str) -> str:
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4))
  rewards = {m: [s["reward"] for s in scores if s["model"] == m] for m in models}
  every = np.concatenate([np.asarray(v, np.float64) for v in rewards.values()] + [np.zeros(0)])
  bins = np.histogram_bin_edges(every, bins=30) if len(every) else 10
  for m, r in rewards.items():
    ax.hist(r, bins=bins, alpha=0.5, label=f"{m} (mean {np.mean(r):.3f}, n={len(r)})" if r else m)
  ax.set_xlabel("reward")
  ax.set_ylabel("answers")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


# --- report.md ----------------------------------------------------------------------------------
def fmt(x, digits: int = 4) -> str:
  """How every float appears in report.md (tests format the numbers they recompute the same way)."""
  return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _fence(text: str, limit: int = 1500) -> str:
  text = text if len(text) <= limit else "..." + text[-limit:]  # prompts: the end matters most
  return "~~~~text\n" + text.replace("~~~~", "~ ~ ~ ~") + "\n~~~~"


def write_report(eval_dir: str, *, generations_path: Optional[str] = None,
                 scores_path: Optional[str] = None, heldout_path: Optional[str] = None,
                 metrics_path: Optional[str] = None, skip_reason: Optional[str] = None,
                 reward_model: str = "", base: str = BASE, tuned: str = TUNED, n_samples: int = 3,
                 n_boot: int = 10000, seed: int = 0, loss_window: int = 100) -> str:
  """Writes report.md, summary.json and the PNGs into eval_dir from the files; returns report.md's path.

  Paths default to generations.jsonl / scores.jsonl / heldout.json / metrics.jsonl in eval_dir.
  Without a scores file the report says scoring was skipped, with skip_reason (or the text of
  eval_dir/scoring_skipped.txt), and shows everything else.
  """
  join = lambda name, given: given if given is not None else os.path.join(eval_dir, name)
  generations_path = join("generations.jsonl", generations_path)
  scores_path, heldout_path = join("scores.jsonl", scores_path), join("heldout.json", heldout_path)
  metrics_path = join("metrics.jsonl", metrics_path)
  generations = read_jsonl(generations_path)
  scores = read_jsonl(scores_path) if os.path.exists(scores_path) else None
  heldout = None
  if os.path.exists(heldout_path):
    with open(heldout_path) as f:
      heldout = json.load(f)
  metrics = read_jsonl(metrics_path) if os.path.exists(metrics_path) else []
  if scores is None and skip_reason is None:
    reason_file = os.path.join(eval_dir, SKIP_REASON_FILE)
    skip_reason = (open(reason_file).read().strip() if os.path.exists(reason_file)
                   else f"no scores file at {scores_path}")
  summary = summarize(generations, scores, heldout, base=base, tuned=tuned, n_boot=n_boot, seed=seed)
  summary["inputs"] = {"generations": generations_path, "scores": scores_path if scores else None,
                       "heldout": heldout_path if heldout else None,
                       "metrics": metrics_path if metrics else None, "reward_model": reward_model,
                       "scoring_skipped": None if scores is not None else skip_reason,
                       "n_boot": n_boot, "seed": seed}
  os.makedirs(eval_dir, exist_ok=True)
  models = summary["models"]
  lines = ["# Evaluation: base vs fine-tuned GPT-2", "",
           f"Generated from `{generations_path}`" + (f", `{scores_path}`" if scores else "")
           + (f", `{heldout_path}`" if heldout else "") + (f", `{metrics_path}`" if metrics else "")
           + f". Every number is also in `summary.json`. Intervals: 95% percentile bootstrap, "
           f"{n_boot} resamples, seed {seed}.", ""]

  lines += ["## Answers", "", "| model | answers | prompts left-truncated | empty answers | stop reasons "
            "| answer tokens mean | median | p90 |", "|---|---|---|---|---|---|---|---|"]
  for m in (base, tuned):
    s = models[m]
    stops = ", ".join(f"{k} {v}" for k, v in sorted(s["stop_reasons"].items()))
    t = s["answer_tokens"]
    lines.append(f"| {m} | {s['n_answers']} | {s['n_prompts_truncated']} | {s['n_empty_answers']} | "
                 f"{stops} | {fmt(t['mean'], 1)} | {fmt(t['median'], 1)} | {fmt(t['p90'], 1)} |")
  lines.append("")

  lines += ["## Reward", ""]
  if scores is None:
    lines += [f"**Scoring was skipped:** {skip_reason}", ""]
  else:
    p = summary["paired"]
    lines += [f"Reward model: `{reward_model or 'see scores.jsonl'}`.", "",
              "| model | scored | mean reward | 95% CI | std | inputs truncated by the reward model "
              "| empty answers | Pearson r (reward, tokens) | Spearman rho |",
              "|---|---|---|---|---|---|---|---|---|"]
    for m in (base, tuned):
      s = models[m]
      lo, hi = s["reward_ci"]
      c = s["reward_vs_length"]
      lines.append(f"| {m} | {s['n_scored']} | {fmt(s['reward_mean'])} | [{fmt(lo)}, {fmt(hi)}] | "
                   f"{fmt(s['reward_std'])} | {s['n_scored_truncated']} | {s['n_scored_empty']} | "
                   f"{fmt(c['pearson'])} | {fmt(c['spearman'])} |")
    lo, hi = p["difference_ci"]
    wlo, whi = p["win_rate_ci"]
    lines += ["", f"- Paired mean difference ({tuned} minus {base}, over {p['n_pairs']} prompts "
              f"both answered): **{fmt(p['mean_difference'])}**, 95% CI [{fmt(lo)}, {fmt(hi)}].",
              f"- Win rate of {tuned} over {base}: **{fmt(p['win_rate'])}**, 95% CI [{fmt(wlo)}, "
              f"{fmt(whi)}] ({p['n_wins']} wins, {p['n_ties']} ties, {p['n_losses']} losses; "
              "a tie counts as half a win).", ""]
    plot_reward_histogram(scores, (base, tuned), os.path.join(eval_dir, "reward_hist.png"))
    lines += ["![reward histogram](reward_hist.png)", ""]

  lines += ["## Held-out loss", ""]
  if heldout:
    lines += ["| model | loss (nats/token) | perplexity | tokens |", "|---|---|---|---|"]
    for m, v in summary["heldout"].items():
      lines.append(f"| {m} | {fmt(v['loss'])} | {fmt(v['perplexity'], 2)} | {v['tokens'] or 'n/a'} |")
  else:
    lines.append(f"Not measured (no `{heldout_path}`).")
  lines.append("")

  lines += ["## Training loss", ""]
  train = [r for r in metrics if r.get("split", "train") == "train" and "loss" in r]
  if metrics:
    metrics_lib.plot_loss_records(metrics, os.path.join(eval_dir, "loss_curve.png"), loss_window)
    summary["training"] = {"logged_steps": len(train), "last_step": train[-1]["step"] if train else None,
                           "last_train_loss": train[-1]["loss"] if train else None}
    if train:
      lines.append(f"{len(train)} logged steps; last train loss {fmt(train[-1]['loss'])} at step "
                   f"{train[-1]['step']}.")
    lines += ["", "![training loss](loss_curve.png)"]
  else:
    lines.append(f"No training log (no `{metrics_path}`).")
  lines.append("")

  lines += _samples(generations, scores, base, tuned, n_samples, seed)
  with open(os.path.join(eval_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2, default=str)
  path = os.path.join(eval_dir, "report.md")
  with open(path + ".tmp", "w") as f:
    f.write("\n".join(lines) + "\n")
  os.replace(path + ".tmp", path)
  return path


def _samples(generations, scores, base, tuned, n, seed) -> list[str]:
  """A few prompts (seeded choice) with both answers side by side, and their rewards if scored."""
  by_key = {(g["id"], g["model"]): g for g in generations}
  reward = {(s["id"], s["model"]): s["reward"] for s in scores or []}
  ids = sorted({g["id"] for g in generations if (g["id"], base) in by_key and (g["id"], tuned) in by_key},
               key=str)
  chosen = np.random.default_rng(seed).permutation(len(ids))[:n]
  lines = ["## Samples", ""]
  for k in sorted(chosen):
    pid = ids[k]
    lines += [f"### Prompt {pid}", "", _fence(by_key[(pid, base)]["prompt"]), ""]
    for m in (base, tuned):
      r = reward.get((pid, m))
      lines += [f"**{m}**" + (f" (reward {fmt(r)})" if r is not None else "")
                + f", stopped by {by_key[(pid, m)].get('stop_reason', '?')}:", "",
                _fence(by_key[(pid, m)]["answer"]), ""]
  return lines
