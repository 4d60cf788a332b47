"""Throughput, MFU, memory and compile time of the LoRA train step, the sampler and the scorer.

    python -m gpt2_lora_jax.bench --preset gpt2 --batch_size 16 --seq_len 1024 --compare peft
    python -m gpt2_lora_jax.bench --n_layer 2 --n_embd 64 --n_head 4 --batch_size 2 --seq_len 32 \
        --timed_steps 2 --matmul_n 512 --decode_batch_sizes 1,4 --decode_new_tokens 8 --no_compile

or `run_benchmark(preset='gpt2', batch_size=16, ...)` -> dict (the same fields; see BenchConfig
for every setting). One configuration per call; the results go to --out_dir as
bench_<device kind>_<model>_<UTC timestamp>.{json,md}. benchmarks/README.md explains each field.

Parts (--parts): 'train' times the project's own jitted train step (train.jit_train_step) on
synthetic fixed-shape batches (random ids; one segment per row, or HH-like packed rows with
--segments=hh): median step time after warm-up, each step ended by block_until_ready; tokens/s;
MFU against the chip's spec peak (flops.peak_flops, None on CPU) and against an N^3 matmul timed
in the same run; LoRA-aware FLOPs (flops.train_flops_per_token); peak device memory (the
allocator's high-water mark since the process began); XLA's memory analysis; lower_s, and
compile_s = lower + compile.
'decode' times sample.generate_tokens (greedy, end-of-text ignored) at each decode batch size.
'score' times reward.score_pairs. --compare=peft adds transformers + PEFT (eager, and
torch.compile unless --no_compile) with the same shapes and targets, and transformers `generate`.

Settings (--setting): 'user' runs what configs/gpt2_hh.py runs for the preset (its model and LoRA
settings, read from the file without importing it: user_settings); 'like_peft' runs LoRA r8,
alpha 16, no dropout, unscanned, no remat: the setting PEFT is timed at; 'flags' (default) takes
every field as given.

Sides (--side): 'jax' runs the JAX parts only, 'torch' the PyTorch children only (and never
touches the device from JAX), 'all' both. With 'all', every PyTorch part runs first, each in a child
process (peft_peer.py), and exits before this process first touches the device, because JAX
preallocates most of a GPU's memory at its first use and keeps it; gpu_check.sh instead runs
'jax' and 'torch' as separate stages, JAX first. Each measurement is also appended to the record
log the moment it exists (records.py; gpu_check.sh sets it), and each child's JSON lands
next to that log, so a later crash loses nothing.
This module needs no ml_collections and no datasets (it builds the run from model, lora, optim,
train, sharding, flops, sample directly).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import faulthandler
import os
import platform
import statistics
import sys
import time

import jax
import numpy as np
from flax import traverse_util

from gpt2_lora_jax import flops, sample
from gpt2_lora_jax.bench import records
from gpt2_lora_jax.bench.settings import LIKE_PEFT, user_settings
from gpt2_lora_jax.bench.run_setup import (_on_accelerator, attention_path, base_params, compiled_step,
                                           gpt2_config, model_name, setting_fields, train_setup)
from gpt2_lora_jax.bench.torch_runner import run_torch_part
from gpt2_lora_jax.bench.report import to_markdown, write_results
from gpt2_lora_jax import model as gpt2_model

PARTS = ("train", "decode", "score")
SETTINGS = ("flags", "user", "like_peft")
SIDES = ("all", "jax", "torch")


def _flag(default, help_text):
  return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  """One benchmark configuration; every field is also a --flag of the CLI."""
  preset: str = _flag("gpt2", "GPT-2 size: gpt2, gpt2-medium, gpt2-large, gpt2-xl")
  n_layer: int = _flag(0, "override the preset's depth (0: keep); for tiny CPU runs")
  n_embd: int = _flag(0, "override the preset's width (0: keep)")
  n_head: int = _flag(0, "override the preset's heads (0: keep)")
  vocab_size: int = _flag(50257, "vocabulary (GPT-2's 50257; smaller only for quick tests)")
  batch_size: int = _flag(16, "rows per step (global, over all devices used)")
  seq_len: int = _flag(1024, "tokens per row")
  micro_batches: int = _flag(1, "gradient accumulation passes per step")
  lora_rank: int = _flag(8, "LoRA rank; 0 = full fine-tuning")
  lora_alpha: float = _flag(16.0, "LoRA alpha (scale = alpha / rank)")
  lora_dropout: float = _flag(0.0, "LoRA dropout on the adapters' input")
  lora_dropout_rng: str = _flag("packed", "LoRA dropout's random bits: packed, bernoulli (dropout.py)")
  lora_fused_matmul: bool = _flag(False, "x @ [W | A] as one matmul where the adapter has no dropout "
                                  "(fused_lora.py; lora.fused_matmul)")
  lora_targets: tuple = _flag(("c_attn", "c_proj", "c_fc"), "LoRA target modules, comma-separated")
  remat: str = _flag("none", "rematerialisation: none, dots, full, or auto (the first of those whose "
                     "compiled step fits the devices' memory, as model.remat='auto': remat.py)")
  scan_layers: bool = _flag(False, "blocks under nn.scan (model.scan_layers)")
  setting: str = _flag("flags", "'user': configs/gpt2_hh.py's settings for the preset; 'like_peft': "
                       "LoRA r8 alpha 16, no dropout, no remat, unscanned (as PEFT is timed); "
                       "'flags': as given (see the module docstring)")
  side: str = _flag("all", "'jax', 'torch' (PyTorch children only) or 'all'")
  attention: str = _flag("xla", "attention implementation: xla, cudnn, auto (see attention.py)")
  segment_ids: bool = _flag(True, "pass segment ids as packed training does (--no_segment_ids: "
                            "plain causal attention over whole rows)")
  segments: str = _flag("one", "segments per row: 'one' (one conversation per row) or 'hh' "
                        "(HH-RLHF-like conversations packed by the project's packer)")
  max_segments: int = _flag(32, "conversations per packed row at most (data.max_segments_per_row)")
  dtype: str = _flag("auto", "compute dtype: auto = bfloat16 on accelerators, float32 on CPU")
  param_dtype: str = _flag("auto", "frozen base dtype: auto = bfloat16 on accelerators with LoRA, "
                           "else float32 (full fine-tuning keeps trained weights in float32)")
  warmup_steps: int = _flag(2, "untimed steps after compilation")
  timed_steps: int = _flag(10, "timed steps (the median is reported)")
  matmul_n: int = _flag(0, "N of the N^3 reference matmul (0: 8192 on accelerators, 1024 on CPU)")
  matmul_dtype: str = _flag("auto", "reference matmul dtype (auto = the compute dtype: bfloat16 on GPU)")
  num_devices: int = _flag(0, "devices in the mesh (0: all)")
  parts: tuple = _flag(PARTS, "what to run, comma-separated: train, decode, score")
  compare: str = _flag("", "'peft': also run transformers + PEFT (and HF generate) on the same device")
  torch_compile: bool = _flag(True, "also time PEFT under torch.compile (--no_compile: eager only)")
  torch_timeout_s: int = _flag(0, "seconds each PyTorch child may run (0: no limit); a child past it "
                               "is recorded as an error and the rest goes on")
  decode_batch_sizes: tuple = _flag((1, 64), "sampler batch sizes, comma-separated")
  decode_prompt_len: int = _flag(64, "random prompt tokens per row for decoding")
  decode_new_tokens: int = _flag(128, "tokens generated per row (end-of-text ignored)")
  decode_repeats: int = _flag(3, "timed repeats per decode / score measurement (median)")
  reward_model: str = _flag("", "local reward model dir for 'score' ('' = random small DeBERTa-v2)")
  score_pairs: int = _flag(64, "(question, answer) pairs scored per repeat")
  score_batch_size: int = _flag(16, "reward scorer batch size")
  score_words: int = _flag(200, "words per random question (answers have half)")
  seed: int = _flag(0, "seed of weights and synthetic data")
  out_dir: str = _flag("benchmarks/results", "where the JSON and Markdown go ('' = write nothing)")
  tag: str = _flag("", "free text stored with the results (e.g. 'baseline')")
  run_id: str = _flag("", "the gpu_check.sh run these files belong to (stored with the results)")
  stall_dump_s: int = _flag(0, "CLI: a stack dump of every thread to stderr every this many seconds "
                            "(faulthandler), so a stall shows where it sits; 0 = none")

  def __post_init__(self):
    for name in ("lora_targets", "parts", "decode_batch_sizes"):
      value = getattr(self, name)
      items = tuple(s.strip() for s in value.split(",") if s.strip()) if isinstance(value, str) else tuple(value)
      object.__setattr__(self, name, tuple(int(x) for x in items) if name == "decode_batch_sizes" else items)
    if set(self.parts) - set(PARTS):
      raise ValueError(f"parts={self.parts}: choose from {PARTS}")
    if self.setting not in SETTINGS:
      raise ValueError(f"setting={self.setting!r}: choose from {SETTINGS}")
    if self.side not in SIDES:
      raise ValueError(f"side={self.side!r}: choose from {SIDES}")
    fixed = user_settings(self.preset) if self.setting == "user" else LIKE_PEFT if self.setting == "like_peft" else {}
    for name, value in fixed.items():  # the setting wins over the flags it fixes
      object.__setattr__(self, name, value)
    if self.compare not in ("", "peft"):
      raise ValueError(f"compare={self.compare!r}: '' or 'peft'")
    if self.segments not in ("one", "hh"):
      raise ValueError(f"segments={self.segments!r}: 'one' or 'hh'")


def device_info() -> dict:
  d = jax.devices()[0]
  return {"platform": d.platform, "device_kind": d.device_kind, "num_devices": jax.device_count(),
          "jax_version": jax.__version__, "python": platform.python_version(), "host": platform.node(),
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


def time_matmul(n: int, dtype: str, repeats: int = 10) -> dict:
  """FLOP/s of one (n, n) @ (n, n) matmul on device 0: median of `repeats` after a warm-up call."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, a).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    matmul(a, a).block_until_ready()
    times.append(time.perf_counter() - t0)
  seconds = statistics.median(times)
  return {"n": n, "dtype": dtype, "seconds": seconds, "flops_per_s": 2.0 * n ** 3 / seconds}


def _memory_analysis(compiled) -> dict:
  stats = compiled.memory_analysis()
  fields = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
            "alias_size_in_bytes", "generated_code_size_in_bytes")
  return {f: int(getattr(stats, f)) for f in fields if stats is not None and hasattr(stats, f)}


def _xla_flops(compiled):
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
  return float(cost["flops"]) if isinstance(cost, dict) and "flops" in cost else None


def peak_bytes_in_use(devices):
  """The allocator's high-water mark (since process start) over `devices`; None where unsupported."""
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devices]
  return max(peaks) if peaks and all(p is not None for p in peaks) else None


def bench_train(cfg: BenchConfig, matmul: dict) -> dict:
  """Times train.jit_train_step on synthetic batches; see the module docstring for the fields."""
  run = train_setup(cfg)
  config, devices, state, frozen, batch = run.config, run.devices, run.state, run.frozen, run.batch
  compiled, lower_s, compile_s, remat_fields = compiled_step(run, cfg)
  times = []
  for i in range(cfg.warmup_steps + cfg.timed_steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready((state, metrics))
    if i >= cfg.warmup_steps:
      times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)
  tokens = cfg.batch_size * cfg.seq_len
  seg = run.host_batch["segment_ids"]
  seg = seg if seg is not None else np.ones((cfg.batch_size, cfg.seq_len), np.int32)
  per_token = flops.train_flops_per_token(run.param_shapes, run.labels, config.n_layer, config.n_embd, cfg.seq_len)
  achieved = per_token["total"] * tokens / step_s / len(devices)  # FLOP/s per device
  peak = flops.peak_flops(devices[0])
  sizes = traverse_util.flatten_dict(jax.tree.map(lambda x: int(np.prod(x.shape)), run.param_shapes))
  flat_labels = traverse_util.flatten_dict(run.labels)
  result = {
      "impl": "jax", **setting_fields(cfg), "dtype": config.dtype, "param_dtype": config.param_dtype,
      "attention_path": attention_path(config, cfg, seg), "padding_fraction": float(np.mean(seg == 0)),
      "step_time_s": step_s, "step_times_s": times, "tokens_per_s": tokens / step_s,
      "flops_per_token": per_token, "flops_per_step": per_token["total"] * tokens,
      # cost_analysis describes the per-device (SPMD-partitioned) program: x devices for the step.
      "xla_cost_flops_per_step": (_xla_flops(compiled) or 0.0) * len(devices) or None,
      "achieved_flops_per_s_per_device": achieved,
      "peak_flops_spec": peak, "mfu_spec": achieved / peak if peak else None,
      "mfu_matmul": achieved / matmul["flops_per_s"],
      # The allocator's high-water mark since the process began: one train setting per process
      # (gpu_check.sh) makes it this step's.
      "peak_bytes_in_use": peak_bytes_in_use(devices), "memory_analysis": _memory_analysis(compiled),
      "lower_s": lower_s, "compile_s": compile_s, "final_loss": float(metrics["loss"]),
      "trainable_params": sum(n for p, n in sizes.items() if flat_labels[p] == "trainable"),
      "total_params": sum(sizes.values()), "num_devices": len(devices), "xla_flags": os.environ.get("XLA_FLAGS", ""),
      **remat_fields,
  }
  records.emit("train", **result)
  del state, frozen, compiled, run
  return result


def bench_decode(cfg: BenchConfig) -> list:
  """sample.generate_tokens (greedy, never stopping early) per decode batch size, base model."""
  config = gpt2_config(cfg)
  config = config.replace(param_dtype=config.dtype)  # decoding reads the weights in compute dtype
  params = base_params(config, cfg)  # stacked when scanned, as a run holds them (experiment.py)
  model = gpt2_model.GPT2(config)
  rng = np.random.default_rng(cfg.seed)
  rows = []
  for batch in cfg.decode_batch_sizes:
    ids = rng.integers(0, config.vocab_size, (batch, cfg.decode_prompt_len), dtype=np.int32)
    mask = np.ones_like(ids)
    times, out = [], None
    for _ in range(1 + cfg.decode_repeats):  # the first call compiles
      t0 = time.perf_counter()
      out = sample.generate_tokens(model, params, ids, mask, max_new_tokens=cfg.decode_new_tokens,
                                   temperature=0.0, eos_id=None)  # ends in a host copy: synced
      times.append(time.perf_counter() - t0)
    seconds = statistics.median(times[1:])
    rows.append({"impl": "jax_sampler", "model": model_name(cfg), "attention": cfg.attention,
                 "batch_size": batch, "prompt_len": cfg.decode_prompt_len,
                 "new_tokens": int(out["num_steps"]), "seconds": seconds, "first_call_s": times[0],
                 "tokens_per_s": batch * int(out["num_steps"]) / seconds, "dtype": config.dtype})
    records.emit("decode", **rows[-1])
  return rows


def _ratio(a, b):
  return a / b if a and b else None


def run_benchmark(**settings) -> dict:
  """Runs one configuration (BenchConfig fields as keywords) and returns the results dict.

  Writes bench_<device>_<model>_<timestamp>.json and .md to out_dir unless out_dir is ''; the
  paths are in result['files']. A failed PyTorch child is recorded as {'error': ...}, not raised.
  """
  cfg = BenchConfig(**settings)
  shape = {k: getattr(cfg, k) or gpt2_model.PRESETS[cfg.preset][k] for k in ("n_layer", "n_embd", "n_head")}
  torch_results = {}
  if cfg.side in ("all", "torch") and (cfg.compare == "peft" or cfg.side == "torch"):
    # Before JAX first touches the device (see the module docstring); each is recorded as it ends.
    if "train" in cfg.parts:
      torch_results["peft_eager"] = run_torch_part("train", cfg, shape, model_name=model_name(cfg))
      if cfg.torch_compile:
        torch_results["peft_compile"] = run_torch_part("train", cfg, shape, compile_=True, model_name=model_name(cfg))
    if "decode" in cfg.parts:
      torch_results["hf_generate"] = run_torch_part("generate", cfg, shape, model_name=model_name(cfg))
  if cfg.side in ("all", "torch") and "score" in cfg.parts:
    torch_results["score"] = run_torch_part("score", cfg, shape, model_name=model_name(cfg))

  result = {"schema_version": 2, "run_id": cfg.run_id, "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "model": model_name(cfg), "config": dataclasses.asdict(cfg)}
  if cfg.side == "torch":  # JAX never touches the device here: PyTorch's numbers only
    result["device"] = {"platform": "torch", "device_kind": next(
        (r["device_name"] for r in torch_results.values() if "device_name" in r), "unknown"), "num_devices": 0,
        "jax_version": "-", "python": platform.python_version(), "host": platform.node(), "xla_flags": ""}
    result["torch"] = torch_results
  else:
    result["device"] = device_info()
    if "train" in cfg.parts:  # the reference of the train step's MFU
      dtype = gpt2_config(cfg).dtype
      n = cfg.matmul_n or (8192 if _on_accelerator() else 1024)
      result["matmul"] = time_matmul(n, dtype if cfg.matmul_dtype == "auto" else cfg.matmul_dtype)
      records.emit("matmul", model=model_name(cfg), **result["matmul"])
      _train_rows(result, bench_train(cfg, result["matmul"]), torch_results)
    if "decode" in cfg.parts:
      decode = {"jax_sampler": bench_decode(cfg)}
      if "hf_generate" in torch_results:
        hf = torch_results["hf_generate"]
        decode["hf_generate"] = hf.get("runs", hf)
        for jax_row, hf_row in zip(decode["jax_sampler"], hf.get("runs", [])):
          jax_row["jax_over_hf_tokens_per_s"] = _ratio(jax_row["tokens_per_s"], hf_row["tokens_per_s"])
      result["decode"] = decode
    if "score" in torch_results:
      result["score"] = torch_results["score"]
  if cfg.out_dir:
    result["files"] = write_results(result, cfg.out_dir)
  return result


def _train_rows(result: dict, jax_train: dict, torch_results: dict):
  rows = {"jax": jax_train}
  for name in ("peft_eager", "peft_compile"):
    if name in torch_results:
      row = rows[name] = torch_results[name]
      if "error" not in row:  # the same FLOP count: PEFT computes no frozen weight gradients either
        achieved = jax_train["flops_per_step"] / row["step_time_s"]
        row["mfu_spec"] = achieved / jax_train["peak_flops_spec"] if jax_train["peak_flops_spec"] else None
        row["mfu_matmul"] = achieved / result["matmul"]["flops_per_s"]
        row["jax_over_this_tokens_per_s"] = _ratio(jax_train["tokens_per_s"], row["tokens_per_s"])
        row["jax_over_this_peak_bytes"] = _ratio(jax_train["peak_bytes_in_use"], row["peak_bytes_in_use"])
  result["train"] = rows


def parse_args(argv=None) -> BenchConfig:
  parser = argparse.ArgumentParser(prog="python -m gpt2_lora_jax.bench", description=__doc__.split("\n")[0])
  for field in dataclasses.fields(BenchConfig):
    help_text = f"{field.metadata['help']} (default: {field.default})"
    if field.type in ("bool", bool) and field.default:  # True by default: the flag turns it off
      flag = "--no_compile" if field.name == "torch_compile" else f"--no_{field.name}"
      parser.add_argument(flag, dest=field.name, action="store_false", help=help_text)
    elif field.type in ("bool", bool):
      parser.add_argument(f"--{field.name}", dest=field.name, action="store_true", help=help_text)
    else:
      kind = {"int": int, "float": float}.get(str(field.type), str)
      parser.add_argument(f"--{field.name}", type=kind, default=field.default, help=help_text)
  return BenchConfig(**vars(parser.parse_args(argv)))


def main(argv=None) -> int:
  cfg = parse_args(argv)
  if cfg.stall_dump_s > 0:
    faulthandler.dump_traceback_later(cfg.stall_dump_s, repeat=True)
  result = run_benchmark(**dataclasses.asdict(cfg))
  print(to_markdown(result), flush=True)
  if "files" in result:
    print(f"wrote {result['files']['json']} and {result['files']['markdown']}", file=sys.stderr)
  return 0

