r"""The demo scorer: a tiny sequence classifier trained in seconds on the demo's chosen vs rejected replies.

    python -m gpt2_lora_jax.demo.scorer --out DIR [--rows 4000 --steps 300]

It is a stand-in that lets the offline demo exercise the real scoring path (`python -m
gpt2_lora_jax.reward --reward_model DIR`, the report's reward section) with no download. It is NOT
a reward model of answer quality: it learned only what separates the demo's right replies from its
wrong ones, and the report labels it "demo scorer". The directory is an ordinary Hugging Face
sequence-classification checkpoint (a 2-layer BERT, 1 label, a word-level WordPiece tokenizer over
the demo's words with single characters as the fallback), written with save_pretrained.

Training: the Bradley-Terry loss -log sigmoid(r(question, chosen) - r(question, rejected)), Adam,
on the demo's train rows; its pairwise accuracy on the demo's test rows is written to
DIR/demo_scorer.json and printed. Pairs are encoded exactly as reward.py encodes them.
Like reward.py this is the PyTorch side: it imports nothing from JAX.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

ASSISTANT = "\n\nAssistant:"
INFO_FILE = "demo_scorer.json"
DIR = "demo_scorer"  # built in <workdir>/DIR unless eval.demo_scorer_dir says otherwise


def location(config, workdir: str) -> str:
  """Where eval.demo_scorer builds and reads the demo scorer: eval.demo_scorer_dir, else <workdir>/demo_scorer."""
  return config.eval.get("demo_scorer_dir", "") or os.path.join(workdir, DIR)


def _pairs(rows: list[dict]):
  """(question, chosen reply, rejected reply) per demo row, the question as reward.py builds it."""
  from gpt2_lora_jax.reward import question_from_prompt
  out = []
  for row in rows:
    cut = row["chosen"].rfind(ASSISTANT) + len(ASSISTANT)
    out.append((question_from_prompt(row["chosen"][:cut]), row["chosen"][cut:].strip(),
                row["rejected"][cut:].strip()))
  return out


def _vocab(rows: list[dict]) -> list[str]:
  words = set()
  for row in rows:
    words.update(re.findall(r"[a-z]+|[^a-z0-9\s]", (row["chosen"] + row["rejected"]).lower()))
  chars = "abcdefghijklmnopqrstuvwxyz0123456789"
  return (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(words - set(chars))
          + list(chars) + ["##" + c for c in chars])


def build(out_dir: str, rows: int = 4000, steps: int = 150, batch: int = 16, seed: int = 0,
          max_length: int = 64, lr: float = 5e-4, test_rows: int = 500, log=print) -> dict:
  import torch
  import transformers

  from gpt2_lora_jax.demo import data as demo_data
  t0 = time.time()
  train_rows, test_rows = demo_data.rows("train", rows, seed), demo_data.rows("test", test_rows, seed)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "vocab.txt"), "w") as f:
    f.write("\n".join(_vocab(train_rows + test_rows)) + "\n")
  tok = transformers.BertTokenizerFast(vocab=os.path.join(out_dir, "vocab.txt"), do_lower_case=True)
  tok.model_max_length = max_length
  tok.truncation_side = "left"  # a long dialogue loses its oldest turns, never the final question
  torch.manual_seed(seed)
  config = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=128,
                                   max_position_embeddings=max_length, num_labels=1,
                                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  model = transformers.BertForSequenceClassification(config)

  def rewards(questions, answers):
    enc = tok(list(questions), list(answers), truncation=True, max_length=max_length, padding=True,
              return_tensors="pt")
    return model(**enc).logits[:, 0]

  train, test = _pairs(train_rows), _pairs(test_rows)
  opt = torch.optim.Adam(model.parameters(), lr=lr)
  gen = torch.Generator().manual_seed(seed)
  model.train()
  for step in range(steps):
    idx = torch.randint(0, len(train), (batch,), generator=gen).tolist()
    q, good, bad = zip(*(train[i] for i in idx))
    r = rewards(q + q, good + bad)
    loss = -torch.nn.functional.logsigmoid(r[:batch] - r[batch:]).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    if log and (step + 1) % 50 == 0:
      log(f"demo scorer: step {step + 1}/{steps}, pairwise loss {loss.item():.3f}")
  model.eval()
  with torch.no_grad():
    q, good, bad = zip(*test)
    accuracy = float((rewards(q, good) > rewards(q, bad)).float().mean())
  model.save_pretrained(out_dir)
  tok.save_pretrained(out_dir)
  info = {"what": "demo scorer: a 2-layer BERT trained on the demo's chosen vs rejected replies; "
                  "not a reward model of answer quality",
          "train_pairs": len(train), "steps": steps, "batch": batch,
          "test_pairs": len(test), "test_pairwise_accuracy": accuracy, "seconds": time.time() - t0}
  with open(os.path.join(out_dir, INFO_FILE), "w") as f:
    json.dump(info, f, indent=2)
  return info


class BuildError(RuntimeError):
  """Training the demo scorer failed; the message carries the tail of the child's stderr."""


def ensure(out_dir: str, python: str = sys.executable) -> dict:
  """Builds the demo scorer in out_dir (a child process: PyTorch stays out of the JAX process) unless
  it is there already; returns its DIR/demo_scorer.json record. Raises BuildError on failure."""
  info_path = os.path.join(out_dir, INFO_FILE)
  if not os.path.exists(info_path):
    _build_in_child(out_dir, python)
  with open(info_path) as f:
    return json.load(f)


def _build_in_child(out_dir: str, python: str):
  import subprocess
  env = dict(os.environ)
  repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, env.get("PYTHONPATH")) if p)
  print(f"training the demo scorer -> {out_dir}", flush=True)
  proc = subprocess.run([python, "-m", "gpt2_lora_jax.demo.scorer", "--out", out_dir], env=env,
                        stdout=sys.stdout, stderr=subprocess.PIPE, text=True)
  if proc.returncode != 0:
    raise BuildError("building the demo scorer failed:\n"
                     + "\n".join(proc.stderr.strip().splitlines()[-15:]))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m gpt2_lora_jax.demo.scorer",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="directory to write the classifier to")
  parser.add_argument("--rows", type=int, default=4000, help="demo train rows to learn from")
  parser.add_argument("--steps", type=int, default=150)
  parser.add_argument("--lr", type=float, default=5e-4)
  args = parser.parse_args(argv)
  info = build(args.out, rows=args.rows, steps=args.steps, lr=args.lr,
               log=lambda m: print(m, flush=True))
  print(f"demo scorer: pairwise accuracy {info['test_pairwise_accuracy']:.3f} on {info['test_pairs']} "
        f"held-out chosen/rejected pairs, {info['seconds']:.1f}s -> {args.out}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
