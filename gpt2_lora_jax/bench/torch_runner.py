"""The parent side of the benchmark's PyTorch children (peft_peer.py): one child process per part,
its JSON kept next to the record log (records.py) and recorded the moment it ends. Imports
neither jax nor torch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from gpt2_lora_jax.bench import records


def run_torch_part(mode: str, cfg, config: dict, compile_: bool = False, model_name: str = "") -> dict:
  """Runs `python -m gpt2_lora_jax.bench.peft_peer --mode <mode>` in a child process; returns its JSON.

  cfg: a harness.BenchConfig; config: the model's n_layer, n_embd, n_head; model_name: for the record.
  A child that fails or runs past cfg.torch_timeout_s comes back as {'error': ...}."""
  args = {"vocab_size": cfg.vocab_size, "n_embd": config["n_embd"], "n_layer": config["n_layer"],
          "n_head": config["n_head"], "batch_size": cfg.batch_size, "seq_len": cfg.seq_len,
          "lora_rank": cfg.lora_rank, "lora_alpha": cfg.lora_alpha, "lora_targets": ",".join(cfg.lora_targets),
          "warmup_steps": cfg.warmup_steps, "timed_steps": cfg.timed_steps, "seed": cfg.seed,
          "decode_prompt_len": cfg.decode_prompt_len, "decode_new_tokens": cfg.decode_new_tokens,
          "decode_repeats": cfg.decode_repeats, "decode_batch_sizes": ",".join(map(str, cfg.decode_batch_sizes)),
          "score_pairs": cfg.score_pairs, "score_batch_size": cfg.score_batch_size,
          "score_words": cfg.score_words, "reward_model": cfg.reward_model}
  log_path = os.environ.get(records.RECORDS_ENV)
  impl = {"train": "peft_compile" if compile_ else "peft_eager", "generate": "hf_generate", "score": "score"}[mode]
  with tempfile.TemporaryDirectory() as tmp:
    # Next to the record log when there is one: the child's own file outlives a crash of this process.
    out = (os.path.join(os.path.dirname(os.path.abspath(log_path)), f"torch_{records.stage() or 'bench'}_{impl}.json")
           if log_path else os.path.join(tmp, f"{mode}.json"))
    cmd = [sys.executable, "-m", "gpt2_lora_jax.bench.peft_peer", "--mode", mode, "--out", out]
    cmd += [f"--{k}={v}" for k, v in args.items()] + (["--compile"] if compile_ else [])
    env = dict(os.environ)
    repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # importable from a checkout
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, env.get("PYTHONPATH")) if p)
    t0 = time.perf_counter()
    print(f"PyTorch child {impl} ({time.strftime('%H:%M:%S')})", file=sys.stderr, flush=True)
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=cfg.torch_timeout_s or None)
      if proc.returncode != 0 or not os.path.exists(out):
        tail = "\n".join(proc.stderr.strip().splitlines()[-20:])
        result = {"error": f"exit code {proc.returncode}: {tail}", "command": " ".join(cmd)}
      else:
        with open(out) as f:
          result = json.load(f)
    except subprocess.TimeoutExpired:
      result = {"error": f"timed out after {cfg.torch_timeout_s} s (--torch_timeout_s)", "command": " ".join(cmd)}
  result["process_wall_s"] = time.perf_counter() - t0
  # PEFT runs without dropout, remat or scan whatever cfg says (peft_peer.py).
  fields = {"model": model_name, "batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "lora_rank": cfg.lora_rank,
            "lora_alpha": cfg.lora_alpha, "lora_dropout": 0.0}
  records.emit("torch", **{**fields, **result, "impl": impl})
  return result
