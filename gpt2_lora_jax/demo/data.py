"""Conversations written for this project's offline demo, in HH-RLHF's row format.

Each row is {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}: one to three
exchanges of small tasks whose answers follow from the question (arithmetic, comparing numbers,
reversing and spelling words, counting letters, repeating a phrase, a few fixed courtesies). A tiny
GPT-2 can learn them in minutes on a CPU, so the demo shows a loss that falls and answers that
change, with no download. The "rejected" reply is a wrong answer (for preference methods and the
demo scorer); "wrong" is the same dialogue with every Assistant reply wrong, the text the demo's
base is pre-trained on, so that its habits differ from what LoRA then teaches and the change is
visible. Each task has exactly one right reply (the "chosen" one), so `is_correct` can grade an
answer against a prompt's reference reply by the task's key fact. Train and test rows come from disjoint questions (split
by a hash of the question).
"""
from __future__ import annotations

import hashlib
import json
import random
import re

WORDS = ("apple", "river", "planet", "garden", "window", "silver", "candle", "forest", "pencil",
         "rocket", "yellow", "bridge", "castle", "dragon", "island", "jacket", "lemon", "mirror",
         "orange", "pepper", "rabbit", "saddle", "tunnel", "violin", "wizard", "zebra", "anchor",
         "basket", "cookie", "donkey", "engine", "falcon", "guitar", "helmet", "kitten", "ladder")
PHRASES = ("the sky is blue", "cats like to nap", "rain falls in spring", "books open new worlds",
           "tea is best hot", "the train leaves at noon", "maps show the way", "bees make honey",
           "snow melts in the sun", "owls hunt at night", "bread needs yeast", "rivers run to the sea")
COURTESIES = (
    ("Hello!", "Hello! How can I help you today?"),
    ("Thank you.", "You're welcome. Is there anything else I can do?"),
    ("Good morning.", "Good morning! What would you like to do?"),
    ("Can you help me?", "Of course. Tell me what you need."),
    ("Goodbye.", "Goodbye, and have a nice day!"),
)


def _exchange(rng: random.Random):
  """One (question, right answer, wrong answer) triple."""
  kind = rng.randrange(7)
  if kind == 0:
    a, b = rng.randrange(100), rng.randrange(100)
    return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", f"{a} plus {b} is {a + b + rng.choice((-2, 1, 3))}."
  if kind == 1:
    a, b = rng.randrange(10, 100), rng.randrange(1, 10)  # b > 0: the wrong reply (a + b) differs
    return f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}.", f"{a} minus {b} is {a + b}."
  if kind == 2:
    a, b = rng.sample(range(1000), 2)
    return (f"Which is larger, {a} or {b}?", f"{max(a, b)} is larger than {min(a, b)}.",
            f"{min(a, b)} is larger than {max(a, b)}.")
  if kind == 3:
    w = rng.choice(WORDS)
    return f"Spell the word {w} backwards.", f"{w} backwards is {w[::-1]}.", f"{w} backwards is {w}."
  if kind == 4:
    w = rng.choice(WORDS)
    return f"Spell {w} letter by letter.", f"{'-'.join(w)}.", f"{'-'.join(sorted(w))}."
  if kind == 5:
    w = rng.choice(WORDS)
    return (f"How many letters does the word {w} have?", f"The word {w} has {len(w)} letters.",
            f"The word {w} has {len(w) + 2} letters.")
  if kind == 6 and rng.random() < 0.6:
    p = rng.choice(PHRASES)
    return f"Repeat after me: {p}.", f"{p.capitalize()}.", "I would rather not."
  q, a = rng.choice(COURTESIES)
  return q, a, "No."


def _split_of(question: str) -> str:
  """Every question lands in one split, so test questions are never seen in training."""
  return "test" if int(hashlib.sha256(question.encode()).hexdigest(), 16) % 10 == 0 else "train"


def rows(split: str, n: int, seed: int = 0, wrong_share: float = 0.0) -> list[dict]:
  """n rows of `split` ('train' or 'test'), deterministic in (split, n, seed, wrong_share).

  wrong_share: the share of rows (a seeded draw per row, independent of the rows themselves) whose
  "chosen" final reply is the wrong one, "rejected"'s, as real HH-RLHF chosen replies are sometimes
  poor; such rows carry "final_reply_wrong": True. The rows are otherwise those of wrong_share 0.
  """
  if split not in ("train", "test"):
    raise ValueError(f"demo split {split!r}: 'train' or 'test'")
  if not 0.0 <= wrong_share <= 1.0:
    raise ValueError(f"demo wrong_share={wrong_share}: a share in [0, 1]")
  if wrong_share > 0:
    flip = random.Random(f"{seed}:{split}:wrong")
    out = rows(split, n, seed)
    for row in out:
      row["final_reply_wrong"] = flip.random() < wrong_share
      if row["final_reply_wrong"]:
        row["chosen"] = row["rejected"]
    return out
  rng = random.Random(f"{seed}:{split}")
  out = []
  while len(out) < n:
    turns = rng.choice((1, 1, 2, 3))
    exchanges = []
    while len(exchanges) < turns:
      q, a, wrong = _exchange(rng)
      if _split_of(q) == split or q in dict(COURTESIES):
        exchanges.append((q, a, wrong))
    prefix = "".join(f"\n\nHuman: {q}\n\nAssistant: {a}" for q, a, _ in exchanges[:-1])
    q, a, wrong = exchanges[-1]
    if _split_of(q) != split:
      continue  # the final (scored) question must belong to this split
    out.append({"chosen": f"{prefix}\n\nHuman: {q}\n\nAssistant: {a}",
                "rejected": f"{prefix}\n\nHuman: {q}\n\nAssistant: {wrong}",
                "wrong": "".join(f"\n\nHuman: {q}\n\nAssistant: {w}" for q, _, w in exchanges),
                "subset": task_of(q)})
  return out


TASKS = ("arithmetic", "comparison", "spelling", "counting", "repeating", "courtesy")


def task_of(question: str) -> str:
  """The kind of task a question asks (one of TASKS): a demo row's subset, as HH-RLHF rows have one
  (data.py stratifies held-out samples over subsets)."""
  if re.fullmatch(r"What is \d+ (plus|minus) \d+\?", question):
    return "arithmetic"
  if question.startswith("Which is larger"):
    return "comparison"
  if question.startswith("Spell "):
    return "spelling"
  if question.startswith("How many letters"):
    return "counting"
  if question.startswith("Repeat after me"):
    return "repeating"
  return "courtesy"


def is_correct(answer: str, reference: str) -> bool:
  """Whether a demo answer states the key fact of the task's one right reply (the reference, the
  row's "chosen" reply): the sum or difference ('... is 72'), the larger number first ('710 is
  larger ...'), the reversed word ('... is elppa'), the letter count ('has 6 letters'); spelled
  letters, repeated phrases and courtesies must be the reference itself (case and the final period
  aside). Every wrong reply of the demo data fails this check (tests/test_demo.py)."""
  a, r = answer.strip(), reference.strip()
  if m := re.fullmatch(r"\d+ (?:plus|minus) \d+ is (-?\d+)\.", r):
    return re.search(rf"\bis {m.group(1)}\b", a) is not None
  if m := re.fullmatch(r"(\d+) is larger than \d+\.", r):
    return a.startswith(f"{m.group(1)} is larger")
  if m := re.fullmatch(r"\w+ backwards is (\w+)\.", r):
    return re.search(rf"\bis {m.group(1)}\b", a) is not None
  if m := re.fullmatch(r"The word \w+ has (\d+) letters\.", r):
    return f"has {m.group(1)} letters" in a
  return a.lower().rstrip(".") == r.lower().rstrip(".")


def write_jsonl(path: str, split: str, n: int, seed: int = 0) -> str:
  with open(path, "w") as f:
    for row in rows(split, n, seed):
      f.write(json.dumps(row) + "\n")
  return path
