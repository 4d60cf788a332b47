"""The reward-model scorer: PyTorch + transformers, run as its own process.

    python -m gpt2_lora_jax.reward --generations eval/generations.jsonl --out eval/scores.jsonl \
        --reward_model OpenAssistant/reward-model-deberta-v3-large-v2   # or a local directory

It runs apart from the JAX process so that JAX (which on GPU preallocates most of the memory,
see run_scorer_subprocess) and PyTorch never hold the accelerator at the same time, and so that
this file is the only place that imports torch. It imports nothing from JAX.

Input, one JSON object per line: {'id': prompt id, 'model': 'base' | 'finetuned' | ..., 'prompt':
the dialogue ending in '\\n\\nAssistant:', 'answer': text}; other keys are ignored.
Output, one line per input line, same order: {'id', 'model', 'reward' (float), 'n_tokens' (tokens
the reward model saw, <= max_length), 'truncated' (the pair was longer than max_length),
'empty_answer'}. Empty answers are scored (and flagged), never dropped. The file is written to a
temporary name and renamed, so a crash never leaves a partial scores file.

The question the reward model sees is the prompt dialogue without its final '\\n\\nAssistant:'
cue (question_from_prompt). The OpenAssistant model card scores (question, answer) text pairs;
for multi-turn prompts the question keeps the earlier turns with their 'Human:'/'Assistant:'
labels, since the last request often only makes sense in context. Pairs are encoded as
tokenizer(question, answer, truncation=True, max_length=max_length) ('longest_first': the longer
side loses tokens first) and the reward is logits[0].

Exit codes: 0 ok, 2 bad input or unreachable model, 3 out of memory, 1 anything else.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ASSISTANT_CUE = "\n\nAssistant:"
DEFAULT_REWARD_MODEL = "OpenAssistant/reward-model-deberta-v3-large-v2"
REQUIRED_KEYS = ("id", "model", "prompt", "answer")


class ScorerError(RuntimeError):
  """The scorer process failed; the message carries the tail of its stderr."""


def question_from_prompt(prompt: str) -> str:
  """The dialogue up to (without) the final '\\n\\nAssistant:' cue, stripped of outer whitespace."""
  text = prompt.rstrip()
  if text.endswith(ASSISTANT_CUE.strip()):
    text = text[:text.rfind(ASSISTANT_CUE.strip())]
  return text.strip()


def read_generations(path: str) -> list[dict]:
  rows = []
  with open(path) as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_no}: not valid JSON ({e})") from e
      missing = [k for k in REQUIRED_KEYS if k not in row]
      if missing:
        raise ValueError(f"{path}:{line_no}: missing keys {missing}; every line needs {list(REQUIRED_KEYS)}")
      rows.append(row)
  return rows


def load_reward_model(name_or_path: str, device: str = "auto", dtype: str = "auto"):
  """(model, tokenizer, device, dtype) for a hub id or a local dir; half precision on GPU by default."""
  import torch
  from transformers import AutoModelForSequenceClassification, AutoTokenizer

  from gpt2_lora_jax import hub
  local = hub.resolve(name_or_path, ["*.json", "model.safetensors", "*.model", "*.txt"],
                      what="reward model", flag="--reward_model (python -m gpt2_lora_jax.reward) "
                      "or config.eval.reward_model")
  if device == "auto":
    device = "cuda" if torch.cuda.is_available() else "cpu"
  if dtype == "auto":
    dtype = "float16" if device.startswith("cuda") else "float32"
  tokenizer = AutoTokenizer.from_pretrained(local)
  model = AutoModelForSequenceClassification.from_pretrained(local, dtype=getattr(torch, dtype))
  return model.to(device).eval(), tokenizer, device, dtype


def score_pairs(model, tokenizer, questions, answers, *, max_length=512, batch_size=16,
                device="cpu", progress=None) -> list[dict]:
  """[{'reward', 'n_tokens', 'truncated'}] for each (question, answer), in batches padded inside.
  progress: called with (pairs done, pairs in all) after each batch."""
  import torch
  out = []
  for start in range(0, len(questions), batch_size):
    # Each pair is encoded exactly as a single tokenizer(question, answer) call would (a batched
    # call treats an empty answer differently), then padded into one batch.
    pairs = zip(questions[start:start + batch_size], answers[start:start + batch_size])
    encoded, full_lengths = [], []
    for q, a in pairs:
      encoded.append(tokenizer(q, a, truncation=True, max_length=max_length))
      # The untruncated length only flags what truncation cut; it is never fed to the model.
      full_lengths.append(len(tokenizer(q, a, truncation=False, verbose=False)["input_ids"]))
    enc = tokenizer.pad(encoded, return_tensors="pt")
    n_tokens = enc["attention_mask"].sum(-1).tolist()
    with torch.no_grad():
      logits = model(**{k: v.to(device) for k, v in enc.items()}).logits  # (b, num_labels)
    for i, reward in enumerate(logits[:, 0].float().cpu().tolist()):
      out.append({"reward": reward, "n_tokens": int(n_tokens[i]), "truncated": full_lengths[i] > max_length})
    if progress is not None:
      progress(len(out), len(questions))
  return out


def write_text_atomic(path: str, text: str) -> None:
  """Writes to a temporary file beside `path`, then renames: readers see the old file or the new one."""
  out_dir = os.path.dirname(os.path.abspath(path))
  os.makedirs(out_dir, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp_" + os.path.basename(path), dir=out_dir)
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the file gets the mode open() would give
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_jsonl_atomic(path: str, rows) -> None:
  """One JSON object per line, written atomically (write_text_atomic): all lines or no file."""
  write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def score_file(generations: str, out: str, reward_model: str, *, batch_size=16, max_length=512,
               device="auto", dtype="auto") -> dict:
  """Scores every line of `generations` into `out`; returns a summary (counts, device, seconds)."""
  t0 = time.time()
  rows = read_generations(generations)
  model, tokenizer, device, dtype = load_reward_model(reward_model, device, dtype)
  # Longest first: batches of similar length waste less padding (results go back in file order).
  order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["prompt"]) - len(rows[i]["answer"]))
  scored = score_pairs(model, tokenizer, [question_from_prompt(rows[i]["prompt"]) for i in order],
                       [rows[i]["answer"].strip() for i in order], max_length=max_length,
                       batch_size=batch_size, device=device, progress=_progress_printer())
  results = [None] * len(rows)
  for i, s in zip(order, scored):
    results[i] = {"id": rows[i]["id"], "model": rows[i]["model"], **s,
                  "empty_answer": not rows[i]["answer"].strip()}
  write_jsonl_atomic(out, results)
  return {"n": len(results), "n_empty_answers": sum(r["empty_answer"] for r in results),
          "n_truncated": sum(r["truncated"] for r in results), "reward_model": reward_model,
          "device": device, "dtype": dtype, "max_length": max_length, "seconds": time.time() - t0}


PROGRESS_PREFIX = "scoring: "


def _progress_printer(every_s: float = 10.0):
  """A progress callback that prints 'scoring: done/total answers' to stderr at most every
  `every_s` seconds, and at the end (run_scorer_subprocess passes these lines through)."""
  last = [0.0]

  def show(done, total):
    now = time.time()
    if done == total or now - last[0] >= every_s:
      last[0] = now
      print(f"{PROGRESS_PREFIX}{done}/{total} answers", file=sys.stderr, flush=True)
  return show


def run_scorer_subprocess(generations_path: str, out_path: str, reward_model: str = DEFAULT_REWARD_MODEL,
                          *, batch_size: int = 16, max_length: int = 512, device: str = "auto",
                          dtype: str = "auto", python: str = sys.executable, timeout=None,
                          env: dict | None = None) -> dict:
  """Runs `python -m gpt2_lora_jax.reward` in a child process; returns its summary dict.

  Why a child process: PyTorch needs the GPU memory JAX holds. JAX preallocates 75% of a GPU at
  its first use, and deleting arrays does not hand it back, so a caller that has run JAX on the
  same GPU should set XLA_PYTHON_CLIENT_PREALLOCATE=false before importing jax (memory then grows
  on demand and freed buffers can be returned with XLA_PYTHON_CLIENT_ALLOCATOR=platform), or
  generate in its own process, or pass device='cpu'.
  Raises ScorerError with the tail of the child's stderr when it exits nonzero.
  """
  cmd = [python, "-m", "gpt2_lora_jax.reward", "--generations", generations_path, "--out", out_path,
         "--reward_model", reward_model, "--batch_size", str(batch_size), "--max_length",
         str(max_length), "--device", device, "--dtype", dtype]
  child_env = dict(os.environ if env is None else env)
  # The package must import in the child even when it is not installed (run from a checkout).
  repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  child_env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, child_env.get("PYTHONPATH")) if p)
  # stderr is read as it comes: progress lines go through to ours, the rest is kept for errors.
  with tempfile.TemporaryFile("w+") as stdout:
    proc = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.PIPE, text=True, env=child_env)
    err_lines = []
    deadline = None if timeout is None else time.time() + timeout
    for line in proc.stderr:
      if line.startswith(PROGRESS_PREFIX):
        print(line.rstrip(), file=sys.stderr, flush=True)
      else:
        err_lines.append(line)
      if deadline is not None and time.time() > deadline:
        proc.kill()
        raise subprocess.TimeoutExpired(cmd, timeout)
    proc.wait(timeout=None if deadline is None else max(deadline - time.time(), 1))
    proc.stderr.close()
    stdout.seek(0)
    out_text, err_text = stdout.read(), "".join(err_lines)
  if proc.returncode != 0:
    tail = "\n".join(err_text.strip().splitlines()[-25:])
    raise ScorerError(f"reward scorer exited with code {proc.returncode} "
                      f"(command: {' '.join(cmd)}):\n{tail}")
  lines = [l for l in out_text.strip().splitlines() if l.startswith("{")]
  return json.loads(lines[-1]) if lines else {}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m gpt2_lora_jax.reward", description=__doc__.split("\n")[0])
  parser.add_argument("--generations", required=True, help="input JSONL (id, model, prompt, answer)")
  parser.add_argument("--out", required=True, help="output scores JSONL")
  parser.add_argument("--reward_model", default=DEFAULT_REWARD_MODEL, help="hub id or local directory")
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--max_length", type=int, default=512, help="tokens per (question, answer) pair")
  parser.add_argument("--device", default="auto", help="'auto' (cuda if present), 'cpu', 'cuda', 'cuda:1'")
  parser.add_argument("--dtype", default="auto", help="'auto' (float16 on GPU, float32 on CPU), "
                      "'float32', 'float16', 'bfloat16'")
  args = parser.parse_args(argv)
  from gpt2_lora_jax import hub
  try:
    summary = score_file(args.generations, args.out, args.reward_model, batch_size=args.batch_size,
                         max_length=args.max_length, device=args.device, dtype=args.dtype)
  except (hub.HubUnreachableError, FileNotFoundError, ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except Exception as e:  # out of memory gets its own advice; anything else its own message
    if "out of memory" in str(e).lower() or type(e).__name__ == "OutOfMemoryError":
      print(f"error: out of memory while scoring ({type(e).__name__}: {str(e).splitlines()[0]}); "
            f"lower --batch_size (now {args.batch_size}) or --max_length, or use --device cpu",
            file=sys.stderr)
      return 3
    print(f"error: scoring failed ({type(e).__name__}: {e}); {args.out} was not written",
          file=sys.stderr)
    return 1
  print(f"scored {summary['n']} answers ({summary['n_empty_answers']} empty, "
        f"{summary['n_truncated']} truncated to {args.max_length} tokens) on {summary['device']} "
        f"in {summary['seconds']:.1f}s -> {args.out}", file=sys.stderr)
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())
