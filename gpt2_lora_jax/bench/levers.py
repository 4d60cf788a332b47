"""A/B of train-step levers in one process: several variants of one size, compiled concurrently,
then each timed on the same batch.

    python -m gpt2_lora_jax.bench.levers --preset=gpt2 --batch_size=16 --seq_len=1024 \
        --variants=user,user_bernoulli,user_nodrop+user_scan [--timed_steps=10] [--smoke]

A variant is a base setting ('user': configs/gpt2_hh.py's settings for the preset; 'like_peft':
PEFT's; 'seed': configs/seed_study.py's; settings.py) plus overrides of harness.BenchConfig fields
(VARIANTS). Variants are separated by ',' within a group and '+' between groups: a group's variants
are set up, compiled in threads at the same time (16 CPU cores on the GPU machine: the sum of
their compile times is not spent), then timed one after another: median of `timed_steps` after
two warm-up steps. A group's first variant is the baseline its others are compared with.

One record per variant and phase (records.emit, kind 'lever'): 'compiled' (lower_s, compile_s
measured while the group's other variants compiled too: an upper bound for one program alone;
XLA's memory analysis) and 'timed' (step_time_s, tokens_per_s, step_times_s, attention path), or
'error' (one variant's failure does not stop the others). The allocator's peak is per process, so
memory per variant is XLA's memory analysis (temporaries + arguments + outputs - aliased).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import statistics
import sys
import time

import jax

from gpt2_lora_jax import remat
from gpt2_lora_jax.bench import harness, records, run_setup
from gpt2_lora_jax.bench.settings import LIKE_PEFT, SEED_STUDY, user_settings

# name -> (base setting, BenchConfig overrides, XLA options for this compile only). 'user' is what
# configs/gpt2_hh.py runs for the preset, whatever that is today; every other variant changes what
# its name says. XLA options go to Lowered.compile(compiler_options=...): the same debug options as
# XLA_FLAGS, for one program, so flag A/Bs need no process of their own (an unknown name is an error).
VARIANTS = {
    "user": ("user", {}, {}),
    "user_bernoulli": ("user", {"lora_dropout_rng": "bernoulli"}, {}),
    "user_nodrop": ("user", {"lora_dropout": 0.0}, {}),
    "user_scan": ("user", {"scan_layers": True}, {}),
    "user_unrolled": ("user", {"scan_layers": False}, {}),
    "user_remat_none": ("user", {"remat": "none"}, {}),
    "user_remat_dots": ("user", {"remat": "dots"}, {}),
    "user_remat_full": ("user", {"remat": "full"}, {}),
    "user_cudnn": ("user", {"attention": "cudnn"}, {}),
    "user_pallas": ("user", {"attention": "pallas"}, {}),
    "user_xla": ("user", {"attention": "xla"}, {}),
    "user_no_command_buffer": ("user", {}, {"xla_gpu_enable_command_buffer": ""}),
    "user_no_triton_gemm": ("user", {}, {"xla_gpu_enable_triton_gemm": False}),
    "user_latency_hiding": ("user", {}, {"xla_gpu_enable_latency_hiding_scheduler": True}),
    "user_no_fusion_autotuner": ("user", {}, {"xla_gpu_experimental_enable_fusion_autotuner": False}),
    "user_autotune0": ("user", {}, {"xla_gpu_autotune_level": 0}),
    "like_peft": ("like_peft", {}, {}),
    "like_peft_scan": ("like_peft", {"scan_layers": True}, {}),
    "like_peft_pallas": ("like_peft", {"attention": "pallas"}, {}),
    "like_peft_scan_pallas": ("like_peft", {"scan_layers": True, "attention": "pallas"}, {}),
    "like_peft_fused": ("like_peft", {"lora_fused_matmul": True}, {}),
    "seed": ("seed", {}, {}),
    "seed_pallas": ("seed", {"attention": "pallas"}, {}),
}
SMOKE_SHAPE = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=512, seq_len=64, max_segments=8)


def bench_config(name: str, preset: str, batch_size: int, seq_len: int, attention: str = "auto",
                 smoke: bool = False) -> harness.BenchConfig:
  """The BenchConfig of variant `name` (VARIANTS) at this size."""
  if name not in VARIANTS:
    raise ValueError(f"unknown variant {name!r}: choose from {sorted(VARIANTS)}")
  setting, over, _ = VARIANTS[name]
  fixed = {"user": lambda: user_settings(preset), "like_peft": lambda: dict(LIKE_PEFT),
           "seed": lambda: dict(SEED_STUDY)}[setting]()
  fields = {"preset": preset, "batch_size": batch_size, "seq_len": seq_len, "segments": "hh",
            "attention": attention, **fixed, **over, "setting": "flags"}
  if smoke:  # tiny shapes in float32 on the CPU, where only the XLA attention runs
    fields.update(SMOKE_SHAPE, dtype="auto", param_dtype="auto", attention="xla")
  return harness.BenchConfig(**fields)


def _describe(cfg: harness.BenchConfig) -> dict:
  keys = ("preset", "batch_size", "seq_len", "lora_rank", "lora_alpha", "lora_dropout", "lora_dropout_rng",
          "lora_fused_matmul", "lora_targets", "remat", "scan_layers", "attention")
  return {k: getattr(cfg, k) for k in keys}


def run_group(names, args) -> None:
  """Set up, compile concurrently and time the variants `names` (see the module docstring).

  remat 'auto' (configs/gpt2_hh.py's) is chosen once per group, as a run chooses it (remat.py: the
  first policy whose compiled step fits the device), on the first variant that asks for it; every
  other 'auto' variant of the group takes the same policy, so the group differs in its levers only.
  """
  runs, chosen, chose_s = {}, None, {}
  for name in names:
    try:
      cfg = bench_config(name, args.preset, args.batch_size, args.seq_len, args.attention, args.smoke)
      t0 = time.perf_counter()
      run = run_setup.train_setup(cfg)
      lowered = None
      if cfg.remat == "auto" and chosen is None:
        choice = remat.choose(run.lower, *remat.budget(run.devices), cfg.batch_size, cfg.micro_batches,
                              len(run.devices))
        chosen, lowered = choice.policy, choice.compiled  # compiled already: no second compile
        chose_s[name] = choice.compile_s[chosen]  # alone, before the group's concurrent compiles
        records.emit("lever", variant=name, phase="remat", remat_choice=choice.record())
      if cfg.remat == "auto":
        cfg = dataclasses.replace(cfg, remat=chosen)
      if lowered is None:
        lowered = run.lower(cfg.remat, cfg.micro_batches, cfg.batch_size)
      runs[name] = (cfg, run, lowered, time.perf_counter() - t0)
    except Exception as e:  # one variant's failure must not lose the others'
      records.emit("lever", variant=name, phase="error", in_phase="setup", error=records.error_text(e))

  def compile_one(name):
    t0 = time.perf_counter()
    options, program = VARIANTS[name][2], runs[name][2]
    if not hasattr(program, "compile"):  # remat.choose's compiled step (no XLA options of its own)
      return program, chose_s[name]
    return program.compile(compiler_options=options or None), time.perf_counter() - t0
  compiled = {}
  with concurrent.futures.ThreadPoolExecutor(max(1, args.threads)) as pool:
    futures = {name: pool.submit(compile_one, name) for name in runs}
    for name, future in futures.items():
      cfg, run, _, setup_s = runs[name]
      try:
        compiled[name], compile_s = future.result()
      except Exception as e:
        records.emit("lever", variant=name, phase="error", in_phase="compile", error=records.error_text(e))
        continue
      records.emit("lever", variant=name, phase="compiled", group_size=len(runs), setup_and_lower_s=setup_s,
                   compile_s_concurrent=compile_s, memory_analysis=harness._memory_analysis(compiled[name]),
                   xla_options=VARIANTS[name][2], **_describe(cfg))
  for name in list(compiled):
    cfg, run, _, _ = runs[name]
    try:
      state, frozen, batch, step = run.state, run.frozen, run.batch, compiled[name]
      for _ in range(2):
        state, metrics = step(state, frozen, batch)
      jax.block_until_ready((state, metrics))
      times = []
      for _ in range(args.timed_steps):
        t0 = time.perf_counter()
        state, metrics = step(state, frozen, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
      seconds = statistics.median(times)
      records.emit("lever", variant=name, phase="timed", baseline=names[0], step_time_s=seconds,
                   tokens_per_s=cfg.batch_size * cfg.seq_len / seconds, step_times_s=times,
                   final_loss=float(metrics["loss"]), xla_options=VARIANTS[name][2], **_describe(cfg),
                   attention_path=run_setup.attention_path(run.config, cfg, run.host_batch["segment_ids"]))
      print(f"{name}: {seconds * 1e3:.2f} ms/step, {cfg.batch_size * cfg.seq_len / seconds:,.0f} tokens/s",
            flush=True)
    except Exception as e:
      records.emit("lever", variant=name, phase="error", in_phase="steps", error=records.error_text(e))
    runs[name] = compiled[name] = None  # free this variant's state before the next one runs
    del state, frozen, batch, step


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog="python -m gpt2_lora_jax.bench.levers", description=__doc__.split("\n")[0])
  p.add_argument("--preset", default="gpt2")
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--seq_len", type=int, default=1024)
  p.add_argument("--attention", default="auto", help="attention_impl of variants that do not set it")
  p.add_argument("--variants", default="user,user_nodrop", help="',' within a group, '+' between groups")
  p.add_argument("--timed_steps", type=int, default=10)
  p.add_argument("--threads", type=int, default=8, help="concurrent compiles")
  p.add_argument("--smoke", action="store_true", help="tiny float32 shapes on the CPU")
  args = p.parse_args(argv)
  args.groups = [[v for v in g.split(",") if v] for g in args.variants.split("+")]
  unknown = sorted({v for g in args.groups for v in g} - set(VARIANTS))
  if unknown:
    p.error(f"--variants: unknown {unknown}; choose from {sorted(VARIANTS)}")
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  dev = jax.devices()[0]
  records.emit("lever", variant="-", phase="device", device_kind=dev.device_kind, platform=dev.platform,
               jax_version=jax.__version__)
  for names in args.groups:
    run_group(names, args)
  return 0


if __name__ == "__main__":
  sys.exit(main())
