"""The reward-model scorer: PyTorch + transformers, run as its own process.

    python -m gpt2_lora_jax.reward --generations eval/generations.jsonl --out eval/scores.jsonl \
        --reward_model OpenAssistant/reward-model-deberta-v3-large-v2   # or a local directory

It runs apart from the JAX process so that JAX (which on GPU preallocates most of the memory,
see run_scorer_subprocess) and PyTorch never hold the accelerator at the same time, and so that
this file is the only place that imports torch. It imports nothing from JAX.

Input, one JSON object per line: {'id': prompt id, 'model': 'base' | 'finetuned' | ..., 'prompt':
the dialogue ending in '\\n\\nAssistant:', 'answer': text}; other keys are ignored.
Output, one line per input line, same order: {'id', 'model', 'reward' (float), 'n_tokens' (tokens
the reward model saw, <= max_length), 'truncated' (anything was cut), 'question_tokens_cut',
'question_turns_cut' (whole Human turns dropped from the question's start), 'question_cut_mid_turn'
(the final Human turn alone did not fit and lost tokens from its start), 'answer_tokens_cut',
'empty_answer'}. Empty answers are scored (and flagged), never dropped. The file is written to a
temporary name and renamed, so a crash never leaves a partial scores file. With --incremental
(reward_filter.py's many training rows) it is the other way round: each batch's lines are appended
to the output as soon as they are scored (in scoring order, so read them by id), and input rows
whose (id, model) the output already holds are not scored again, so a failure loses no score
already written and rerunning the same command scores only the rest.

The question the reward model sees is the prompt dialogue without its final '\n\nAssistant:'
cue (question_from_prompt). The OpenAssistant model card scores (question, answer) text pairs;
for multi-turn prompts the question keeps the earlier turns with their 'Human:'/'Assistant:'
labels, since the last request often only makes sense in context.

What is cut when a pair is longer than max_length (encode_pair): the request being judged is at
the question's end and the answer is what is judged, so neither is cut from the right the way
tokenizer(question, answer, truncation=True) would (that cuts the longer side from its end: the
final request, on a long dialogue). The answer keeps up to max(ANSWER_SHARE of the token budget,
what the question leaves free) tokens, cut from its end beyond that. The question loses its start:
whole turns up to a '\n\nHuman:' boundary (the earliest from which the rest fits), or, when
the final Human turn alone does not fit, tokens from its start. Every cut is counted per row and
in the summary. The pair's special tokens ([CLS] q [SEP] a [SEP] for DeBERTa) come from the
tokenizer's own template, and the reward is logits[0].

Exit codes: 0 ok, 2 bad input or unreachable model, 3 out of memory, 1 anything else.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ASSISTANT_CUE = "\n\nAssistant:"
HUMAN_CUE = "\n\nHuman:"
# Share of the pair's token budget (max_length minus special tokens) an answer keeps when the
# question needs the room (module docstring). Evaluation answers are at most eval.max_new_tokens
# (128 by default) GPT-2 tokens, so at max_length 512 they are not cut.
ANSWER_SHARE = 0.5
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


def encode_pair(tokenizer, question: str, answer: str, max_length: int) -> tuple[dict, dict]:
  """(model inputs of one pair as lists, what was cut), cut as the module docstring says.

  tokenizer: a fast (Rust `tokenizers`-backed) transformers tokenizer, as reward models ship.
  """
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is None:
    raise ValueError(f"the reward model's tokenizer {type(tokenizer).__name__} is not a fast "
                     "(tokenizers) tokenizer; save the model with a tokenizer.json")
  if backend.truncation is not None or backend.padding is not None:  # cuts and pads are ours here
    backend.no_truncation()
    backend.no_padding()
  budget = max_length - tokenizer.num_special_tokens_to_add(pair=True)
  if budget < 2:
    raise ValueError(f"--max_length={max_length} leaves no room for a question and an answer")
  q = backend.encode(question, add_special_tokens=False)
  a = backend.encode(answer, add_special_tokens=False)
  a_keep = min(len(a), max(budget - len(q), int(ANSWER_SHARE * budget)))
  q_room = budget - a_keep
  q_len, a_len, turns_cut, mid_turn = len(q), len(a), 0, False
  if q_len > q_room:
    # Token index where each turn that opens with "Human:" starts (the first turn at 0); keep the
    # earliest from which the rest fits.
    turn_starts = [0] + [m.start() for m in re.finditer(re.escape(HUMAN_CUE), question)]
    token_starts = [next((i for i, (b, _) in enumerate(q.offsets) if b >= c), q_len) for c in turn_starts]
    fits = [k for k, t in enumerate(token_starts) if q_len - t <= q_room]
    if fits:
      turns_cut = fits[0]
      q.truncate(q_len - token_starts[fits[0]], direction="left")
    else:
      turns_cut, mid_turn = len(turn_starts) - 1, True
      q.truncate(q_room, direction="left")
  a.truncate(a_keep, direction="right")
  pair = backend.post_process(q, a, add_special_tokens=True)
  inputs = {"input_ids": pair.ids, "attention_mask": pair.attention_mask}
  if "token_type_ids" in tokenizer.model_input_names:
    inputs["token_type_ids"] = pair.type_ids
  cut = {"truncated": q_len > len(q.ids) or a_len > a_keep, "question_tokens_cut": q_len - len(q.ids),
         "question_turns_cut": turns_cut, "question_cut_mid_turn": mid_turn,
         "answer_tokens_cut": a_len - a_keep}
  return inputs, cut


def score_pairs(model, tokenizer, questions, answers, *, max_length=512, batch_size=16,
                device="cpu", progress=None) -> list[dict]:
  """[{'reward', 'n_tokens', 'truncated', and the cut counts of encode_pair}] for each
  (question, answer), in batches padded inside. progress: called with (pairs done, pairs in all)
  after each batch."""
  import torch
  out = []
  for start in range(0, len(questions), batch_size):
    pairs = zip(questions[start:start + batch_size], answers[start:start + batch_size])
    encoded, cuts = zip(*(encode_pair(tokenizer, q, a, max_length) for q, a in pairs))
    enc = tokenizer.pad(list(encoded), return_tensors="pt")
    n_tokens = enc["attention_mask"].sum(-1).tolist()
    with torch.no_grad():
      logits = model(**{k: v.to(device) for k, v in enc.items()}).logits  # (b, num_labels)
    for i, reward in enumerate(logits[:, 0].float().cpu().tolist()):
      out.append({"reward": reward, "n_tokens": int(n_tokens[i]), **cuts[i]})
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


def read_scored(path: str) -> list[dict]:
  """The complete lines of an --incremental output; a last line cut short by a crash is removed from
  the file (its row is scored again)."""
  if not os.path.exists(path):
    return []
  with open(path, "rb") as f:
    data = f.read()
  complete = data[:data.rfind(b"\n") + 1]
  if len(complete) != len(data):
    with open(path, "r+b") as f:
      f.truncate(len(complete))
  return [json.loads(line) for line in complete.decode("utf-8").splitlines() if line.strip()]


def score_file(generations: str, out: str, reward_model: str, *, batch_size=16, max_length=512,
               device="auto", dtype="auto", incremental: bool = False) -> dict:
  """Scores every line of `generations` into `out`; returns a summary (counts, device, seconds).
  incremental: append each batch's lines to `out` and skip rows it already holds (module docstring)."""
  t0 = time.time()
  rows = read_generations(generations)
  done = read_scored(out) if incremental else []
  have = {(r["id"], r["model"]) for r in done}
  todo = [i for i in range(len(rows)) if (rows[i]["id"], rows[i]["model"]) not in have]
  model, tokenizer, device, dtype = load_reward_model(reward_model, device, dtype)
  # Longest first: batches of similar length waste less padding (results go back in file order).
  order = sorted(todo, key=lambda i: -len(rows[i]["prompt"]) - len(rows[i]["answer"]))
  line = lambda i, s: {"id": rows[i]["id"], "model": rows[i]["model"], **s,
                       "empty_answer": not rows[i]["answer"].strip()}
  show = _progress_printer()
  if incremental:
    results = list(done)
    with open(out, "a") as f:
      for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        scored = score_pairs(model, tokenizer, [question_from_prompt(rows[i]["prompt"]) for i in chunk],
                             [rows[i]["answer"].strip() for i in chunk], max_length=max_length,
                             batch_size=batch_size, device=device)
        lines = [line(i, s) for i, s in zip(chunk, scored)]
        f.write("".join(json.dumps(r) + "\n" for r in lines))
        f.flush()
        results += lines
        show(len(done) + start + len(chunk), len(done) + len(order))
  else:
    scored = score_pairs(model, tokenizer, [question_from_prompt(rows[i]["prompt"]) for i in order],
                         [rows[i]["answer"].strip() for i in order], max_length=max_length,
                         batch_size=batch_size, device=device, progress=show)
    results = [None] * len(rows)
    for i, s in zip(order, scored):
      results[i] = line(i, s)
    write_jsonl_atomic(out, results)
  return {"n": len(results), "n_scored_now": len(order),
          "n_empty_answers": sum(r["empty_answer"] for r in results),
          "n_truncated": sum(r["truncated"] for r in results),
          "n_question_cut": sum(r["question_tokens_cut"] > 0 for r in results),
          "n_question_cut_mid_turn": sum(r["question_cut_mid_turn"] for r in results),
          "n_answer_cut": sum(r["answer_tokens_cut"] > 0 for r in results),
          "answer_share": ANSWER_SHARE, "reward_model": reward_model,
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
                          env: dict | None = None, incremental: bool = False) -> dict:
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
         str(max_length), "--device", device, "--dtype", dtype] + ["--incremental"] * incremental
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
  parser.add_argument("--incremental", action="store_true", help="append each batch's scores to --out "
                      "as they come and skip rows it already holds (a failure keeps what was scored)")
  args = parser.parse_args(argv)
  from gpt2_lora_jax import hub
  from gpt2_lora_jax.errors import describe_exception
  try:
    summary = score_file(args.generations, args.out, args.reward_model, batch_size=args.batch_size,
                         max_length=args.max_length, device=args.device, dtype=args.dtype,
                         incremental=args.incremental)
  except (hub.HubUnreachableError, FileNotFoundError, ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except Exception as e:  # out of memory gets its own advice; anything else its own message
    if "out of memory" in str(e).lower() or type(e).__name__ == "OutOfMemoryError":
      print(f"error: out of memory while scoring ({describe_exception(e)}); "
            f"lower --batch_size (now {args.batch_size}) or --max_length, or use --device cpu",
            file=sys.stderr)
      return 3
    kept = (f"the scores already in {args.out} are kept; rerun to score the rest" if args.incremental
            else f"{args.out} was not written")
    print(f"error: scoring failed ({type(e).__name__}: {e}); {kept}", file=sys.stderr)
    return 1
  print(f"scored {summary['n']} answers ({summary['n_empty_answers']} empty; "
        f"{summary['n_truncated']} cut to {args.max_length} tokens: {summary['n_question_cut']} "
        f"questions lost their start ({summary['n_question_cut_mid_turn']} inside the final Human "
        f"turn), {summary['n_answer_cut']} answers their end) on {summary['device']} "
        f"in {summary['seconds']:.1f}s -> {args.out}", file=sys.stderr)
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())
