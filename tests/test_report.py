"""report.py: statistics on inputs with known answers, and report.md written from files only."""
import json
import math
import re
import os

import numpy as np
import pytest

from gpt2_lora_jax import report, stats


def test_bootstrap_ci_contains_the_mean_and_narrows_with_n():
  rng = np.random.default_rng(0)
  widths = []
  for n in (50, 200, 3200):
    x = rng.normal(1.0, 1.0, n)
    est, lo, hi = stats.bootstrap_ci(x, n_boot=4000, seed=1)
    assert est == pytest.approx(x.mean())
    assert lo < 1.0 < hi
    widths.append(hi - lo)
    # Matches the normal approximation 2 * 1.96 * sd / sqrt(n) within bootstrap noise.
    assert hi - lo == pytest.approx(2 * 1.96 * x.std(ddof=1) / math.sqrt(n), rel=0.15)
  assert widths[0] > widths[1] > widths[2]
  assert stats.bootstrap_ci(x, seed=3) == stats.bootstrap_ci(x, seed=3)  # seeded


def scores_for(pairs):
  """Score rows for {id: (base reward, tuned reward)}, in a scrambled order."""
  rows = []
  for pid, (b, t) in pairs.items():
    rows += [{"id": pid, "model": "finetuned", "reward": t}, {"id": pid, "model": "base", "reward": b}]
  return rows[::-1]


def test_paired_difference_and_win_rate_with_ties():
  pairs = {"a": (1.0, 2.0), "b": (2.0, 2.0), "c": (3.0, 2.0), "d": (-1.0, 0.0)}
  scores = scores_for(pairs) + [{"id": "only_base", "model": "base", "reward": 9.0}]
  ids, base, tuned = stats.paired(scores)
  assert ids == ["a", "b", "c", "d"]  # the prompt only one model answered is not paired
  np.testing.assert_array_equal(tuned - base, [1.0, 0.0, -1.0, 1.0])
  # a win, a tie (half), a loss, a win: 2.5 / 4
  assert stats.win_rate(tuned, base) == 0.625
  assert stats.win_rate([1, 1, 1], [1, 1, 1]) == 0.5
  gens = [{"id": s["id"], "model": s["model"], "answer": "x", "n_answer_tokens": 3} for s in scores]
  summary = stats.summarize(gens, scores, n_boot=500)
  assert summary["paired"]["mean_difference"] == pytest.approx(np.mean([1.0, 0.0, -1.0, 1.0]))
  assert summary["paired"]["win_rate"] == 0.625
  assert (summary["paired"]["n_wins"], summary["paired"]["n_ties"], summary["paired"]["n_losses"]) == (2, 1, 1)


def test_length_stats_and_correlations():
  s = stats.length_stats([1, 2, 3, 4, 100])
  assert (s["mean"], s["median"]) == (22.0, 3.0)
  assert s["p90"] == pytest.approx(np.percentile([1, 2, 3, 4, 100], 90))
  x = np.arange(1.0, 8.0)
  c = stats.correlations(x, x ** 3)
  assert c["spearman"] == pytest.approx(1.0) and 0.9 < c["pearson"] < 1.0
  assert math.isnan(stats.correlations([1, 1, 1], [1, 2, 3])["pearson"])


def write_jsonl(path, rows):
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)


@pytest.fixture
def eval_files(tmp_path):
  """generations.jsonl, scores.jsonl, heldout.json and metrics.jsonl for 30 prompts x 2 models."""
  rng = np.random.default_rng(0)
  gens, scores = [], []
  for i in range(30):
    for m, shift in (("base", 0.0), ("finetuned", 0.3)):
      n_tokens = int(rng.integers(0, 60))
      gens.append({"id": f"p{i}", "model": m, "prompt": f"\n\nHuman: question {i}?\n\nAssistant:",
                   "answer": "" if n_tokens == 0 else f"answer of {m} " * n_tokens,
                   "stop_reason": ["stop_string", "eos", "max_new_tokens"][i % 3],
                   "n_answer_tokens": n_tokens, "prompt_tokens": 8, "prompt_truncated": i == 4})
      scores.append({"id": f"p{i}", "model": m, "reward": float(rng.normal(shift, 1.0)),
                     "n_tokens": n_tokens + 10, "truncated": i == 7, "empty_answer": n_tokens == 0})
  write_jsonl(tmp_path / "generations.jsonl", gens)
  write_jsonl(tmp_path / "scores.jsonl", scores)
  (tmp_path / "heldout.json").write_text(json.dumps(
      {"base": {"loss": 3.25, "tokens": 1000}, "finetuned": {"loss": 2.5, "tokens": 1000}}))
  write_jsonl(tmp_path / "metrics.jsonl",
              [{"step": s, "split": "train", "loss": 4.0 - s / 100} for s in range(1, 101)]
              + [{"step": 50, "split": "eval", "loss": 3.6}, {"step": 100, "split": "eval", "loss": 3.1}])
  return tmp_path


def test_report_numbers_come_from_the_files(eval_files):
  path = report.write_report(str(eval_files), reward_model="tiny-rm", n_boot=2000)
  text = open(path).read()
  summary = json.load(open(eval_files / "summary.json"))
  gens = report.read_jsonl(eval_files / "generations.jsonl")
  scores = report.read_jsonl(eval_files / "scores.jsonl")
  reward = {(s["id"], s["model"]): s["reward"] for s in scores}
  for m in ("base", "finetuned"):
    rewards = [s["reward"] for s in scores if s["model"] == m]
    lengths = [g["n_answer_tokens"] for g in gens if g["model"] == m]
    assert summary["models"][m]["reward_mean"] == pytest.approx(np.mean(rewards))
    assert report.fmt(np.mean(rewards)) in text
    lo, hi = summary["models"][m]["reward_ci"]
    assert f"[{report.fmt(lo)}, {report.fmt(hi)}]" in text and lo < np.mean(rewards) < hi
    assert report.fmt(float(np.mean(lengths)), 1) in text
    assert summary["models"][m]["reward_vs_length"]["pearson"] == pytest.approx(
        np.corrcoef([reward[(g["id"], m)] for g in gens if g["model"] == m], lengths)[0, 1])
  diffs = [reward[(f"p{i}", "finetuned")] - reward[(f"p{i}", "base")] for i in range(30)]
  assert report.fmt(np.mean(diffs)) in text
  assert report.fmt(np.mean([d > 0 for d in diffs])) in text  # no ties in random rewards
  assert f"{report.fmt(3.25)} | {report.fmt(math.exp(3.25), 2)}" in text  # held-out loss, perplexity
  assert "last train loss 3.0000 at step 100" in text
  assert "| base | 30 | 1 |" in text  # 30 answers, 1 prompt truncated
  assert "a tie counts as half" in text and "Scoring was skipped" not in text
  for png in ("reward_hist.png", "loss_curve.png"):
    assert os.path.getsize(eval_files / png) > 1000
  assert text.count("### Prompt") == 3


def test_report_without_scores_says_why_and_shows_the_rest(eval_files):
  os.remove(eval_files / "scores.jsonl")
  os.remove(eval_files / "metrics.jsonl")
  (eval_files / report.SKIP_REASON_FILE).write_text("reward model unreachable (offline)\n")
  text = open(report.write_report(str(eval_files), n_boot=200)).read()
  assert "**Scoring was skipped:** reward model unreachable (offline)" in text
  assert "Paired mean difference" not in text and not (eval_files / "reward_hist.png").exists()
  lengths = [g["n_answer_tokens"] for g in report.read_jsonl(eval_files / "generations.jsonl")
             if g["model"] == "finetuned"]
  assert report.fmt(float(np.median(lengths)), 1) in text
  assert "No training log" in text and "### Prompt" in text
  text = open(report.write_report(str(eval_files), skip_reason="--reward_model ''")).read()
  assert "**Scoring was skipped:** --reward_model ''" in text


def test_report_says_what_it_evaluated_grades_answers_and_shows_informative_samples(eval_files):
  gens = report.read_jsonl(eval_files / "generations.jsonl")
  for g in gens:  # graded answers and a reference reply; base right on p0-p9, tuned on p0-p24
    i = int(g["id"][1:])
    g["reference"] = f"reference {i}"
    g["correct"] = i < (10 if g["model"] == "base" else 25)
    if i >= 3:  # only p0-p2 get the same answer from both models
      g["answer"] = f"{g['model']} says {i}"
    else:
      g["answer"] = "same"
  write_jsonl(eval_files / "generations.jsonl", gens)
  (eval_files / "heldout.json").write_text(json.dumps(  # evaluate.py writes token counts as floats
      {"base": {"loss": 3.25, "tokens": 1000.0}, "finetuned": {"loss": 2.5, "tokens": 1000.0}}))
  (eval_files / report.EVAL_CONFIG_FILE).write_text(json.dumps({
      "checkpoint_step": 100, "base": "openai-community/gpt2", "num_prompts": 30, "seed": 3,
      "temperature": 0.0, "max_new_tokens": 32, "stop_strings": ["\n\nHuman:"],
      "data": {"source": "hub", "field": "chosen", "eval_split": "test"}}))
  text = open(report.write_report(str(eval_files), reward_model="tiny-rm", n_boot=2000, n_samples=3)).read()
  summary = json.load(open(eval_files / "summary.json"))
  assert "Checkpoint: step **100**" in text and "Base model: `openai-community/gpt2`" in text
  assert "source 'hub'" in text and "greedy" in text and "seed 3" in text
  # Share correct: 10/30 and 25/30, paired difference 15/30, intervals around them.
  assert summary["models"]["base"]["n_correct"] == 10 and summary["models"]["finetuned"]["n_correct"] == 25
  for m, share in (("base", 10 / 30), ("finetuned", 25 / 30)):
    lo, hi = summary["models"][m]["correct_ci"]
    assert lo < share < hi and f"**{report.fmt(share, 3)}**" in text
  assert summary["correct_paired"]["difference"] == pytest.approx(0.5)
  # Samples: only pairs whose answers differ (27 of 30 do), with the reference reply shown.
  samples = text.split("## Samples")[1]
  shown = re.findall(r"### Prompt p(\d+)", samples)
  assert len(shown) == 3 and all(int(i) >= 3 for i in shown)
  assert "27 of 30 prompts got different answers" in samples
  assert all(f"reference {i}" in samples for i in shown)
  assert "| 1000 |" in text and "1000.0" not in text  # token counts are integers
