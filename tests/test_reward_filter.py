"""data.reward_filter on the real HH-RLHF rows, scored by a small BERT classifier built here: the rows
kept against a selection written here from the cached rewards, those rewards against the scorer run
in this process, the counts of data_summary, the cache read by a second build (nothing scored
again), and scores kept across a failed or killed scorer."""
import gzip
import json
import math
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from gpt2_lora_jax import config, data, reward, reward_filter

REAL_ROWS = 2312
EMPTY_FINAL_REPLY_ROWS = 4  # tests/test_data.py names them
MAX_LENGTH = 256  # the scorer's tokens per pair
ASSISTANT = "\n\nAssistant:"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
  """The scorer processes and this one use one thread each (the suite runs beside other work)."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("OMP_NUM_THREADS", "1")
    yield


@pytest.fixture(scope="module")
def scorer_dir(hh_test_file, tmp_path_factory):
  """A random 1-layer BERT sequence classifier (1 label) whose WordPiece vocabulary holds the words of
  the real rows, saved with save_pretrained: small, and a pair is about as many tokens as words."""
  import torch
  import transformers
  out = str(tmp_path_factory.mktemp("row_scorer"))
  with gzip.open(hh_test_file, "rt") as f:
    words = {w for line in f for w in re.findall(r"[a-z0-9]+|[^a-z0-9\s]", json.loads(line)["chosen"].lower())}
  chars = "abcdefghijklmnopqrstuvwxyz0123456789"
  vocab = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(words - set(chars)) + list(chars)
           + ["##" + c for c in chars])
  with open(os.path.join(out, "vocab.txt"), "w") as f:
    f.write("\n".join(vocab) + "\n")
  transformers.BertTokenizerFast(vocab=os.path.join(out, "vocab.txt"), do_lower_case=True).save_pretrained(out)
  torch.manual_seed(0)
  config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=32, num_labels=1)
  transformers.BertForSequenceClassification(config).save_pretrained(out)
  return out


def filter_config(hh_test_file, keep_fraction=0.5, min_reward=-math.inf):
  cfg = config.default_config().data
  cfg.source, cfg.train_files = "files", (hh_test_file,)
  cfg.reward_filter.keep_fraction, cfg.reward_filter.min_reward = keep_fraction, min_reward
  return cfg


def read_lines(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def filtered(hh_test_file, tokenizer, scorer_dir, tmp_path_factory):
  cache = str(tmp_path_factory.mktemp("filter_cache"))
  scorer = reward_filter.Scorer(scorer_dir, batch_size=64, max_length=MAX_LENGTH)
  packed, summary = data.build(filter_config(hh_test_file), tokenizer, "train", cache_dir=cache, log=None,
                               reward_scorer=scorer)
  return scorer, cache, packed, summary


def test_the_top_half_by_reward_is_kept_and_every_row_is_counted(filtered):
  _, _, packed, summary = filtered
  f = summary["reward_filter"]
  n = REAL_ROWS - EMPTY_FINAL_REPLY_ROWS  # every real row parses; four have an empty final reply
  assert f["scored"] == n and f["kept"] == math.floor(0.5 * n + 0.5) and f["dropped"] == n - f["kept"]
  assert f["dropped_below_top_fraction"] == f["dropped"] and f["dropped_below_min_reward"] == 0
  assert summary["rows_skipped"]["reward_filter"]["count"] == f["dropped"]
  assert summary["rows_read"] == REAL_ROWS == summary["rows_used"] + sum(
      v["count"] for v in summary["rows_skipped"].values())
  assert f["cache"]["from_cache"] is False and f["cache"]["scored_now"] == n
  # The selection, written here: highest reward first, equal rewards in row order.
  scores = read_lines(f["cache"]["file"])
  rows, rewards = np.array([s["id"] for s in scores]), np.array([s["reward"] for s in scores])
  assert sorted(rows.tolist()) == rows.tolist() and len(rows) == n
  order = np.lexsort((rows, -rewards))
  kept = set(rows[order[:f["kept"]]].tolist())
  assert f["threshold"] == rewards[order[f["kept"] - 1]] == min(rewards[rows == r][0] for r in kept)
  used = set(np.asarray(packed.conversation_rows).tolist())
  too_long = summary["rows_skipped"].get("final_exchange_too_long", {"count": 0})["count"]
  assert used <= kept and len(used) + too_long == len(kept)
  assert f["reward_mean_kept"] == pytest.approx(np.mean([rewards[rows == r][0] for r in kept]))


def test_the_cached_rewards_score_each_rows_final_reply(filtered, hh_test_file, scorer_dir):
  from transformers import AutoModelForSequenceClassification, AutoTokenizer
  _, _, _, summary = filtered
  with gzip.open(hh_test_file, "rt") as f:
    texts = [json.loads(line)["chosen"] for line in f]
  cached = {s["id"]: s["reward"] for s in read_lines(summary["reward_filter"]["cache"]["file"])}
  picked = sorted(cached)[::251]  # a spread of rows
  # The question is the dialogue before the final "Assistant:", the answer the reply after it.
  cut = [texts[r].rfind(ASSISTANT) for r in picked]
  questions = [texts[r][:k].strip() for r, k in zip(picked, cut)]
  answers = [texts[r][k + len(ASSISTANT):].strip() for r, k in zip(picked, cut)]
  model = AutoModelForSequenceClassification.from_pretrained(scorer_dir).eval()
  want = reward.score_pairs(model, AutoTokenizer.from_pretrained(scorer_dir), questions, answers,
                            max_length=MAX_LENGTH, batch_size=1)
  assert [cached[r] for r in picked] == pytest.approx([w["reward"] for w in want], abs=1e-5)


def test_a_second_build_reads_the_cached_scores(filtered, hh_test_file, tokenizer, monkeypatch):
  scorer, cache, _, first = filtered
  path = first["reward_filter"]["cache"]["file"]
  stamp = os.stat(path).st_mtime_ns

  def no_scoring(*args, **kwargs):
    raise AssertionError("the reward scorer ran although the scores are cached")
  monkeypatch.setattr(reward, "run_scorer_subprocess", no_scoring)
  # Another keep fraction and a threshold (a sweep's next run): the same rows, the same scores.
  _, summary = data.build(filter_config(hh_test_file, 0.25, min_reward=first["reward_filter"]["threshold"]),
                          tokenizer, "train", cache_dir=cache, log=None, reward_scorer=scorer)
  f = summary["reward_filter"]
  assert f["cache"] == {"file": path, "from_cache": True, "scored_now": 0} and os.stat(path).st_mtime_ns == stamp
  n = first["reward_filter"]["scored"]
  assert f["kept"] == math.floor(0.25 * n + 0.5) and f["dropped"] == n - f["kept"]
  assert f["threshold"] >= first["reward_filter"]["threshold"] and f["dropped_below_min_reward"] == 0


def test_scores_written_before_a_failure_are_kept_and_only_the_rest_scored(filtered, hh_test_file, tokenizer,
                                                                          tmp_path):
  scorer, _, _, first = filtered
  done = read_lines(first["reward_filter"]["cache"]["file"])
  cache = tmp_path / "cache"
  cache.mkdir()
  name = os.path.basename(first["reward_filter"]["cache"]["file"]).replace(".jsonl", ".partial.jsonl")
  # What a scorer that failed 100 rows before the end left, marked so that a rescored row would show.
  written = len(done) - 100
  kept = [{**s, "reward": s["reward"] + 1000.0} for s in done[:written]]
  (cache / name).write_text("".join(json.dumps(s) + "\n" for s in kept) + '{"id": 12, "mod')  # a cut line
  _, summary = data.build(filter_config(hh_test_file), tokenizer, "train", cache_dir=str(cache), log=None,
                          reward_scorer=scorer)
  f = summary["reward_filter"]
  assert f["cache"]["scored_now"] == 100 and not f["cache"]["from_cache"]
  final = {s["id"]: s["reward"] for s in read_lines(f["cache"]["file"])}
  assert [final[s["id"]] for s in kept] == [s["reward"] for s in kept]  # not scored again
  assert [final[s["id"]] for s in done[written:]] == pytest.approx([s["reward"] for s in done[written:]], abs=1e-5)
  assert sorted(os.listdir(cache)) == sorted([os.path.basename(f["cache"]["file"])] +
                                             [p for p in os.listdir(cache) if p.startswith("hh-tokens-")])


def test_a_killed_incremental_scorer_keeps_its_lines(hh_test_file, scorer_dir, tmp_path):
  with gzip.open(hh_test_file, "rt") as f:
    texts = [json.loads(line)["chosen"] for _, line in zip(range(120), f)]
  gens = tmp_path / "rows.jsonl"
  gens.write_text("".join(json.dumps({"id": i, "model": "train_row", "prompt": t[:t.rfind(ASSISTANT) + len(ASSISTANT)],
                                      "answer": t[t.rfind(ASSISTANT) + len(ASSISTANT):]}) + "\n"
                          for i, t in enumerate(texts)))
  out = tmp_path / "scores.jsonl"
  args = ["--generations", str(gens), "--out", str(out), "--reward_model", scorer_dir,
          "--max_length", str(MAX_LENGTH), "--incremental"]
  proc = subprocess.Popen([sys.executable, "-m", "gpt2_lora_jax.reward", *args, "--batch_size", "1"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 120
  while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 20):
    time.sleep(0.02)
  proc.kill()
  proc.wait(timeout=60)
  before = reward.read_scored(str(out))  # complete lines only (a line cut by the kill is dropped)
  assert 20 <= len(before) < 120
  summary = reward.run_scorer_subprocess(str(gens), str(out), scorer_dir, batch_size=32,
                                         max_length=MAX_LENGTH, incremental=True)
  after = reward.read_scored(str(out))
  assert summary["n"] == 120 and summary["n_scored_now"] == 120 - len(before)
  assert after[:len(before)] == before and sorted(s["id"] for s in after) == list(range(120))


def test_bad_filter_settings_and_dpo_fail_in_one_line(tmp_path):
  from gpt2_lora_jax import study
  from gpt2_lora_jax.errors import UserError
  c = config.default_config()
  for keep, least, message in ((0.0, -math.inf, "keep_fraction=0.0"), (1.5, -math.inf, "keep_fraction=1.5"),
                               (1.0, math.nan, "min_reward is NaN")):
    c.data.reward_filter.keep_fraction, c.data.reward_filter.min_reward = keep, least
    with pytest.raises(UserError, match=message):
      reward_filter.active(c.data)
  c.data.reward_filter.keep_fraction, c.data.reward_filter.min_reward = 1.0, -math.inf
  assert not reward_filter.active(c.data) and reward_filter.run_settings(c) == {}  # off: nothing recorded
  c.data.reward_filter.min_reward = 0.5
  assert reward_filter.run_settings(c)["data.reward_filter.min_reward"] == 0.5
  with pytest.raises(UserError, match="DPO does not filter its pairs"):  # refused, never ignored
    study.train_dpo(c, str(tmp_path))
