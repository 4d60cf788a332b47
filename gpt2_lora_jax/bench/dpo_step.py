"""The DPO train step against the SFT train step on the same packed rows, on the device at hand.

    python -m gpt2_lora_jax.bench.dpo_step --preset=gpt2 --out_dir=DIR         # configs/dpo_hh.py:gpt2
    python -m gpt2_lora_jax.bench.dpo_step --smoke --out_dir=DIR                # tiny shapes, minutes on a CPU

Both steps are the project's (train.jit_train_step; the DPO one with dpo.make_loss_fn and its
reference adapters in the frozen tree, as train.run builds it), at configs/dpo_hh.py's settings for the
preset (bench.settings.dpo_settings: model, LoRA, batch, micro-batches, dpo.loss and beta; every one a
flag here too), on one synthetic batch of HH-like packed rows (random ids): each row's conversations
paired in order, the second half of each one its reply. The DPO step reads the pairs (reply_index,
pair_mask); the SFT step reads the same rows with the loss on the same reply tokens. The adapters'
B matrices are drawn at random (0.02 N(0, 1)), as after SFT, so the policy's forward is not the base's.

Per step (records.emit kind 'dpo_step', one record as each is measured, then one with the ratios):
lower_s and compile_s, the median step time over --timed_steps after warm-up (each step ended by
block_until_ready), tokens/s, matmul FLOPs with every loop counted per trip (bench.hlo_flops; a
conditional by its costlier branch, so the DPO count holds the head's slope matmul that the
reference's iteration skips) and XLA's cost_analysis FLOPs (each loop body once), XLA's memory plan
and the allocator's high-water mark (the SFT step runs first: its record holds the SFT step's peak,
the DPO record the peak of both). The DPO step's first call starts at its reference (policy adapters
= reference adapters): its loss, margin and log-probs are recorded, and the process exits 1 unless the
margin is exactly 0.0.
"""
from __future__ import annotations

import argparse
import datetime
import faulthandler
import math
import statistics
import sys
import time
import types

import jax
import numpy as np

from gpt2_lora_jax import dpo, lora, optim, remat, sharding, stacking, train
from gpt2_lora_jax.bench import attention_check, hlo_flops, records, run_setup
from gpt2_lora_jax.bench.harness import BenchConfig, _memory_analysis, _xla_flops, device_info, peak_bytes_in_use
from gpt2_lora_jax.bench.report import slug, write_pair
from gpt2_lora_jax.bench.settings import dpo_settings
from gpt2_lora_jax.errors import describe_exception

SMOKE = {"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 512, "batch_size": 4, "seq_len": 128,
         "max_segments": 8, "warmup_steps": 1, "timed_steps": 2}


class DpoSettings(dict):
  """dpo.* as dpo.make_loss_fn reads them (attribute access and .get), without ml_collections."""
  __getattr__ = dict.__getitem__


def preference_batch(seed: int, batch_size: int, seq_len: int, max_segments: int, vocab_size: int) -> dict:
  """Host arrays of B HH-like packed rows as pairs (module doc): the DPO batch, and 'loss_mask' for SFT."""
  seg = attention_check.hh_like_segment_ids(seed, batch_size, seq_len, max_segments)
  rng = np.random.default_rng(seed)
  positions = np.zeros_like(seg)
  reply = np.full(seg.shape, -1, np.int32)
  pairs = max(1, int(seg.max()) // 2)
  pair_mask = np.zeros((batch_size, pairs), np.float32)
  for b in range(batch_size):
    for s in range(1, int(seg[b].max()) + 1):
      where = np.flatnonzero(seg[b] == s)
      positions[b, where] = np.arange(len(where))
      j = (s - 1) // 2
      if j < pairs and 2 * j + 2 <= seg[b].max():  # both halves of pair j are in this row
        reply[b, where[len(where) // 2:]] = 2 * j + (s - 1) % 2
        pair_mask[b, j] = 1.0
  return {"inputs": rng.integers(0, vocab_size, seg.shape, dtype=np.int32),
          "targets": rng.integers(0, vocab_size, seg.shape, dtype=np.int32),
          "positions": positions, "segment_ids": seg, "reply_index": reply, "pair_mask": pair_mask,
          "loss_mask": (reply >= 0).astype(np.float32)}


def _random_lora_b(params, seed: int):
  """Every adapter's B drawn from 0.02 N(0, 1) (lora.add starts them at 0)."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  key = jax.random.PRNGKey(seed + 2)
  leaves = [0.02 * jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
            if jax.tree_util.keystr(path).endswith("['lora_b']") else x for i, (path, x) in enumerate(flat)]
  return jax.tree.unflatten(jax.tree.structure(params), leaves)


def _measure(name: str, step_fn, state, frozen, batch, args, devices) -> tuple[dict, dict, dict]:
  """(record fields, the state after the steps, the first call's metrics). FLOPs are per step: the
  compiled program is one device's, times the devices."""
  t0 = time.perf_counter()
  lowered = step_fn.lower(state, frozen, batch)
  lower_s = time.perf_counter() - t0
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  try:
    count = hlo_flops.dot_flops(compiled.as_text())
    matmul = {"matmul_flops_per_step": count["flops"] * len(devices), "loops": sorted(count["loops"].values()),
              "uncounted_custom_calls": count["uncounted"]}
  except Exception as e:  # the numbers below do not depend on it
    matmul = {"matmul_flops_per_step": None, "matmul_flops_error": describe_exception(e)}
  times, first = [], None
  for i in range(args.warmup_steps + args.timed_steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready((state, metrics))
    if i == 0:
      first = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if i >= args.warmup_steps:
      times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)
  tokens = args.batch_size * args.seq_len
  fields = {"program": name, "lower_s": lower_s, "compile_s": compile_s, "step_time_s": step_s,
            "step_times_s": times, "tokens_per_s": tokens / step_s, **matmul,
            "xla_cost_flops_per_step": (_xla_flops(compiled) or 0.0) * len(devices) or None,
            "memory_analysis": _memory_analysis(compiled), "peak_bytes_in_use": peak_bytes_in_use(devices)}
  return fields, state, first


def run(args) -> dict:
  """Builds both steps, measures them, emits the records and returns the result dict."""
  bench = BenchConfig(preset=args.preset, n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head,
                      vocab_size=args.vocab_size, batch_size=args.batch_size, seq_len=args.seq_len,
                      micro_batches=args.micro_batches, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                      lora_dropout=args.lora_dropout, lora_targets=args.lora_targets, remat=args.remat,
                      scan_layers=args.scan_layers, attention=args.attention, segments="hh",
                      max_segments=args.max_segments, dtype=args.dtype, param_dtype=args.param_dtype,
                      num_devices=args.num_devices, seed=args.seed, parts=("train",), side="jax")
  config = run_setup.gpt2_config(bench)
  devices = jax.devices()[:args.num_devices or None]
  mesh = sharding.make_mesh(devices=devices)
  sharding.check_batch_divides(args.batch_size, args.micro_batches, mesh)
  lora_cfg = run_setup._lora_config(bench)
  params = jax.jit(_random_lora_b, static_argnums=1)(run_setup._params(config, bench), args.seed)
  labels = lora.labels(params, lora_cfg)
  if config.scan_layers:
    params, labels = run_setup._stack_layers(params), stacking.stack_layers(labels)
  opt = types.SimpleNamespace(lr=1e-4, schedule="constant", warmup_steps=0, min_lr_ratio=0.0, b1=0.9,
                              b2=0.999, eps=1e-8, weight_decay=0.0, clip_norm=1.0)
  total = 2 * (args.warmup_steps + args.timed_steps)
  tx, schedule = optim.make_optimizer(opt, total, labels), optim.make_schedule(opt, total)
  state, frozen, state_sh, frozen_sh = train.init_state(params, labels, args.seed, mesh, tx)
  del params
  rows_batch = None
  remat_fields = {}
  if args.remat == "auto":  # as a run chooses (remat.py), on the SFT step of these rows: on CPU the
    # DPO step's memory plan equals the SFT step's (tests/test_dpo_cost.py)
    host = preference_batch(args.seed, args.batch_size, args.seq_len, args.max_segments, config.vocab_size)
    rows_batch = sharding.global_batch({k: host[k] for k in ("inputs", "targets", "positions", "segment_ids",
                                                             "loss_mask")}, mesh)

    def lower(policy, micro_batches, _batch_size):
      m = lora.make_model(config.replace(remat=policy), lora_cfg)
      step = train.jit_train_step(m, labels, micro_batches, tx, schedule, mesh, state_sh, frozen_sh)
      return step.lower(state, frozen, rows_batch)
    choice = remat.choose(lower, *remat.budget(devices), args.batch_size, args.micro_batches, len(devices))
    config = config.replace(remat=choice.policy)
    remat_fields = {"remat_setting": "auto", "remat_choice": choice.record()}
  model = lora.make_model(config, lora_cfg)
  settings = DpoSettings(loss=args.dpo_loss, beta=args.dpo_beta, reference_free=False, loss_weights=(),
                         label_smoothing=0.0, rpo_alpha=0.0, simpo_gamma=0.0)
  host = preference_batch(args.seed, args.batch_size, args.seq_len, args.max_segments, config.vocab_size)
  pairs = {k: v for k, v in host.items() if k != "loss_mask"}
  rows = {k: host[k] for k in ("inputs", "targets", "positions", "segment_ids", "loss_mask")}
  common = {"model": run_setup.model_name(bench), "batch_size": args.batch_size, "seq_len": args.seq_len,
            "micro_batches": args.micro_batches, "dtype": config.dtype, "param_dtype": config.param_dtype,
            "lora_rank": args.lora_rank, "remat": config.remat, "scan_layers": config.scan_layers,
            "attention": args.attention, "attention_path": run_setup.attention_path(config, bench, host["segment_ids"]),
            "pairs": int(host["pair_mask"].sum()), "reply_tokens": int(host["loss_mask"].sum()),
            "num_devices": len(devices), **remat_fields}

  sft_step = train.jit_train_step(model, labels, args.micro_batches, tx, schedule, mesh, state_sh, frozen_sh)
  sft, state, _ = _measure("sft", sft_step, state, frozen, sharding.global_batch(rows, mesh), args, devices)
  records.emit("dpo_step", **common, **sft)
  # The reference: a copy of the adapters as they are now, so the DPO step's first call starts at it.
  ref_frozen, ref_frozen_sh = train.frozen_for_step(state, frozen, state_sh, frozen_sh, dpo.REFERENCE_KEY)
  dpo_step = train.jit_train_step(model, labels, args.micro_batches, tx, schedule, mesh, state_sh, ref_frozen_sh,
                                  dpo.make_loss_fn(model, settings))
  dpo_row, state, first = _measure("dpo", dpo_step, state, ref_frozen, sharding.global_batch(pairs, mesh), args,
                                   devices)
  start = {"step0_loss_minus_log2": first["loss"] - math.log(2), "step0_margin": first["margin"],
           "step0_logps_equal": (first["logp_chosen"] == first["ref_logp_chosen"]
                                 and first["logp_rejected"] == first["ref_logp_rejected"])}
  records.emit("dpo_step", **common, **dpo_row, **start)
  ratio = lambda a, b: a / b if a and b else None
  summary = {"program": "dpo_over_sft", **start,
             "step_time_ratio": ratio(dpo_row["step_time_s"], sft["step_time_s"]),
             "matmul_flops_ratio": ratio(dpo_row["matmul_flops_per_step"], sft["matmul_flops_per_step"]),
             "xla_cost_flops_ratio": ratio(dpo_row["xla_cost_flops_per_step"], sft["xla_cost_flops_per_step"]),
             "temp_bytes_ratio": ratio(dpo_row["memory_analysis"].get("temp_size_in_bytes"),
                                       sft["memory_analysis"].get("temp_size_in_bytes"))}
  records.emit("dpo_step", **common, **summary)
  return {"timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(), "run_id": args.run_id,
          "tag": args.tag, "device": device_info(), "settings": common, "sft": sft, "dpo": dpo_row,
          "dpo_over_sft": summary}


def to_markdown(result: dict) -> str:
  s, d = result["settings"], result["device"]
  gib = lambda b: "-" if b is None else f"{b / 2 ** 30:.2f}"
  flops = lambda x: "-" if x is None else f"{x / 1e12:.4g}"
  lines = [f"# DPO step vs SFT step: {s['model']} on {d['device_kind']} x{s['num_devices']}",
           "", f"{s['batch_size']} x {s['seq_len']} tokens, {s['micro_batches']} micro-batch(es), {s['dtype']} "
           f"compute, {s['param_dtype']} base, LoRA r{s['lora_rank']}, remat {s['remat']}, scanned "
           f"{s['scan_layers']}, attention {s['attention']} ({s['attention_path']}); {s['pairs']} pairs, "
           f"{s['reply_tokens']} reply tokens", "",
           "| step | step time (ms) | tokens/s | matmul TFLOP/step | XLA cost TFLOP | temp (GiB) | peak (GiB) | compile (s) |",
           "|---|---|---|---|---|---|---|---|"]
  for name in ("sft", "dpo"):
    r = result[name]
    lines.append(f"| {name} | {r['step_time_s'] * 1e3:.1f} | {r['tokens_per_s']:,.0f} | "
                 f"{flops(r['matmul_flops_per_step'])} | {flops(r['xla_cost_flops_per_step'])} | "
                 f"{gib(r['memory_analysis'].get('temp_size_in_bytes'))} | {gib(r['peak_bytes_in_use'])} | "
                 f"{r['compile_s']:.1f} |")
  o = result["dpo_over_sft"]
  fmt = lambda x: "-" if x is None else f"{x:.3f}"
  lines += ["", f"DPO / SFT: step time {fmt(o['step_time_ratio'])}, matmul FLOPs {fmt(o['matmul_flops_ratio'])}, "
            f"temporaries {fmt(o['temp_bytes_ratio'])}.",
            f"First DPO step (policy = reference): margin {o['step0_margin']!r}, loss - log 2 = "
            f"{o['step0_loss_minus_log2']:.3g}, policy and reference log-probs equal: {o['step0_logps_equal']}."]
  return "\n".join(lines) + "\n"


def parse_args(argv=None):
  parser = argparse.ArgumentParser(prog="python -m gpt2_lora_jax.bench.dpo_step", description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="gpt2", help="GPT-2 size; the settings are configs/dpo_hh.py's for it")
  parser.add_argument("--smoke", action="store_true", help=f"tiny shapes for a CPU: {SMOKE} unless given")
  for name, kind in (("n_layer", int), ("n_embd", int), ("n_head", int), ("vocab_size", int), ("batch_size", int),
                     ("seq_len", int), ("micro_batches", int), ("max_segments", int), ("warmup_steps", int),
                     ("timed_steps", int), ("lora_rank", int), ("lora_alpha", float), ("lora_dropout", float),
                     ("lora_targets", str), ("remat", str), ("attention", str), ("dtype", str), ("param_dtype", str),
                     ("dpo_loss", str), ("dpo_beta", float)):
    parser.add_argument(f"--{name}", type=kind, default=None, help="default: configs/dpo_hh.py's (or the "
                        "benchmark's) value")
  parser.add_argument("--scan_layers", type=int, choices=(0, 1), default=None)
  parser.add_argument("--num_devices", type=int, default=0, help="devices in the mesh (0: all)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out_dir", default="", help="where the JSON and Markdown go ('' = write nothing)")
  parser.add_argument("--run_id", default="")
  parser.add_argument("--tag", default="")
  parser.add_argument("--stall_dump_s", type=float, default=0.0, help="stack dumps to stderr every this many s")
  args = parser.parse_args(argv)
  try:
    settings = dpo_settings(args.preset)
  except (ValueError, KeyError, OSError) as e:
    parser.error(f"--preset={args.preset!r}: {describe_exception(e)}")
  defaults = {"n_layer": 0, "n_embd": 0, "n_head": 0, "vocab_size": 50257, "seq_len": 1024, "max_segments": 32,
              "warmup_steps": 2, "timed_steps": 10, **{k: v for k, v in settings.items() if not k.startswith("dpo_")},
              "dpo_loss": settings["dpo_loss"], "dpo_beta": settings["dpo_beta"], **(SMOKE if args.smoke else {})}
  for name, value in defaults.items():
    if getattr(args, name, None) is None:
      setattr(args, name, value)
  if isinstance(args.lora_targets, str):
    args.lora_targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
  args.scan_layers = bool(args.scan_layers)
  if settings["dpo_reference_free"] or args.dpo_loss in ("simpo", "sft"):
    parser.error(f"--dpo_loss={args.dpo_loss!r}: this benchmark times a step with the in-step reference; "
                 "choose a loss that reads it (e.g. sigmoid)")
  return args


def write(result: dict, out_dir: str) -> dict:
  name = f"dpo_step_{slug(result['device']['device_kind'])}_{slug(result['settings']['model'])}"
  return write_pair(result, out_dir, name, to_markdown(result))

def main(argv=None) -> int:
  args = parse_args(argv)
  if args.stall_dump_s > 0:
    faulthandler.dump_traceback_later(args.stall_dump_s, repeat=True)
  result = run(args)
  print(to_markdown(result), flush=True)
  if args.out_dir:
    paths = write(result, args.out_dir)
    print(f"wrote {paths['json']} and {paths['markdown']}", file=sys.stderr)
  margin = result["dpo_over_sft"]["step0_margin"]
  if margin != 0.0:
    print(f"the first DPO step is not at its reference: margin {margin!r} (want exactly 0.0)", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
