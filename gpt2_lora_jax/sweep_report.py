"""The sweep's comparison: <workdir>/sweep_report.md, sweep_summary.json, sweep_loss.png, sweep_metric.png.

Built only from the files the runs left (sweep.py's layout): each finished run's
eval/step_<N>/{generations,scores,heldout,summary}.json(l), metrics.jsonl, data_summary.json and
sweep_run.json, and base_eval/. Runs that have not finished are listed as such, never dropped silently.

Per run: its overrides; held-out loss with a 95% bootstrap interval over the held-out packed rows;
share correct (graded data), reward difference, win rate and the length-matched reward difference vs
the base with their paired intervals (the numbers of the run's own report.md, summary.json); the
training rows data.reward_filter kept; training tokens/s (median over logged steps); wall time; the
final training loss. The table is sorted by sweep.metric.

The verdict: the best run by sweep.metric is compared with every other run on the same prompts (or
held-out rows): a paired bootstrap of the difference (both runs' values resampled together, n_boot
resamples, seed), a two-sided bootstrap p-value, Holm's adjustment over those comparisons when there
are more than one (stats.holm), and for each an interval at its Holm step's level. The best run is
named the winner only when its difference to the runner-up (the second best) is resolved: Holm-adjusted
p < ALPHA; otherwise the report says that the intervals do not separate them.
"""
from __future__ import annotations

import json
import math
import os
import statistics

import numpy as np

from gpt2_lora_jax import metrics as metrics_lib, stats, sweep
from gpt2_lora_jax.report import BASE, SKIP_REASON_FILE, TUNED, read_jsonl
from gpt2_lora_jax.report_preference import fmt

ALPHA = 0.05
N_BOOT, SEED = 10000, 0


def _run_files(workdir: str, run: sweep.Run) -> dict:
  """What a run left: {'name', 'overrides', 'record', 'finished', and when finished 'eval_dir' ...}."""
  run_dir = os.path.join(workdir, sweep.RUNS_DIR, run.name)
  record = sweep.read_json(os.path.join(run_dir, sweep.RUN_FILE)) or {}
  out = {"name": run.name, "index": run.index, "overrides": run.overrides, "dir": run_dir, "record": record,
         "finished": bool(record.get("done"))}
  if out["finished"]:
    eval_dir = os.path.join(run_dir, "eval", f"step_{record['done']['step']}")
    out["eval_dir"] = eval_dir
    out["summary"] = sweep.read_json(os.path.join(eval_dir, "summary.json"))
    out["heldout"] = sweep.read_json(os.path.join(eval_dir, "heldout.json"))
    out["generations"] = read_jsonl(os.path.join(eval_dir, "generations.jsonl"))
    scores = os.path.join(eval_dir, "scores.jsonl")
    out["scores"] = read_jsonl(scores) if os.path.exists(scores) else None
    out["metrics"] = metrics_lib.read(os.path.join(run_dir, metrics_lib.METRICS_FILE))
    out["data"] = sweep.read_json(os.path.join(run_dir, "data_summary.json")) or {}
  return out


def per_prompt(r: dict, metric: str):
  """{prompt id: value} of `metric` for one run (vs the base), or (row NLL, row tokens) for the
  held-out loss; None when the run has no such numbers (no scores, no graded answers)."""
  if metric == "heldout_loss":
    h = r["heldout"][TUNED]
    return (h["row_nll"], h["row_tokens"]) if "row_nll" in h else None
  if metric == "correct_difference":
    graded = {(g["id"], g["model"]): float(g["correct"]) for g in r["generations"] if "correct" in g}
    ids = {i for i, m in graded if m == TUNED and (i, BASE) in graded}
    return {i: graded[(i, TUNED)] - graded[(i, BASE)] for i in ids} or None
  if not r["scores"]:
    return None
  reward = {(s["id"], s["model"]): s["reward"] for s in r["scores"]}
  ids = {i for i, m in reward if m == TUNED and (i, BASE) in reward}
  if metric == "reward_difference":
    return {i: reward[(i, TUNED)] - reward[(i, BASE)] for i in ids} or None
  return {i: float(stats.wins([reward[(i, TUNED)]], [reward[(i, BASE)]])[0]) for i in ids} or None


def entry(r: dict, metric: str) -> dict:
  """One run's line of sweep_summary.json (module docstring)."""
  s, h = r["summary"], r["heldout"][TUNED]
  loss, lo, hi = (stats.ratio_ci(h["row_nll"], h["row_tokens"], N_BOOT, seed=SEED) if "row_nll" in h
                  else (h["loss"], math.nan, math.nan))
  paired = s.get("paired") or {}
  correct = s.get("correct_paired") or {}
  lm = paired.get("length_matched") or {}
  train = [m for m in r["metrics"] if m.get("split") == "train"]
  speeds = [m["tokens_per_s"] for m in train if "tokens_per_s" in m]
  seconds, lost = sweep.wall_time(r["record"])
  filtered = r["data"].get("reward_filter")
  e = {"name": r["name"], "overrides": r["overrides"], "step": r["record"]["done"]["step"],
       "eval_dir": r["eval_dir"], "heldout_loss": loss, "heldout_loss_ci": [lo, hi],
       "correct_share": s["models"][TUNED].get("correct_share"),
       "correct_difference": correct.get("difference"), "correct_difference_ci": correct.get("difference_ci"),
       "reward_difference": paired.get("mean_difference"), "reward_difference_ci": paired.get("difference_ci"),
       "win_rate": paired.get("win_rate"), "win_rate_ci": paired.get("win_rate_ci"),
       "length_matched_difference": lm.get("mean_difference"),
       "length_matched_difference_ci": lm.get("difference_ci"), "length_matched_prompts": lm.get("n_pairs"),
       "train_tokens_per_s": statistics.median(speeds) if speeds else None,
       "wall_time_s": seconds, "attempts_without_time": lost,
       "final_train_loss": train[-1]["loss"] if train else None,
       "train_rows_used": r["data"].get("rows_used"),
       "reward_filter": {k: filtered[k] for k in ("scored", "kept", "dropped", "threshold")} if filtered else None}
  e["metric"], e["metric_ci"] = e[metric], e.get(f"{metric}_ci")
  return e


def compare(best: dict, others: list[dict], metric: str) -> list[dict]:
  """The best run against each other run on the same prompts (rows): paired bootstrap, Holm."""
  out = []
  for o in others:
    if metric == "heldout_loss":
      if best["values"][1] != o["values"][1]:  # loss tokens per row: the same rows in the same order
        raise ValueError(f"runs {best['name']} and {o['name']} were not evaluated on the same held-out rows")
      est, boot = stats.paired_bootstrap(best["values"], o["values"], N_BOOT, SEED, ratio=True)
    else:
      ids = sorted(best["values"], key=str)
      if sorted(o["values"], key=str) != ids:
        raise ValueError(f"runs {best['name']} and {o['name']} were not scored on the same prompts")
      est, boot = stats.paired_bootstrap([best["values"][i] for i in ids], [o["values"][i] for i in ids],
                                         N_BOOT, SEED)
    out.append({"other": o["name"], "difference": est, "boot": boot, "p": stats.bootstrap_p(boot)})
  adjusted, divisors = stats.holm([c["p"] for c in out])
  for c, p_holm, divisor in zip(out, adjusted, divisors):
    level = 1 - ALPHA / divisor
    c.update(p_holm=p_holm, level=level, separated=p_holm < ALPHA,
             ci=np.quantile(c.pop("boot"), [(1 - level) / 2, (1 + level) / 2]).tolist())
  return out


def write(config, workdir: str) -> str:
  """--mode=sweep_report (and the end of --mode=sweep): the files of the module docstring (process 0
  of a multi-process run writes them; the others return '')."""
  import jax
  sweep.check_metric(config)
  if jax.process_index() != 0:
    return ""
  metric = config.sweep.metric
  what, higher = sweep.METRICS[metric]
  runs = [_run_files(workdir, r) for r in sweep.plan(config)]
  done = [r for r in runs if r["finished"]]
  entries = []
  for r in done:
    e = entry(r, metric)
    e["values"] = per_prompt(r, metric)
    entries.append(e)
  ranked = sorted((e for e in entries if e["values"] is not None and e["metric"] is not None),
                  key=lambda e: -e["metric"] if higher else e["metric"])
  valid = len(ranked)
  ranked += [e for e in entries if all(e is not r for r in ranked)]  # without the metric (no scores)
  verdict, comparisons = _verdict(ranked[:valid], metric, what)
  skipped = os.path.join(workdir, sweep.BASE_EVAL_DIR, SKIP_REASON_FILE)
  if not valid and metric != "heldout_loss" and os.path.exists(skipped):
    with open(skipped) as f:
      verdict += f" The base's answers were not scored: {f.read().strip()}"
  for e in entries:
    e.pop("values")
  base = sweep.read_json(os.path.join(workdir, sweep.BASE_EVAL_DIR, "heldout.json")) or {}
  base_h = base.get(BASE, {})
  base_loss = (stats.ratio_ci(base_h["row_nll"], base_h["row_tokens"], N_BOOT, seed=SEED)
               if "row_nll" in base_h else (base_h.get("loss", math.nan), math.nan, math.nan))
  summary = {"metric": metric, "metric_means": what, "higher_is_better": higher, "alpha": ALPHA,
             "n_boot": N_BOOT, "seed": SEED, "base": {"heldout_loss": base_loss[0], "heldout_loss_ci": list(base_loss[1:])},
             "runs": ranked, "not_finished": [{"name": r["name"], "overrides": r["overrides"],
                                               "started": bool(r["record"])} for r in runs if not r["finished"]],
             "best": ranked[0]["name"] if valid else None,
             "winner": ranked[0]["name"] if comparisons and comparisons[0]["separated"] else None,
             "comparisons": comparisons, "verdict": verdict}
  _plot_losses(done, os.path.join(workdir, "sweep_loss.png"), config.train.loss_avg_window)
  _plot_metric(ranked, metric, what, os.path.join(workdir, "sweep_metric.png"))
  with open(os.path.join(workdir, "sweep_summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  path = os.path.join(workdir, "sweep_report.md")
  with open(path + ".tmp", "w") as f:
    f.write("\n".join(_markdown(summary, runs, base_loss)) + "\n")
  os.replace(path + ".tmp", path)
  print(f"sweep report: {path}", flush=True)
  return path


def _verdict(valid: list[dict], metric: str, what: str) -> tuple[str, list[dict]]:
  """(the report's answer, the best run against each other run) from the runs ranked best first."""
  if not valid:
    return f"No finished run has {metric} ({what}); nothing is ranked.", []
  if len(valid) == 1:
    return f"Only {valid[0]['name']} has {metric}; there is nothing to compare it with.", []
  comparisons = compare(valid[0], valid[1:], metric)
  best, second, c = valid[0], valid[1], comparisons[0]
  holm = f", Holm-adjusted over {len(comparisons)} comparisons" if len(comparisons) > 1 else ""
  p = _p(c["p_holm"])
  diff = (f"{metric} of {best['name']} minus {second['name']}: {fmt(c['difference'])}, "
          f"{c['level']:.1%} interval [{fmt(c['ci'][0])}, {fmt(c['ci'][1])}], "
          f"p {p if p.startswith('<') else '= ' + p}{holm}")
  if c["separated"]:
    return f"**{best['name']}** is the best run by {metric} ({what}); it beats the runner-up: {diff}.", comparisons
  return (f"No winner: {best['name']} has the best {metric} ({what}), but the intervals do not separate "
          f"it from the runner-up {second['name']} ({diff}).", comparisons)


def _p(p: float) -> str:
  """A bootstrap p-value; 0 means no replicate fell on the other side of 0: p < 1 / N_BOOT."""
  return f"< {1 / N_BOOT:g}" if p == 0 else fmt(p)


def _ci(e: dict, key: str, digits: int = 3) -> str:
  v, ci = e.get(key), e.get(f"{key}_ci")
  if v is None:
    return "n/a"
  return f"{fmt(v, digits)} [{fmt(ci[0], digits)}, {fmt(ci[1], digits)}]" if ci else fmt(v, digits)


def _markdown(s: dict, runs: list[dict], base_loss) -> list[str]:
  lines = ["# Sweep report", "",
           f"{len(runs)} runs ({len(s['runs'])} finished), ranked by `{s['metric']}`: {s['metric_means']} "
           f"({'higher' if s['higher_is_better'] else 'lower'} is better). Every run answered the base's "
           "prompts and was scored by the same reward model; intervals are 95% percentile bootstrap "
           f"({s['n_boot']} resamples, seed {s['seed']}); every number is in `sweep_summary.json`.", "",
           "## Verdict", "", s["verdict"], ""]
  if s["comparisons"]:
    lines += [f"The best run against every other run (paired bootstrap of the difference on the same "
              f"{'held-out rows' if s['metric'] == 'heldout_loss' else 'prompts'}; each interval at its "
              f"Holm step's level; resolved when the Holm-adjusted p < {s['alpha']}):", "",
              "| best minus | difference | interval | level | p | Holm-adjusted p | resolved |",
              "|---|---|---|---|---|---|---|"]
    for c in s["comparisons"]:
      lines.append(f"| {c['other']} | {fmt(c['difference'])} | [{fmt(c['ci'][0])}, {fmt(c['ci'][1])}] | "
                   f"{c['level']:.2%} | {_p(c['p'])} | {_p(c['p_holm'])} | {'yes' if c['separated'] else 'no'} |")
    lines.append("")
  lines += ["## Runs", "", f"Base: held-out loss {fmt(base_loss[0], 3)} [{fmt(base_loss[1], 3)}, "
            f"{fmt(base_loss[2], 3)}]. Differences are fine-tuned minus base, per prompt.", "",
            "| rank | run | held-out loss | share correct | correct vs base | reward vs base | win rate | "
            "length-matched reward vs base (prompts) | train rows (reward filter kept / scored, threshold) | "
            "train tokens/s | wall time (s) | final train loss |", "|" + "---|" * 12]
  for k, e in enumerate(s["runs"], 1):
    f = e["reward_filter"]
    rows = f"{e['train_rows_used']}" + (f" ({f['kept']} / {f['scored']}, >= {fmt(f['threshold'], 3)})" if f else "")
    wall = fmt(e["wall_time_s"], 0) + (f" + {e['attempts_without_time']} attempt(s) untimed" if e["attempts_without_time"] else "")
    lines.append(f"| {k} | {e['name']} | {_ci(e, 'heldout_loss')} | {fmt(e['correct_share'], 3)} | "
                 f"{_ci(e, 'correct_difference')} | {_ci(e, 'reward_difference')} | {_ci(e, 'win_rate')} | "
                 f"{_ci(e, 'length_matched_difference')}"
                 + (f" ({e['length_matched_prompts']})" if e["length_matched_prompts"] is not None else "")
                 + f" | {rows} | "
                 f"{fmt(e['train_tokens_per_s'], 0)} | {wall} | {fmt(e['final_train_loss'], 3)} |")
  lines += ["", "Each run's own report: `runs/<run>/eval/step_<N>/report.md`. Overrides per run:", ""]
  lines += [f"- `{e['name']}`: " + (", ".join(f"`{k}={v!r}`" for k, v in e["overrides"].items()) or "the recipe")
            for e in s["runs"]]
  if s["not_finished"]:
    lines += ["", "## Not finished", "", "Not in the comparison (rerun --mode=sweep to finish them):", ""]
    lines += [f"- `{r['name']}`: {'started, not finished' if r['started'] else 'not started'}" for r in s["not_finished"]]
  lines += ["", "## Plots", "", "![training loss of every run](sweep_loss.png)", "",
            f"![{s['metric']} of every run](sweep_metric.png)", ""]
  return lines


def _plot_losses(done: list[dict], path: str, window: int):
  """Every run's training loss (mean per `window` steps) and held-out loss, overlaid."""
  from gpt2_lora_jax.report import _pyplot
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(9, 5))
  for k, r in enumerate(done):
    color = f"C{k % 10}"
    train = [(m["step"], m["loss"]) for m in r["metrics"] if m.get("split") == "train"]
    held = [(m["step"], m["loss"]) for m in r["metrics"] if m.get("split") == "eval"]
    if train:
      x, y = metrics_lib.window_means(*zip(*train), window)
      ax.plot(x, y, color=color, lw=1.5, label=f"{r['name']} (train, mean per {window} steps)")
    if held:
      ax.plot(*zip(*held), color=color, lw=1, ls="--", marker="s", ms=3)
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats per loss token)")
  ax.set_title("Training loss (solid) and held-out loss (dashed), every run")
  ax.grid(alpha=0.3)
  if done:
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _plot_metric(ranked: list[dict], metric: str, what: str, path: str):
  """The metric of every run with its interval, best first."""
  from gpt2_lora_jax.report import _pyplot
  plt = _pyplot()
  shown = [e for e in ranked if e["metric"] is not None]
  fig, ax = plt.subplots(figsize=(8, 1.2 + 0.45 * max(len(shown), 1)))
  for k, e in enumerate(shown):
    lo, hi = e["metric_ci"] or (e["metric"], e["metric"])
    ax.errorbar([e["metric"]], [k], xerr=[[e["metric"] - lo], [hi - e["metric"]]], fmt="o",
                color="tab:red" if k == 0 else "tab:blue", capsize=3)
  ax.set_yticks(range(len(shown)), [e["name"] for e in shown], fontsize=8)
  ax.invert_yaxis()
  if metric != "heldout_loss":
    ax.axvline(0.5 if metric == "win_rate" else 0.0, color="gray", lw=0.8, ls=":")
  ax.set_xlabel(f"{metric}: {what} (95% CI)")
  ax.set_title("Every run, best first")
  ax.grid(alpha=0.3, axis="x")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
