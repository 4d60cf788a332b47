"""A first look on a GPU: several train-step variants of one size in one process, compiled
concurrently, each timed, and some profiled (jax.profiler traces kept for reading elsewhere).

  python benchmarks/explore_gpu.py --out OUT --preset gpt2 --batch_size 16 \
      --variants user,user_bernoulli,like_peft --profile user,like_peft
  python benchmarks/explore_gpu.py --out OUT --smoke        # tiny shapes on the CPU

Each variant is harness.BenchConfig fields (VARIANTS below) on top of --preset/--batch_size. The
per-variant compile seconds are measured while the others compile too (threads): they are upper
bounds, not the compile time of one program alone. Memory: XLA's memory analysis of each compiled
step (one process holds every variant, so the allocator's peak is not per variant). Every result
is appended to OUT/explore.jsonl the moment it exists; traces go to OUT/<tag>_traces.tar.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tarfile
import tempfile
import time

import jax
import numpy as np

from gpt2_lora_jax import lora
from gpt2_lora_jax import model as gpt2_model
from gpt2_lora_jax.bench import harness, run_setup
from gpt2_lora_jax.bench.settings import LIKE_PEFT, user_settings

VARIANTS = {
    "user": {},
    "user_bernoulli": {"lora_dropout_rng": "bernoulli"},
    "user_nodrop": {"lora_dropout": 0.0},
    "user_remat_none": {"remat": "none"},
    "user_remat_none_unscanned": {"remat": "none", "scan_layers": False},
    "user_remat_full": {"remat": "full"},
    "like_peft": {"setting": "like_peft"},
    "like_peft_scan": {"setting": "like_peft", "scan": True},
    "like_peft_pallas": {"setting": "like_peft", "attention": "pallas"},
    "like_peft_scan_pallas": {"setting": "like_peft", "scan": True, "attention": "pallas"},
    "user_pallas": {"attention": "pallas"},
    "user_unrolled": {"remat": "none", "scan_layers": False},
    "user_unrolled_pallas": {"remat": "none", "scan_layers": False, "attention": "pallas"},
    "user_unrolled_dots_pallas": {"remat": "dots", "scan_layers": False, "attention": "pallas"},
    "seed": {"setting": "seed"},
    "seed_pallas": {"setting": "seed", "attention": "pallas"},
}
# configs/seed_study.py's model and LoRA settings (gpt2-medium, one 1024-token row per step).
SEED_STUDY = {"lora_rank": 1, "lora_alpha": 1.0, "lora_dropout": 0.0, "remat": "none", "scan_layers": False,
              "lora_targets": ("c_attn", "c_proj", "c_fc", "lm_head")}


def bench_config(args, name: str) -> harness.BenchConfig:
  over = dict(VARIANTS[name])
  setting = over.pop("setting", "user")
  scan = over.pop("scan", None)
  base = dict(preset=args.preset, batch_size=args.batch_size, seq_len=args.seq_len, segments="hh",
              attention=args.attention, setting="flags")
  if args.smoke:
    base.update(n_layer=2, n_embd=64, n_head=4, vocab_size=512, seq_len=64, max_segments=8)
  fixed = (user_settings(args.preset) if setting == "user" else dict(SEED_STUDY) if setting == "seed"
           else dict(LIKE_PEFT))
  fields = {**base, **fixed, **over}
  if args.smoke and fields.get("attention") == "pallas":
    fields["attention"] = "xla"  # no Triton on the CPU
  if scan is not None:
    fields["scan_layers"] = scan
  fields.pop("dtype", None) if args.smoke else None
  fields.pop("param_dtype", None) if args.smoke else None
  return harness.BenchConfig(**fields)


_HOST_BASE = {}


def host_params(config, cfg) -> dict:
  """Random base weights made with numpy on the host (normal(0.02) kernels and embeddings, zero
  biases, unit layer-norm scales), made once per process and shared by the variants, + adapters:
  no device init program to compile."""
  key = (config.n_layer, config.n_embd, config.vocab_size, config.param_dtype)
  if key not in _HOST_BASE:
    _HOST_BASE[key] = _host_base(config, cfg)
  return lora.add(_HOST_BASE[key], run_setup._lora_config(cfg), jax.random.PRNGKey(cfg.seed + 1))


def _host_base(config, cfg) -> dict:
  rng = np.random.default_rng(cfg.seed)
  shapes = gpt2_model.param_shapes(config.replace(attention_impl="xla"))

  def leaf(path, s):
    name = path[-1].key if hasattr(path[-1], "key") else str(path[-1])
    if name == "bias":
      value = np.zeros(s.shape, np.float32)
    elif name == "scale":
      value = np.ones(s.shape, np.float32)
    else:
      value = rng.standard_normal(s.shape, np.float32) * np.float32(0.02)
    return jax.device_put(value.astype(s.dtype))
  return jax.tree_util.tree_map_with_path(leaf, shapes)


def emit(out: str, record: dict):
  record = {"utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **record}
  with open(os.path.join(out, "explore.jsonl"), "a") as f:
    f.write(json.dumps(record, default=str) + "\n")
    f.flush()
    os.fsync(f.fileno())
  print(json.dumps(record, default=str), flush=True)


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--out", required=True)
  p.add_argument("--tag", default="p")
  p.add_argument("--preset", default="gpt2")
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--seq_len", type=int, default=1024)
  p.add_argument("--attention", default="auto")
  p.add_argument("--variants", default="user,like_peft")
  p.add_argument("--profile", default="")
  p.add_argument("--profile_steps", type=int, default=3)
  p.add_argument("--timed_steps", type=int, default=10)
  p.add_argument("--host_init", action="store_true")
  p.add_argument("--threads", type=int, default=8)
  p.add_argument("--smoke", action="store_true")
  args = p.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  groups = [[v for v in g.split(",") if v] for g in args.variants.split("+")]
  profile = [v for v in args.profile.split(",") if v]
  if args.host_init:
    run_setup._params = host_params
  dev = jax.devices()[0]
  emit(args.out, {"kind": "device", "tag": args.tag, "device": dev.device_kind, "platform": dev.platform,
                  "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", "")})
  trace_root = tempfile.mkdtemp(prefix="explore_traces_")
  for names in groups:
    run_group(args, names, profile, trace_root)
  shutil.rmtree(trace_root, ignore_errors=True)
  return 0


def keep_trace(args, trace_dir: str, name: str):
  """OUT/<tag>_<variant>.tar.gz of one variant's trace folder, at once (a later timeout keeps it);
  without the .xplane.pb when the archive would pass 15.5 MB (a file from the GPU machine <= 16 MB)."""
  path = os.path.join(args.out, f"{args.tag}_{name}.tar.gz")
  for skip_pb in (False, True):
    with tarfile.open(path, "w:gz") as tar:
      tar.add(trace_dir, arcname=f"{args.tag}_{name}",
              filter=lambda t: None if skip_pb and t.name.endswith(".pb") else t)
    if os.path.getsize(path) <= 15_500_000:
      break
  emit(args.out, {"kind": "trace", "tag": args.tag, "variant": name, "bytes": os.path.getsize(path),
                  "xplane_kept": not skip_pb})


def run_group(args, names, profile, trace_root):
  """Set up, compile (concurrently) and time the variants `names`."""
  runs = {}
  for name in names:
    t0 = time.perf_counter()
    cfg = bench_config(args, name)
    run = run_setup.train_setup(cfg)
    lowered = run.step_fn.lower(run.state, run.frozen, run.batch)
    runs[name] = (cfg, run, lowered)
    emit(args.out, {"kind": "setup", "tag": args.tag, "variant": name, "setup_and_lower_s": time.perf_counter() - t0,
                    "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k in (
                        "preset", "batch_size", "seq_len", "lora_rank", "lora_dropout", "lora_dropout_rng",
                        "remat", "scan_layers", "attention")}})

  def compile_one(name):
    t0 = time.perf_counter()
    compiled = runs[name][2].compile()
    return name, compiled, time.perf_counter() - t0
  compiled = {}
  with concurrent.futures.ThreadPoolExecutor(args.threads) as pool:
    for name, c, seconds in pool.map(compile_one, names):
      compiled[name] = c
      emit(args.out, {"kind": "compiled", "tag": args.tag, "variant": name, "compile_s_concurrent": seconds,
                      "memory": harness._memory_analysis(c), "xla_flops": harness._xla_flops(c)})

  for name in names:
    cfg, run, _ = runs[name]
    state, frozen, batch, step = run.state, run.frozen, run.batch, compiled[name]
    try:
      for _ in range(2):
        state, metrics = step(state, frozen, batch)
      jax.block_until_ready((state, metrics))
      times = []
      for _ in range(args.timed_steps):
        t0 = time.perf_counter()
        state, metrics = step(state, frozen, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
      s = statistics.median(times)
      tokens = cfg.batch_size * cfg.seq_len
      emit(args.out, {"kind": "timed", "tag": args.tag, "variant": name, "step_s": s, "tokens_per_s": tokens / s,
                      "step_times_s": times, "loss": float(metrics["loss"]),
                      "peak_bytes_in_use_so_far": harness.peak_bytes_in_use(run.devices),
                      "attention_path": run_setup.attention_path(run.config, cfg, run.host_batch["segment_ids"])})
      if name in profile:
        tdir = os.path.join(trace_root, name)
        with jax.profiler.trace(tdir, create_perfetto_trace=True):
          for i in range(args.profile_steps):
            with jax.profiler.StepTraceAnnotation("train", step_num=i):
              state, metrics = step(state, frozen, batch)
              jax.block_until_ready((state, metrics))
        emit(args.out, {"kind": "profiled", "tag": args.tag, "variant": name, "steps": args.profile_steps})
        keep_trace(args, tdir, name)
    except Exception as e:  # one variant's failure must not lose the others'
      emit(args.out, {"kind": "error", "tag": args.tag, "variant": name, "error": f"{type(e).__name__}: {e}"[:2000]})
    runs[name] = None
    compiled[name] = None
    del state, frozen, batch, step


if __name__ == "__main__":
  sys.exit(main())
