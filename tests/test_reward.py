"""The reward scorer as a real subprocess on a tiny random DeBERTa-v2 classifier built here."""
import json
import os

import pytest

from gpt2_lora_jax import hub, reward

def write_generations(path, rows):
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")


def in_process_rewards(model_dir, rows, max_length=512):
  """The reference: one pair at a time, no padding, exactly as the model card calls the model."""
  import torch
  from transformers import AutoModelForSequenceClassification, AutoTokenizer
  tok = AutoTokenizer.from_pretrained(model_dir)
  model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
  out = []
  for r in rows:
    enc = tok(reward.question_from_prompt(r["prompt"]), r["answer"].strip(), truncation=True,
              max_length=max_length, return_tensors="pt")
    with torch.no_grad():
      out.append((model(**enc).logits[0, 0].item(), enc["input_ids"].shape[1]))
  return out


def test_question_from_prompt():
  prompt = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help me\n\nAssistant:"
  assert reward.question_from_prompt(prompt) == "Human: hi\n\nAssistant: hello\n\nHuman: help me"
  assert reward.question_from_prompt("just a question") == "just a question"


def test_subprocess_scores_match_in_process(tiny_reward_dir, tmp_path):
  long_text = " ".join(["please tell me a story about my dog"] * 120)  # ~960 tokens
  rows = [
      {"id": "p0", "model": "base", "prompt": "\n\nHuman: what is two plus two?\n\nAssistant:", "answer": " four"},
      {"id": "p0", "model": "finetuned", "prompt": "\n\nHuman: what is two plus two?\n\nAssistant:",
       "answer": " it is four, sure"},
      {"id": "p1", "model": "base", "prompt": "\n\nHuman: can you help me?\n\nAssistant:", "answer": ""},
      {"id": "p2", "model": "base", "prompt": f"\n\nHuman: {long_text}\n\nAssistant:", "answer": " no"},
      {"id": "p3", "model": "finetuned", "prompt": "\n\nHuman: why?\n\nAssistant:", "answer": long_text},
  ]
  gen, out = tmp_path / "generations.jsonl", tmp_path / "scores.jsonl"
  write_generations(gen, rows)
  summary = reward.run_scorer_subprocess(str(gen), str(out), tiny_reward_dir, batch_size=3, max_length=512)
  scores = [json.loads(l) for l in out.read_text().splitlines()]
  assert [(s["id"], s["model"]) for s in scores] == [(r["id"], r["model"]) for r in rows]
  expected = in_process_rewards(tiny_reward_dir, rows)
  for s, (want_reward, want_len) in zip(scores, expected):
    assert abs(s["reward"] - want_reward) <= 1e-5, (s, want_reward)
    assert s["n_tokens"] == want_len <= 512
  assert [s["truncated"] for s in scores] == [False, False, False, True, True]
  assert scores[3]["n_tokens"] == 512 and scores[4]["n_tokens"] == 512
  assert [s["empty_answer"] for s in scores] == [False, False, True, False, False]
  assert summary["n"] == 5 and summary["n_empty_answers"] == 1 and summary["n_truncated"] == 2
  assert summary["device"] == "cpu" and summary["dtype"] == "float32"
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]  # no temporary files left


def test_missing_model_dir_is_a_clear_error(tmp_path):
  gen, out = tmp_path / "generations.jsonl", tmp_path / "scores.jsonl"
  write_generations(gen, [{"id": "p0", "model": "base", "prompt": "Human: hi", "answer": "hello"}])
  missing = str(tmp_path / "no_such_model")
  with pytest.raises(reward.ScorerError) as e:
    reward.run_scorer_subprocess(str(gen), str(out), missing)
  message = str(e.value)
  assert "exited with code 2" in message and "--reward_model" in message and missing in message
  assert not out.exists()


def test_unreachable_hub_id_names_the_flag():
  # conftest sets HF_HUB_OFFLINE=1: a hub id that is not cached cannot be fetched.
  with pytest.raises(hub.HubUnreachableError, match="--reward_model"):
    reward.load_reward_model("no-such-org/no-such-reward-model")


def test_bad_generations_file_fails_without_writing(tmp_path, capsys, tiny_reward_dir):
  gen, out = tmp_path / "generations.jsonl", tmp_path / "scores.jsonl"
  write_generations(gen, [{"id": "p0", "model": "base", "prompt": "Human: hi"}])  # no 'answer'
  assert reward.main(["--generations", str(gen), "--out", str(out), "--reward_model", tiny_reward_dir]) == 2
  err = capsys.readouterr().err
  assert "generations.jsonl:1" in err and "'answer'" in err
  assert not out.exists()
