"""Reward-filtered training rows: keep the conversations whose final Assistant reply scores highest.

    --config.data.reward_filter.keep_fraction=0.5   # the top half of the training rows by reward
    --config.data.reward_filter.min_reward=-1.0     # only rows whose final reply scores >= -1.0

The study this project grows from ends by asking for ways of pre-processing the training data into
higher quality training data; HH-RLHF's chosen replies are sometimes poor. Each training row's final
Assistant reply is scored once, as evaluation scores answers: reward.py in its own process, the
question being the dialogue before that reply (reward.question_from_prompt). The rows below the cut
are dropped before tokenising and counted in data_summary.json: skipped reason 'reward_filter', and
a 'reward_filter' entry with the rows scored, kept and dropped (by which rule) and the threshold in
reward units.

Rows scored: those that reach tokenising (well-formed, with a non-empty final reply). The cut: rows in
order of reward, highest first (equal rewards: the earlier row first); the first
floor(keep_fraction * n + 0.5) are kept, and of those only the rows scored at least min_reward.

Cache: <cache dir>/reward-scores-<key>.jsonl (data.cache_dir, else <workdir>/cache; a sweep shares
one), keyed by sha256 of the scored rows (index and text of each), the reward model's files (their
contents) and the scorer's max_length and cut rule: a second run, or every run of a sweep, reads the
scores instead of scoring. While scoring, reward.py --incremental appends each batch to
reward-scores-<key>.partial.jsonl, so a failure loses no score already written and the next run
scores only the rest. In a multi-process run only process 0 scores; the others wait and read.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from typing import NamedTuple, Optional

from gpt2_lora_jax import hub, reward
from gpt2_lora_jax.conversation import ASSISTANT, MARKERS
from gpt2_lora_jax.errors import UserError

REASON = "reward_filter"  # the skipped-rows reason in data_summary.json
CACHE_VERSION = 1  # bump when what is scored, or how, changes
PREFIX = "reward-scores-"  # cache files: PREFIX<key>.jsonl, PREFIX<key>.partial.jsonl
MODEL_FILES = ["*.json", "model.safetensors", "*.model", "*.txt"]  # what reward.load_reward_model reads
SCORED_MODEL = "train_row"  # the 'model' field of the scorer's input lines


class Scorer(NamedTuple):
  """What scores the rows: a reward model (hub id or local dir) and the scorer's settings."""
  reward_model: str
  batch_size: int
  max_length: int


def check(filter_cfg):
  if not 0.0 < filter_cfg.keep_fraction <= 1.0:
    raise UserError(f"data.reward_filter.keep_fraction={filter_cfg.keep_fraction}: a share in (0, 1] "
                    "(1.0 keeps every row)")
  if math.isnan(filter_cfg.min_reward):
    raise UserError("data.reward_filter.min_reward is NaN: give a number, or -inf for no threshold")


def active(data_cfg) -> bool:
  """Whether data.reward_filter drops anything (checking its values first)."""
  f = data_cfg.get("reward_filter")
  if f is None:
    return False
  check(f)
  return f.keep_fraction < 1.0 or f.min_reward > -math.inf


def run_settings(config) -> dict:
  """The filter's settings a checkpoint records (experiment.run_settings), only when it is on, so that
  runs without it record what they recorded before it existed."""
  if not active(config.data):
    return {}
  f = config.data.reward_filter
  out = {"data.reward_filter.keep_fraction": f.keep_fraction,
         "data.reward_filter.min_reward": None if f.min_reward == -math.inf else f.min_reward,
         "data.reward_filter.reward_model": f.reward_model}
  if not f.reward_model:  # the evaluation's scorer decides
    out.update({"eval.reward_model": config.eval.reward_model, "eval.demo_scorer": config.eval.demo_scorer})
  return out


def scorer_for(config, workdir: str) -> Optional[Scorer]:
  """The scorer of data.reward_filter (None when the filter is off): its reward_model, else
  eval.reward_model, else the demo scorer (eval.demo_scorer; built now if missing)."""
  if not active(config.data):
    return None
  name = config.data.reward_filter.reward_model or config.eval.reward_model
  if not name and config.eval.demo_scorer:
    import jax
    from gpt2_lora_jax import sharding
    from gpt2_lora_jax.demo import scorer as demo_scorer
    name = demo_scorer.location(config, workdir)
    if jax.process_index() == 0:
      demo_scorer.ensure(name)
    sharding.barrier("demo scorer built")  # every process hashes its files (cache_key)
  if not name:
    raise UserError("data.reward_filter needs a reward model to score the training rows: set "
                    "--config.data.reward_filter.reward_model=<hub id or local dir> (or eval.reward_model)")
  return Scorer(name, config.eval.reward_batch_size, config.eval.reward_max_length)


def model_identity(local_dir: str) -> str:
  """sha256 of every file of a reward model's directory (names and contents)."""
  h = hashlib.sha256()
  for root, _, files in sorted(os.walk(local_dir)):
    for name in sorted(files):
      path = os.path.join(root, name)
      h.update(f"\x1e{os.path.relpath(path, local_dir)}\x1f".encode())
      with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
          h.update(block)
  return h.hexdigest()


def cache_key(pairs: list[tuple[int, str, str]], identity: str, max_length: int) -> str:
  h = hashlib.sha256(f"gpt2_lora_jax.reward_filter v{CACHE_VERSION} answer_share {reward.ANSWER_SHARE} "
                     f"max_length {max_length} model {identity}\n".encode())
  for row, prompt, answer in pairs:
    h.update(f"\x1e{row}\x1f".encode() + prompt.encode("utf-8") + b"\x1f" + answer.encode("utf-8"))
  return h.hexdigest()


def apply(filter_cfg, conversations: list, scorer: Optional[Scorer], cache_dir: str,
          log=print) -> tuple[set, list[int], dict]:
  """conversations [(row index, turns)] -> (row indices kept, row indices dropped, summary)."""
  check(filter_cfg)
  if scorer is None:
    raise UserError("data.reward_filter is on but nothing was given to score the rows with: set "
                    "--config.data.reward_filter.reward_model=<hub id or local dir>")
  local = hub.resolve(scorer.reward_model, MODEL_FILES, what="reward model",
                      flag="--config.data.reward_filter.reward_model (or eval.reward_model)")
  pairs = [(int(row), "".join(MARKERS[t.role] + t.text for t in turns[:-1]) + MARKERS[ASSISTANT],
            turns[-1].text) for row, turns in conversations]
  key = cache_key(pairs, model_identity(local), scorer.max_length)[:24]
  final = os.path.join(cache_dir, f"{PREFIX}{key}.jsonl")
  from_cache = os.path.exists(final)
  scored_now = 0
  if not from_cache:
    import jax
    from gpt2_lora_jax import sharding
    if jax.process_index() == 0:
      scored_now = _score(pairs, local, scorer, cache_dir, key, final, log)
    sharding.barrier("reward filter scores cached")
  with open(final) as f:
    rewards = {int(r["id"]): float(r["reward"]) for r in map(json.loads, f)}
  order = sorted(range(len(pairs)), key=lambda k: (-rewards[pairs[k][0]], pairs[k][0]))
  n_top = math.floor(filter_cfg.keep_fraction * len(pairs) + 0.5)
  kept = [pairs[k][0] for k in order[:n_top] if rewards[pairs[k][0]] >= filter_cfg.min_reward]
  below_fraction = [pairs[k][0] for k in order[n_top:]]
  below_min = [pairs[k][0] for k in order[:n_top] if rewards[pairs[k][0]] < filter_cfg.min_reward]
  if not kept:
    raise UserError(f"data.reward_filter kept none of the {len(pairs)} training rows (keep_fraction "
                    f"{filter_cfg.keep_fraction}, min_reward {filter_cfg.min_reward}; the highest reward is "
                    f"{rewards[pairs[order[0]][0]]:.4f}): raise keep_fraction or lower min_reward")
  kept_rewards = [rewards[r] for r in kept]
  summary = {
      "reward_model": scorer.reward_model, "keep_fraction": filter_cfg.keep_fraction,
      "min_reward": None if filter_cfg.min_reward == -math.inf else filter_cfg.min_reward,
      "scored": len(pairs), "kept": len(kept), "dropped": len(pairs) - len(kept),
      "dropped_below_top_fraction": len(below_fraction), "dropped_below_min_reward": len(below_min),
      # The threshold in reward units: the lowest reward kept (every kept row scored at least this).
      "threshold": min(kept_rewards),
      "reward_mean_scored": sum(rewards.values()) / len(rewards), "reward_mean_kept": sum(kept_rewards) / len(kept),
      "cache": {"file": final, "from_cache": from_cache, "scored_now": scored_now},
  }
  if log:
    log(f"reward filter: kept {len(kept):,} of {len(pairs):,} training rows scored by "
        f"{scorer.reward_model} (reward >= {summary['threshold']:.4f}; dropped {len(below_fraction):,} "
        f"below the top {filter_cfg.keep_fraction:g}, {len(below_min):,} below min_reward); scores "
        f"{'read from' if from_cache else 'cached in'} {final}")
  return set(kept), sorted(below_fraction + below_min), summary


def _score(pairs, local: str, scorer: Scorer, cache_dir: str, key: str, final: str, log) -> int:
  """Scores the rows the partial file lacks (reward.py --incremental), then writes the cache file;
  returns how many rows were scored now."""
  os.makedirs(cache_dir, exist_ok=True)
  partial = os.path.join(cache_dir, f"{PREFIX}{key}.partial.jsonl")
  rows_file = os.path.join(cache_dir, f"reward-rows-{key}.jsonl")
  if not os.path.exists(rows_file):
    reward.write_jsonl_atomic(rows_file, ({"id": row, "model": SCORED_MODEL, "prompt": prompt, "answer": answer}
                                          for row, prompt, answer in pairs))
  before = len(reward.read_scored(partial))
  if log:
    log(f"reward filter: scoring the final replies of {len(pairs) - before:,} training rows with "
        f"{scorer.reward_model}" + (f" ({before:,} already scored in {partial})" if before else ""))
  try:
    reward.run_scorer_subprocess(rows_file, partial, local, batch_size=scorer.batch_size,
                                 max_length=scorer.max_length, incremental=True)
  except reward.ScorerError as e:
    raise reward.ScorerError(f"scoring the training rows for data.reward_filter failed; the "
                             f"{_lines(partial):,} scores written so far are kept in {partial} and a rerun "
                             f"scores only the rest. {e}") from e
  scores = {int(r["id"]): r for r in reward.read_scored(partial)}
  missing = [row for row, _, _ in pairs if row not in scores]
  if missing:  # the scorer exited 0 without scoring every row: a bug, never a silent gap
    raise RuntimeError(f"the reward scorer left {len(missing)} training rows unscored (rows {missing[:5]})")
  reward.write_jsonl_atomic(final, (scores[row] for row, _, _ in pairs))
  os.remove(partial)
  os.remove(rows_file)
  return len(pairs) - before


def _lines(path: str) -> int:
  """Complete lines in a file (0 when it cannot be read): safe to call while reporting a failure."""
  try:
    with open(path, "rb") as f:
      return f.read().count(b"\n")
  except OSError:
    return 0
