"""The offline demo's data, its grader and its demo scorer."""
import re

from gpt2_lora_jax.demo import data as demo_data


def replies(text):
  return re.findall(r"\n\nAssistant: (.*?)(?=\n\nHuman:|$)", text, re.S)


def test_demo_references_are_right_and_the_pretraining_text_is_all_wrong():
  rows = demo_data.rows("test", 300)
  checked = 0
  for row in rows:
    questions = re.findall(r"\n\nHuman: (.*?)\n\nAssistant:", row["chosen"])
    right, wrong = replies(row["chosen"]), replies(row["wrong"])
    assert len(right) == len(wrong) == len(questions)
    assert all(not demo_data.is_correct(w, r) for w, r in zip(wrong, right))  # every reply wrong
    assert replies(row["rejected"])[-1] == wrong[-1] and replies(row["rejected"])[:-1] == right[:-1]
    for q, r in zip(questions, right):  # the reference is the right answer, recomputed here
      if m := re.fullmatch(r"What is (\d+) (plus|minus) (\d+)\?", q):
        a, b = int(m.group(1)), int(m.group(3))
        assert r == f"{a} {m.group(2)} {b} is {a + b if m.group(2) == 'plus' else a - b}."
        checked += 1
      elif m := re.fullmatch(r"Which is larger, (\d+) or (\d+)\?", q):
        a, b = int(m.group(1)), int(m.group(2))
        assert r == f"{max(a, b)} is larger than {min(a, b)}."
        checked += 1
      elif m := re.fullmatch(r"Spell the word (\w+) backwards\.", q):
        assert r == f"{m.group(1)} backwards is {''.join(reversed(m.group(1)))}."
        checked += 1
  assert checked > 100
  assert demo_data.is_correct(" 5 plus 3 is 8.", "5 plus 3 is 8.")
  assert demo_data.is_correct("7 plus 1 is 8.", "5 plus 3 is 8.")  # the key fact, not the wording
  assert not demo_data.is_correct("5 plus 3 is 81.", "5 plus 3 is 8.")
  assert not demo_data.is_correct("The word ladder has 8 letters.", "The word ladder has 6 letters.")
  assert demo_data.is_correct("the sky is blue", "The sky is blue.")


def test_demo_scorer_loads_and_scores_through_the_reward_path(tmp_path):
  import json
  from gpt2_lora_jax import reward
  from gpt2_lora_jax.demo import scorer as demo_scorer
  info = demo_scorer.build(str(tmp_path / "scorer"), rows=200, steps=5, batch=8, test_rows=20,
                           log=None)
  assert info["steps"] == 5 and info["test_pairs"] == 20
  rows = demo_data.rows("test", 4)
  gens = tmp_path / "generations.jsonl"
  with open(gens, "w") as f:
    for i, row in enumerate(rows):
      cut = row["chosen"].rfind("\n\nAssistant:") + len("\n\nAssistant:")
      f.write(json.dumps({"id": i, "model": "base", "prompt": row["chosen"][:cut],
                          "answer": row["chosen"][cut:]}) + "\n")
  summary = reward.score_file(str(gens), str(tmp_path / "scores.jsonl"), str(tmp_path / "scorer"),
                              max_length=64, batch_size=4)
  assert summary["n"] == 4
  scores = [json.loads(l) for l in open(tmp_path / "scores.jsonl")]
  assert all(isinstance(s["reward"], float) and s["n_tokens"] <= 64 for s in scores)
