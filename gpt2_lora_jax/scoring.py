"""Evaluation's stage 4: the answers in generations.jsonl scored by the reward model, which runs as
its own process (reward.py), into scores.jsonl beside them; or, when it cannot run, why not.

A sweep (sweep.py) scores its base's answers once: each run's scoring copies those scores from the
base's directory (the same answers, the same scorer, as scored_by.json records) and scores only the
fine-tuned answers.
"""
from __future__ import annotations

import importlib.util
import json
import os

from gpt2_lora_jax import report, reward
from gpt2_lora_jax.demo import scorer as demo_scorer

DEMO_SCORER_DIR = demo_scorer.DIR  # eval.demo_scorer builds it here unless eval.demo_scorer_dir is set
DEMO_SCORER_LABEL = ("demo scorer (a tiny classifier trained on the demo's right vs wrong replies; "
                     "not a reward model of answer quality)")
SCORED_BY_FILE = "scored_by.json"  # beside scores.jsonl: the reward model and max_length that made it


def score_answers(config, workdir: str, out: str, reuse: str = "") -> tuple:
  """Stage 4: out/generations.jsonl scored into out/scores.jsonl by eval.reward_model (or the demo
  scorer) in a child process, or the reason it was not written out/scoring_skipped.txt. Returns
  (reason or None, the scorer's exception or None, the reward model as the report names it).

  reuse: a directory whose scores.jsonl was made by the same scorer (its scored_by.json): answers it
  already scored (the same id, model, prompt and answer) keep those scores, only the rest are scored.
  """
  ecfg = config.eval
  generations = os.path.join(out, "generations.jsonl")
  if not os.path.exists(generations):
    raise FileNotFoundError(f"{generations} does not exist: run --mode=eval first")
  scores = os.path.join(out, "scores.jsonl")
  skip_file = os.path.join(out, report.SKIP_REASON_FILE)
  new_scores = scores + ".partial"  # renamed to scores.jsonl only once the scorer has succeeded
  to_score = os.path.join(out, "generations.to_score.jsonl")  # what reuse leaves to score
  reason, failure = None, None
  reward_model, scorer_label = ecfg.reward_model, ""
  if ecfg.demo_scorer and not reward_model:
    reward_model, scorer_label = demo_scorer.location(config, workdir), DEMO_SCORER_LABEL
  scored_by = {"reward_model": reward_model, "max_length": ecfg.reward_max_length}
  if reward_model and importlib.util.find_spec("torch") is None:
    reason = ("PyTorch is not installed, and the reward scorer needs it: pip install 'torch==2.13.0' "
              "(or this package's eval extra: pip install -e '.[eval]'), then rerun with --mode=score")
  elif not reward_model:
    reason = ("no reward model configured (eval.reward_model is empty); score later with "
              "--mode=score --config.eval.reward_model=<hub id or local dir>")
  else:
    try:
      if scorer_label:
        info = demo_scorer.ensure(reward_model)
        scorer_label += (f"; it ranks {info['test_pairwise_accuracy']:.1%} of {info['test_pairs']} "
                         "held-out right/wrong reply pairs correctly")
      rows = report.read_jsonl(generations)
      reused = _reusable_scores(reuse, scored_by) if reuse else {}
      todo = [r for r in rows if _answer_key(r) not in reused]
      if reused:
        reward.write_jsonl_atomic(to_score, todo)
      if todo or not reused:
        reward.run_scorer_subprocess(to_score if reused else generations, new_scores, reward_model,
                                     batch_size=ecfg.reward_batch_size, max_length=ecfg.reward_max_length)
      if reused:
        new = {(s["id"], s["model"]): s for s in report.read_jsonl(new_scores)} if todo else {}
        reward.write_jsonl_atomic(new_scores, [reused.get(_answer_key(r)) or new[(r["id"], r["model"])]
                                               for r in rows])
      os.replace(new_scores, scores)
      reward.write_text_atomic(os.path.join(out, SCORED_BY_FILE), json.dumps(scored_by) + "\n")
      if os.path.exists(skip_file):
        os.remove(skip_file)
    except (reward.ScorerError, demo_scorer.BuildError) as e:
      failure = e
      kept = " (the scores already in scores.jsonl are kept)" if os.path.exists(scores) else ""
      reason = (f"the reward scorer failed; generations are kept{kept}, rerun scoring with "
                f"--mode=score. {e}")
    finally:
      for temporary in (new_scores, to_score):
        if os.path.exists(temporary):
          os.remove(temporary)
  if reason is not None:
    reward.write_text_atomic(skip_file, reason + "\n")
  return reason, failure, f"{reward_model}: {scorer_label}" if scorer_label else reward_model


def _answer_key(row: dict) -> tuple:
  return (row["id"], row["model"], row["prompt"], row["answer"])


def _reusable_scores(directory: str, scored_by: dict) -> dict:
  """{(id, model, prompt, answer): score line} of directory's scores.jsonl when the same scorer made it."""
  record = os.path.join(directory, SCORED_BY_FILE)
  if not os.path.exists(record) or not os.path.exists(os.path.join(directory, "scores.jsonl")):
    return {}
  with open(record) as f:
    if json.load(f) != scored_by:
      return {}
  answers = {(g["id"], g["model"]): g for g in report.read_jsonl(os.path.join(directory, "generations.jsonl"))}
  return {_answer_key(answers[(s["id"], s["model"])]): s
          for s in report.read_jsonl(os.path.join(directory, "scores.jsonl"))}
