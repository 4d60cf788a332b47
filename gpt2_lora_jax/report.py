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
  eval_config.json   optional: what was evaluated (checkpoint step, base, data and sampling settings,
                     the held-out sample's rows and prompts per subset)
  preference.json    optional (evaluate.compare): held-out pairs and every model's reply log-probs
  drift.jsonl        optional (evaluate.compare): each model's answers scored under earlier models
Generations may carry 'correct' (bool): tasks with one right answer (the offline demo's) are graded,
and the report gives each model's share of correct answers with an interval.
Outputs: report.md, summary.json (every number in the report), reward_hist.png, loss_curve.png.

The statistics (bootstrap intervals, paired differences, win rates, length matching) are stats.py's.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import numpy as np

from gpt2_lora_jax import metrics as metrics_lib, report_preference
from gpt2_lora_jax.report_preference import fmt  # the float format of report.md (report.fmt in tests)
from gpt2_lora_jax.stats import BASE, LENGTH_TOLERANCE, TUNED, model_pairs, summarize  # noqa: F401 (BASE, TUNED used as report.BASE)

SKIP_REASON_FILE = "scoring_skipped.txt"  # evaluate.py writes why scoring was skipped here
EVAL_CONFIG_FILE = "eval_config.json"  # evaluate.py writes what it evaluated here
PREFERENCE_FILE = "preference.json"  # evaluate.compare writes held-out preference log-probs here
DRIFT_FILE = "drift.jsonl"  # evaluate.compare writes each model's answers scored under earlier models here


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
def _pyplot():
  import matplotlib
  matplotlib.use("Agg")  # files only; no display on servers
  import matplotlib.pyplot as plt
  return plt


def plot_reward_histogram(scores: list[dict], models: Sequence[str], path: str,
                          title: str = "Reward of the answers, per model") -> str:
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4))
  rewards = {m: [s["reward"] for s in scores if s["model"] == m] for m in models}
  every = np.concatenate([np.asarray(v, np.float64) for v in rewards.values()] + [np.zeros(0)])
  bins = np.histogram_bin_edges(every, bins=30) if len(every) else 10
  for m, r in rewards.items():
    ax.hist(r, bins=bins, alpha=0.5, label=f"{m} (mean {np.mean(r):.3f}, n={len(r)})" if r else m)
  ax.set_xlabel("reward")
  ax.set_ylabel("answers")
  ax.set_title(title)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


# --- report.md ----------------------------------------------------------------------------------
def _fence(text: str, limit: int = 1500) -> str:
  text = text if len(text) <= limit else "..." + text[-limit:]  # prompts: the end matters most
  return "~~~~text\n" + text.replace("~~~~", "~ ~ ~ ~") + "\n~~~~"


def write_report(eval_dir: str, *, generations_path: Optional[str] = None,
                 scores_path: Optional[str] = None, heldout_path: Optional[str] = None,
                 metrics_path: Optional[str] = None, skip_reason: Optional[str] = None,
                 reward_model: str = "", base: str = BASE, tuned: str = TUNED,
                 models: Optional[Sequence[str]] = None, n_samples: int = 3,
                 n_boot: int = 10000, seed: int = 0, loss_window: int = 100) -> str:
  """Writes report.md, summary.json and the PNGs into eval_dir from the files; returns report.md's path.

  models: the models compared, in order; default eval_config.json's 'models', else every model in
  the generations (summarize).
  A preference.json in eval_dir (evaluate.compare) adds the held-out preference accuracies, a
  drift.jsonl the reward-against-KL section (report_preference.py).

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
  eval_config_path = os.path.join(eval_dir, EVAL_CONFIG_FILE)
  eval_config = None
  if os.path.exists(eval_config_path):
    with open(eval_config_path) as f:
      eval_config = json.load(f)
  models = models or (eval_config or {}).get("models")
  preference_path = os.path.join(eval_dir, PREFERENCE_FILE)
  preference = None
  if os.path.exists(preference_path):
    with open(preference_path) as f:
      preference = json.load(f)
  drift_path = os.path.join(eval_dir, DRIFT_FILE)
  drift = read_jsonl(drift_path) if os.path.exists(drift_path) else None
  if scores is None and skip_reason is None:
    reason_file = os.path.join(eval_dir, SKIP_REASON_FILE)
    skip_reason = (open(reason_file).read().strip() if os.path.exists(reason_file)
                   else f"no scores file at {scores_path}")
  summary = summarize(generations, scores, heldout, base=base, tuned=tuned, models=models,
                      preference=preference, drift=drift, n_boot=n_boot, seed=seed)
  summary["inputs"] = {"generations": generations_path, "scores": scores_path if scores else None,
                       "heldout": heldout_path if heldout else None,
                       "metrics": metrics_path if metrics else None, "reward_model": reward_model,
                       "scoring_skipped": None if scores is not None else skip_reason,
                       "n_boot": n_boot, "seed": seed, "evaluated": eval_config}
  os.makedirs(eval_dir, exist_ok=True)
  stats = summary["models"]
  models = summary["model_order"]
  title = "base vs fine-tuned" if models == [base, tuned] else " vs ".join(models)
  lines = [f"# Evaluation: {title} GPT-2", "",
           f"Generated from `{generations_path}`" + (f", `{scores_path}`" if scores else "")
           + (f", `{heldout_path}`" if heldout else "") + (f", `{metrics_path}`" if metrics else "")
           + f". Every number is also in `summary.json`. Intervals: 95% percentile bootstrap, "
           f"{n_boot} resamples, seed {seed}.", ""]
  lines += _evaluated(eval_config, reward_model, preference)

  lines += ["## Answers", "", "| model | answers | prompts left-truncated | empty answers | stop reasons "
            "| answer tokens mean | median | p90 |", "|---|---|---|---|---|---|---|---|"]
  for m in models:
    s = stats[m]
    stops = ", ".join(f"{k} {v}" for k, v in sorted(s["stop_reasons"].items()))
    t = s["answer_tokens"]
    lines.append(f"| {m} | {s['n_answers']} | {s['n_prompts_truncated']} | {s['n_empty_answers']} | "
                 f"{stops} | {fmt(t['mean'], 1)} | {fmt(t['median'], 1)} | {fmt(t['p90'], 1)} |")
  lines.append("")

  if "correct_paired" in summary:
    p = summary["correct_paired"]
    lines += ["## Correct answers", "", "Each task has one right reply (the reference shown with the "
              "samples); an answer is correct when it states that reply's key fact (the data set's "
              "grader; for the demo, demo/data.py's is_correct).", "",
              "| model | graded | correct | share correct | 95% CI |", "|---|---|---|---|---|"]
    for m in (m for m in models if "n_graded" in stats[m]):
      s = stats[m]
      lo, hi = s["correct_ci"]
      lines.append(f"| {m} | {s['n_graded']} | {s['n_correct']} | **{fmt(s['correct_share'], 3)}** | "
                   f"[{fmt(lo, 3)}, {fmt(hi, 3)}] |")
    lo, hi = p["difference_ci"]
    lines += ["", f"- Paired difference in share correct ({tuned} minus {base}, over {p['n_pairs']} "
              f"prompts): **{fmt(p['difference'], 3)}**, 95% CI [{fmt(lo, 3)}, {fmt(hi, 3)}].", ""]

  lines += ["## Reward", ""]
  if scores is None:
    lines += [f"**Scoring was skipped:** {skip_reason}", ""]
  else:
    lines += [f"Reward model: `{reward_model or 'see scores.jsonl'}`.", "",
              "| model | scored | mean reward | 95% CI | std | inputs truncated by the reward model "
              "| empty answers | Pearson r (reward, tokens) | Spearman rho |",
              "|---|---|---|---|---|---|---|---|---|"]
    for m in models:
      s = stats[m]
      lo, hi = s["reward_ci"]
      c = s["reward_vs_length"]
      lines.append(f"| {m} | {s['n_scored']} | {fmt(s['reward_mean'])} | [{fmt(lo)}, {fmt(hi)}] | "
                   f"{fmt(s['reward_std'])} | {s['n_scored_truncated']} | {s['n_scored_empty']} | "
                   f"{fmt(c['pearson'])} | {fmt(c['spearman'])} |")
    lines.append("")
    for a, b in model_pairs(models):
      p = summary["pairs"][f"{a} vs {b}"]
      lo, hi = p["difference_ci"]
      wlo, whi = p["win_rate_ci"]
      lines += [f"- Paired mean difference ({a} minus {b}, over {p['n_pairs']} prompts "
                f"both answered): **{fmt(p['mean_difference'])}**, 95% CI [{fmt(lo)}, {fmt(hi)}].",
                f"- Win rate of {a} over {b}: **{fmt(p['win_rate'])}**, 95% CI [{fmt(wlo)}, "
                f"{fmt(whi)}] ({p['n_wins']} wins, {p['n_ties']} ties, {p['n_losses']} losses; "
                "a tie counts as half a win)."]
    lines.append("")
    plot_reward_histogram(scores, models, os.path.join(eval_dir, "reward_hist.png"))
    lines += ["![reward histogram](reward_hist.png)", ""]
    lines += _length_section(summary, generations, scores, models, eval_dir)

  lines += report_preference.preference_section(summary.get("preference"), models)
  lines += report_preference.drift_section(summary.get("drift"))
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
    metrics_lib.plot_loss_records(metrics, os.path.join(eval_dir, "loss_curve.png"), loss_window,
                                  title="Fine-tuning loss (the run this report evaluates)")
    summary["training"] = {"logged_steps": len(train), "last_step": train[-1]["step"] if train else None,
                           "last_train_loss": train[-1]["loss"] if train else None}
    if train:
      lines.append(f"{len(train)} logged steps; last train loss {fmt(train[-1]['loss'])} at step "
                   f"{train[-1]['step']}.")
    lines += ["", "![training loss](loss_curve.png)"]
  else:
    lines.append(f"No training log (no `{metrics_path}`).")
  lines.append("")

  lines += _samples(generations, scores, models, n_samples, seed)
  with open(os.path.join(eval_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2, default=str)
  path = os.path.join(eval_dir, "report.md")
  with open(path + ".tmp", "w") as f:
    f.write("\n".join(lines) + "\n")
  os.replace(path + ".tmp", path)
  return path


def plot_reward_vs_length(scores: list[dict], generations: list[dict], models: Sequence[str],
                          path: str) -> str:
  plt = _pyplot()
  tokens = {(g["id"], g["model"]): g["n_answer_tokens"] for g in generations}
  fig, ax = plt.subplots(figsize=(7, 4))
  for m in models:
    rows = [s for s in scores if s["model"] == m]
    ax.scatter([tokens[(s["id"], m)] for s in rows], [s["reward"] for s in rows], s=10, alpha=0.5, label=m)
  ax.set_xlabel("answer tokens")
  ax.set_ylabel("reward")
  ax.set_title("Reward vs answer length, per model")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def _length_section(summary, generations, scores, models, eval_dir) -> list[str]:
  """Answer lengths per pair of models, and the paired comparison on length-matched prompts only."""
  lines = ["## Answer length", "",
           "Reward models can reward length (see the Pearson and Spearman columns above), so each pair "
           f"is also compared on the prompts whose two answers have about the same length (token counts "
           f"within {LENGTH_TOLERANCE:.0%} of the longer, or 2 tokens).", "",
           "| pair | mean tokens (first, second) | difference, all prompts | length-matched prompts | "
           "difference, length-matched | 95% CI | win rate, length-matched |",
           "|---|---|---|---|---|---|---|"]
  for a, b in model_pairs(models):
    p = summary["pairs"][f"{a} vs {b}"]
    lm = p["length_matched"]
    lo, hi = lm["difference_ci"]
    lines.append(f"| {a} vs {b} | {fmt(p['answer_tokens_mean'][a], 1)}, {fmt(p['answer_tokens_mean'][b], 1)} "
                 f"| {fmt(p['mean_difference'])} | {lm['n_pairs']} of {p['n_pairs']} | "
                 f"{fmt(lm['mean_difference'])} | [{fmt(lo)}, {fmt(hi)}] | {fmt(lm['win_rate'])} |")
  plot_reward_vs_length(scores, generations, models, os.path.join(eval_dir, "reward_vs_length.png"))
  return lines + ["", "![reward vs length](reward_vs_length.png)", ""]


def _evaluated(cfg: Optional[dict], reward_model: str, preference: Optional[dict] = None) -> list[str]:
  """The 'What was evaluated' section from eval_config.json (evaluate.write_eval_config)."""
  lines = ["## What was evaluated", ""]
  if not cfg:
    return lines + [f"Not recorded (no `{EVAL_CONFIG_FILE}`).", ""]
  data = cfg.get("data", {})
  data_text = ", ".join(f"{k} {v!r}" for k, v in data.items() if not isinstance(v, dict))
  top = "greedy" if not cfg.get("temperature") else (
      f"temperature {cfg['temperature']}, top_k {cfg.get('top_k', 0)}, top_p {cfg.get('top_p', 1.0)}")
  runs = cfg.get("runs") or {}
  checkpoint = (["- Checkpoints: " + "; ".join(f"{name} = `{r['workdir']}` step **{r['step']}**"
                                                for name, r in runs.items()) + "."] if runs else
                [f"- Checkpoint: step **{cfg.get('checkpoint_step')}** (fine-tuned = the base with this "
                 "checkpoint's trained parameters)."])
  lines += checkpoint + [
            f"- Base model: `{cfg.get('base')}`.",
            f"- Data: {data_text}.",
            f"- Prompts: {cfg.get('num_prompts')} held-out prompts drawn with seed {cfg.get('seed')}; "
            f"sampling {top}, at most {cfg.get('max_new_tokens')} new tokens, stop at "
            f"{cfg.get('stop_strings')} or end-of-text, sampling seed {cfg.get('seed')}.",
            f"- Reward model: `{reward_model or cfg.get('reward_model') or 'none'}`.", ""]
  return lines + report_preference.subsets_section(cfg, preference)


def _samples(generations, scores, models, n, seed) -> list[str]:
  """A few prompts (seeded choice, prompts whose answers differ first) with every model's answer
  side by side, the reference reply, and rewards and grades when there are any."""
  by_key = {(g["id"], g["model"]): g for g in generations}
  reward = {(s["id"], s["model"]): s["reward"] for s in scores or []}
  ids = sorted({g["id"] for g in generations if all((g["id"], m) in by_key for m in models)}, key=str)
  differ = lambda pid: len({by_key[(pid, m)]["answer"].strip() for m in models}) > 1
  order = np.random.default_rng(seed).permutation(len(ids))
  picked = ([k for k in order if differ(ids[k])] + [k for k in order if not differ(ids[k])])[:n]
  n_differ = sum(differ(i) for i in ids)
  lines = ["## Samples", "", f"{n_differ} of {len(ids)} prompts got different answers from the "
           f"{len(models)} models; {len(picked)} are shown (seed {seed}, prompts with different answers "
           "first).", ""]
  first = models[0]
  for k in sorted(picked):
    pid = ids[k]
    lines += [f"### Prompt {pid}", "", _fence(by_key[(pid, first)]["prompt"]), ""]
    if by_key[(pid, first)].get("reference") is not None:
      lines += ["**reference reply** (from the data set):", "", _fence(by_key[(pid, first)]["reference"]), ""]
    for m in models:
      r = reward.get((pid, m))
      grade = by_key[(pid, m)].get("correct")
      lines += [f"**{m}**" + (f" (reward {fmt(r)})" if r is not None else "")
                + ("" if grade is None else (", correct" if grade else ", wrong"))
                + f", stopped by {by_key[(pid, m)].get('stop_reason', '?')}:", "",
                _fence(by_key[(pid, m)]["answer"]), ""]
  return lines
