"""The GPU check's first stage: does every program a user runs lower, compile and run here, and how fast?

    python -m gpt2_lora_jax.bench.preflight                      # gpt2, 2 x 1024, every case
    python -m gpt2_lora_jax.bench.preflight --cases=train_xla --n_layer=2 --n_embd=64 --n_head=4

gpt2 at batch 2 x 1024 on HH-like packed rows (attention_check.hh_like_segment_ids) with the model
and LoRA settings of configs/gpt2_hh.py (settings.user_settings: scanned blocks, remat 'auto',
LoRA r16 alpha 32 dropout 0.05, bf16 base and compute), one case per attention path, then the
sampler (sample.generate_tokens: prefill + a few decode steps) per attention_impl:

  train_auto, train_cudnn, train_xla   attention_impl 'auto' / 'cudnn' / 'xla', packed rows
  train_cudnn_causal                   'cudnn' without segment ids (whole rows, plain causal)
  sample_auto, sample_xla              the sampler with attention_impl 'auto' / 'xla'

Default order: the cuDNN and 'auto' cases first, then the sampler, then the XLA cases (the XLA path
is the one seen not to finish a train step on an H200). Each case's phases (setup, lower, compile,
first step, second step; the sampler: first call with its compiles, second call) are printed and
recorded (records.emit, kind 'preflight') the moment each ends, with the attention path the
model chose, the programs XLA compiled during setup (run_setup.compiled_programs) and, for remat
'auto', the policy remat.choose took with every figure (its compile phase); an exception is
recorded with its type and message and the next case runs; a case still running at
--case_timeout_s is abandoned (its thread cannot be stopped; the process ends with os._exit). A
traceback of every thread goes to stderr every --stall_dump_s seconds (faulthandler), so a stall
shows where it sits. Exit code 0 when every case ran. Imports no ml_collections or datasets.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax
import numpy as np

from gpt2_lora_jax import attention, remat, sample
from gpt2_lora_jax.bench import harness, records, run_setup
from gpt2_lora_jax import model as gpt2_model

TRAIN_CASES = {"train_auto": ("auto", True), "train_cudnn": ("cudnn", True),
               "train_cudnn_causal": ("cudnn", False), "train_xla": ("xla", True)}
SAMPLE_CASES = {"sample_auto": "auto", "sample_xla": "xla"}
CASES = ("train_auto", "train_cudnn", "train_cudnn_causal", "sample_auto", "train_xla", "sample_xla")


def case_config(args, attention_impl: str, segment_ids: bool) -> harness.BenchConfig:
  """configs/gpt2_hh.py's settings for args.preset at the preflight's shape, with this attention."""
  cfg = harness.BenchConfig(preset=args.preset, n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head,
                          vocab_size=args.vocab_size, batch_size=args.batch_size, seq_len=args.seq_len,
                          max_segments=args.max_segments, segments="hh", setting="user", side="jax",
                          warmup_steps=0, timed_steps=1, out_dir="")
  # 'flags' keeps the user setting's fields as they now are and lets this case's attention in.
  dtypes = {"dtype": args.dtype, "param_dtype": args.dtype} if args.dtype else {}
  return dataclasses.replace(cfg, setting="flags", attention=attention_impl, segment_ids=segment_ids, **dtypes)


def train_phases(cfg: harness.BenchConfig):
  box = {}
  # remat 'auto' (the user setting): the lower phase lowers the first policy remat.choose tries, the
  # compile phase runs remat.choose, which compiles that one and, if it does not fit, the next.
  first_policy = remat.POLICIES[0] if cfg.remat == "auto" else cfg.remat

  def setup(_):
    with run_setup.compiled_programs() as programs:
      run = run_setup.train_setup(cfg)
      path = run_setup.attention_path(run.config, cfg, run.host_batch["segment_ids"])
    box["run"] = run
    return run, {"attention_path": path, "programs_compiled": len(programs), "programs": programs}

  def lower(run):
    lowered = run.lower(first_policy, cfg.micro_batches, cfg.batch_size)
    text = lowered.as_text()
    return lowered, {"dots_with_algorithm": text.count("algorithm = "), "cudnn_calls": text.count("__cudnn$fmha")}

  def compile_(lowered):
    if cfg.remat != "auto":
      return lowered.compile(), {}
    run = box["run"]
    first = (first_policy, cfg.micro_batches, cfg.batch_size)
    lower_again = lambda *key: lowered if key == first else run.lower(*key)
    choice = remat.choose(lower_again, *remat.budget(run.devices), cfg.batch_size, cfg.micro_batches,
                          len(run.devices))
    return choice.compiled, {"remat": choice.record()}

  def step(compiled):
    run = box["run"]
    run.state, metrics = compiled(run.state, run.frozen, run.batch)
    jax.block_until_ready((run.state, metrics))
    return compiled, {"loss": round(float(metrics["loss"]), 4)}

  return [("setup", setup), ("lower", lower), ("compile", compile_), ("first_step", step), ("second_step", step)]


def sample_phases(cfg: harness.BenchConfig, prompt_len: int, new_tokens: int):
  def setup(_):
    config = run_setup.gpt2_config(cfg)
    config = config.replace(param_dtype=config.dtype)  # sampling reads the weights in compute dtype
    params = run_setup.base_params(config, cfg)  # the train cases' init program (compiled once)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (cfg.batch_size, prompt_len), dtype=np.int32)
    return (gpt2_model.GPT2(config), params, ids), {"scan_layers": config.scan_layers}

  def call(value):
    model, params, ids = value
    out = sample.generate_tokens(model, params, ids, np.ones_like(ids), max_new_tokens=new_tokens,
                                 temperature=0.0, eos_id=None)  # ends in a host copy: synced
    return value, {"new_tokens": int(out["num_steps"])}

  return [("setup", setup), ("first_call", call), ("second_call", call)]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m gpt2_lora_jax.bench.preflight", description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="gpt2")
  for name, default in (("n_layer", 0), ("n_embd", 0), ("n_head", 0), ("vocab_size", 50257), ("batch_size", 2),
                        ("seq_len", 1024), ("max_segments", 32), ("prompt_len", 64), ("new_tokens", 8)):
    parser.add_argument(f"--{name}", type=int, default=default)
  parser.add_argument("--dtype", default="", help="compute and base dtype ('' = configs/gpt2_hh.py's, bfloat16); "
                      "the CPU smoke run uses float32, which XLA:CPU compiles in half the time")
  records.add_case_flags(parser, CASES, case_timeout_s=40.0)
  args = parser.parse_args(argv)
  cases = records.chosen_cases(parser, args, CASES)
  device = jax.devices()[0]
  records.emit("preflight", case="device", phase="info", device_kind=device.device_kind,
                     platform=device.platform, jax_version=jax.__version__, xla_flags=os.environ.get("XLA_FLAGS", ""))
  print(f"preflight on {device.device_kind} ({device.platform}), jax {jax.__version__}", flush=True)
  statuses = {"platform": records.run_phases(
      "preflight", "platform", [("probe", lambda _: (None, _platform_info()))], args.case_timeout_s)["status"]}
  for case in cases:
    t0 = time.perf_counter()
    if case in TRAIN_CASES:
      impl, segment_ids = TRAIN_CASES[case]
      phases, meta = train_phases(case_config(args, impl, segment_ids)), {"attention_impl": impl}
    else:
      impl = SAMPLE_CASES[case]
      phases = sample_phases(case_config(args, impl, True), args.prompt_len, args.new_tokens)
      meta = {"attention_impl": impl}
    statuses[case] = records.run_phases("preflight", case, phases, args.case_timeout_s, **meta)["status"]
    print(f"{case}: {statuses[case]} after {time.perf_counter() - t0:.1f}s", flush=True)
  failed = {c: s for c, s in statuses.items() if s != "ok"}
  print(f"preflight: {len(statuses) - len(failed)} of {len(statuses)} cases ran" +
        (f"; not: {', '.join(failed)}" if failed else ""), flush=True)
  code = 1 if failed else 0
  if records.any_timed_out():  # an abandoned thread may never return: do not wait for it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  return code


def _platform_info() -> dict:
  """attention.platform()'s fields (it probes the packed layout on a GPU that may use it)."""
  plat = attention.platform()
  return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(plat).items()}


if __name__ == "__main__":
  sys.exit(main())
