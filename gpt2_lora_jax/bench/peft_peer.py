"""The PyTorch side of the benchmark, run as its own process by harness.py (never imports JAX).

    python -m gpt2_lora_jax.bench.peft_peer --mode train --out peft.json --n_layer 12 --n_embd 768 \
        --n_head 12 --batch_size 16 --seq_len 1024 --lora_rank 8 --lora_targets c_attn,c_proj,c_fc

Modes, each writing one JSON object to --out:
  train     transformers GPT2LMHeadModel (random weights, fp32) + PEFT LoRA (fan_in_fan_out=True,
            because GPT-2's Conv1D stores (in, out)), AdamW (fused on GPU) + clipping at 1.0 as the
            JAX step does, bf16 autocast on GPU (fp32 on CPU), eager or torch.compile(model).
  generate  transformers `generate`, greedy, min_new_tokens = max_new_tokens so end-of-text never
            stops a row (every row yields the full length), at each of --decode_batch_sizes.
  score     reward.py's score_pairs on a random small DeBERTa-v2 classifier (or --reward_model),
            sequences per second.

Why a separate process: JAX on GPU preallocates most of the memory at its first use and does not
hand it back, so PyTorch and JAX never share a process; harness.py runs these children *before*
JAX touches the device (see harness.py). Dropout is off everywhere (the JAX GPT-2 has none besides
LoRA's, so HF's 0.1 resid/attn/embd dropout would be extra work on one side only).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

WORDS = ("the a is what how do i you can help me with my cat dog story please tell about two plus "
         "four human assistant sure here it no yes why not good bad").split()


def _device() -> str:
  return "cuda" if torch.cuda.is_available() else "cpu"


def _sync(device: str):
  if device == "cuda":
    torch.cuda.synchronize()


def _device_info(device: str) -> dict:
  name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
  return {"device": device, "device_name": name, "torch_version": torch.__version__}


def _peak_bytes(device: str):
  return int(torch.cuda.max_memory_allocated()) if device == "cuda" else None


def gpt2(args, device: str, dtype=torch.float32):
  """A random-weight GPT2LMHeadModel of the benchmark's shape, without dropout, on `device`."""
  import transformers
  cfg = transformers.GPT2Config(
      vocab_size=args.vocab_size, n_positions=args.n_positions, n_embd=args.n_embd,
      n_layer=args.n_layer, n_head=args.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
      bos_token_id=args.vocab_size - 1, eos_token_id=args.vocab_size - 1,
      pad_token_id=args.vocab_size - 1)
  torch.manual_seed(args.seed)
  with torch.device(device):  # initialise on the device: a 1.5B model is slow to init on a CPU
    model = transformers.GPT2LMHeadModel(cfg)
  return model.to(dtype)


def time_steps(step, warmup: int, timed: int, device: str) -> tuple:
  """(warm-up step seconds, timed step seconds); each step ends with a device sync."""
  times = []
  for _ in range(warmup + timed):
    t0 = time.perf_counter()
    step()
    _sync(device)
    times.append(time.perf_counter() - t0)
  return times[:warmup], times[warmup:]


def peft_train(args) -> dict:
  import peft
  device = _device()
  model = gpt2(args, device)  # fp32 weights; bf16 autocast on GPU
  lora_cfg = peft.LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                             target_modules=args.lora_targets.split(","), fan_in_fan_out=True,
                             task_type="CAUSAL_LM")
  model = peft.get_peft_model(model, lora_cfg) if args.lora_rank > 0 else model
  model.train()
  trainable = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0, fused=device == "cuda")
  forward = torch.compile(model) if args.compile else model
  gen = torch.Generator(device="cpu").manual_seed(args.seed)
  shape = (args.batch_size, args.seq_len)
  inputs = torch.randint(0, args.vocab_size, shape, generator=gen).to(device)
  targets = torch.randint(0, args.vocab_size, shape, generator=gen).to(device)
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
  losses = []

  def step():
    with autocast:
      logits = forward(input_ids=inputs).logits  # (B, T, V)
      # Every position is a loss token (full loss mask), as in the JAX benchmark's batch.
      loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    losses.append(loss.detach())

  warm, timed = time_steps(step, args.warmup_steps, args.timed_steps, device)
  step_s = statistics.median(timed)
  n_total = sum(p.numel() for p in model.parameters())
  return {
      "impl": "peft_compile" if args.compile else "peft_eager", **_device_info(device),
      "step_time_s": step_s, "step_times_s": timed, "warmup_times_s": warm,
      "tokens_per_s": args.batch_size * args.seq_len / step_s,
      # torch.compile compiles (and autotunes) inside the first calls: their excess over a
      # steady step is the compile time. Eager has no compile step (the excess is warm-up only).
      "compile_s": sum(warm) - len(warm) * step_s if args.compile else None,
      "first_step_s": warm[0] if warm else None,
      "peak_bytes_in_use": _peak_bytes(device),
      "trainable_params": sum(p.numel() for p in trainable), "total_params": n_total,
      "final_loss": float(losses[-1]), "compute": "bf16 autocast" if device == "cuda" else "fp32",
      "attn_implementation": getattr(getattr(model, "config", None), "_attn_implementation", None),
      "peft_version": peft.__version__,
  }


def hf_generate(args) -> dict:
  device = _device()
  dtype = torch.bfloat16 if device == "cuda" else torch.float32
  model = gpt2(args, device, dtype).eval()
  gen = torch.Generator(device="cpu").manual_seed(args.seed)
  rows = []
  for batch in [int(b) for b in args.decode_batch_sizes.split(",")]:
    ids = torch.randint(0, args.vocab_size, (batch, args.decode_prompt_len), generator=gen).to(device)
    out = {}

    def run():
      with torch.no_grad():
        out["ids"] = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False,
            max_new_tokens=args.decode_new_tokens, min_new_tokens=args.decode_new_tokens,
            pad_token_id=args.vocab_size - 1)

    warm, timed = time_steps(run, 1, args.decode_repeats, device)
    seconds = statistics.median(timed)
    new_tokens = out["ids"].shape[1] - args.decode_prompt_len
    rows.append({"impl": "hf_generate", "batch_size": batch, "prompt_len": args.decode_prompt_len,
                 "new_tokens": int(new_tokens), "seconds": seconds, "first_call_s": warm[0],
                 "tokens_per_s": batch * new_tokens / seconds, "dtype": str(dtype).removeprefix("torch.")})
  return {"impl": "hf_generate", **_device_info(device), "runs": rows}


def random_reward_model(out_dir: str, hidden_size: int = 256, num_layers: int = 4) -> str:
  """A random DeBERTa-v2 sequence classifier (1 label) with a WordPiece tokenizer, saved to out_dir.

  DeBERTa-v3's attention layout (relative positions, p2c/c2p), as the real reward model has; the
  tests use a smaller one (hidden_size 32, 2 layers)."""
  import transformers
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + list("abcdefghijklmnopqrstuvwxyz?.,:!")
  vocab += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
  with open(os.path.join(out_dir, "vocab.txt"), "w") as f:
    f.write("\n".join(vocab) + "\n")
  tok = transformers.BertTokenizerFast(vocab=os.path.join(out_dir, "vocab.txt"), do_lower_case=True)
  tok.model_max_length = 512
  tok.save_pretrained(out_dir)
  torch.manual_seed(0)
  config = transformers.DebertaV2Config(
      vocab_size=len(vocab), hidden_size=hidden_size, num_hidden_layers=num_layers,
      num_attention_heads=4 if hidden_size >= 64 else 2, intermediate_size=4 * hidden_size, max_position_embeddings=512, type_vocab_size=0, relative_attention=True,
      position_buckets=256, pos_att_type=["p2c", "c2p"], position_biased_input=False,
      norm_rel_ebd="layer_norm", share_att_key=True, num_labels=1, pad_token_id=0)
  transformers.DebertaV2ForSequenceClassification(config).save_pretrained(out_dir)
  return out_dir


def score(args) -> dict:
  from gpt2_lora_jax import reward
  device = _device()
  with tempfile.TemporaryDirectory() as tmp:
    model_dir = args.reward_model or random_reward_model(tmp)
    model, tokenizer, device, dtype = reward.load_reward_model(model_dir)
    rng = torch.Generator().manual_seed(args.seed)
    words = lambda n: " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n,), generator=rng).tolist())
    questions = [words(args.score_words) for _ in range(args.score_pairs)]
    answers = [words(args.score_words // 2) for _ in range(args.score_pairs)]
    run = lambda: reward.score_pairs(model, tokenizer, questions, answers, max_length=args.score_max_length,
                                     batch_size=args.score_batch_size, device=device)
    out = {}
    warm, timed = time_steps(lambda: out.update(scored=run()), 1, args.decode_repeats, device)
  seconds = statistics.median(timed)
  return {"impl": "reward.score_pairs", **_device_info(device), "dtype": dtype,
          "reward_model": args.reward_model or "random DeBERTa-v2 (hidden 256, 4 layers)",
          "pairs": args.score_pairs, "batch_size": args.score_batch_size, "seconds": seconds,
          "sequences_per_s": args.score_pairs / seconds, "first_call_s": warm[0],
          "mean_tokens": statistics.mean(s["n_tokens"] for s in out["scored"])}


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog="python -m gpt2_lora_jax.bench.peft_peer", description=__doc__.split("\n")[0])
  p.add_argument("--mode", required=True, choices=("train", "generate", "score"))
  p.add_argument("--out", required=True, help="JSON file to write")
  for name, default in (("vocab_size", 50257), ("n_positions", 1024), ("n_embd", 768), ("n_layer", 12),
                        ("n_head", 12), ("batch_size", 16), ("seq_len", 1024), ("lora_rank", 8),
                        ("warmup_steps", 2), ("timed_steps", 10), ("seed", 0), ("decode_prompt_len", 64),
                        ("decode_new_tokens", 128), ("decode_repeats", 3), ("score_pairs", 64),
                        ("score_batch_size", 16), ("score_max_length", 512), ("score_words", 200)):
    p.add_argument(f"--{name}", type=int, default=default)
  p.add_argument("--lora_alpha", type=float, default=16.0)
  p.add_argument("--lora_targets", default="c_attn,c_proj,c_fc", help="PEFT target_modules, comma-separated")
  p.add_argument("--compile", action="store_true", help="torch.compile the model (train mode)")
  p.add_argument("--decode_batch_sizes", default="1,64")
  p.add_argument("--reward_model", default="", help="local reward model dir ('' = a random small one)")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  result = {"train": peft_train, "generate": hf_generate, "score": score}[args.mode](args)
  tmp = args.out + ".tmp"
  with open(tmp, "w") as f:
    json.dump(result, f, indent=2)
  os.replace(tmp, args.out)  # the parent reads all of it or nothing
  return 0


if __name__ == "__main__":
  sys.exit(main())
