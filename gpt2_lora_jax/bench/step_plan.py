"""The compiler's plan of one train step on abstract shapes: memory, FLOPs and compile time.

Nothing is allocated or executed: abstract_train_step builds the project's jitted train step
(train.jit_train_step) for one GPT-2 size over ShapeDtypeStructs, and its callers lower and compile
it for the backend at hand and read that compiler's numbers (BUILD.md's memory table; the
compile-time study in benchmarks/compile_plan.py).

    python -m gpt2_lora_jax.bench.step_plan --memory_table [--sizes=gpt2,gpt2-xl] [--fsdp=1,8]

prints the per-device memory XLA plans for one train step of each GPT-2 size (BUILD.md's table).
"""
from __future__ import annotations

import os
import types

import jax
import numpy as np

from gpt2_lora_jax import lora, optim, sharding, stacking, train
from gpt2_lora_jax import model as gpt2_model


def abstract_train_step(preset: str, rank: int, batch_size: int = 8, seq_len: int = 1024, fsdp: int = 1,
                        targets=("c_attn", "c_proj", "c_fc"), remat: str = "none",
                        scan_layers: bool = False):
  """(jitted train step, its arguments as ShapeDtypeStructs, params) for one GPT-2 size; no arrays.

  rank > 0: LoRA (bf16 frozen base, fp32 adapters + AdamW); rank 0: full fine-tuning (fp32 params
  + AdamW). Compute in bf16 either way. Lower and compile it for the backend at hand to read
  that compiler's plan (memory, FLOPs, compile time).
  """
  config = gpt2_model.GPT2Config.preset(preset, param_dtype="bfloat16" if rank else "float32",
                                        dtype="bfloat16", remat=remat, scan_layers=scan_layers)
  lora_cfg = lora.LoraConfig(rank=rank, alpha=2.0 * max(rank, 1), dropout=0.0, targets=tuple(targets))
  base = gpt2_model.param_shapes(config)
  params = jax.eval_shape(lambda b: lora.add(b, lora_cfg, jax.random.PRNGKey(0)), base) if rank else base
  if scan_layers:
    params = stacking.stack_layers(params)
  labels = lora.labels(params, lora_cfg)
  optim_cfg = types.SimpleNamespace(lr=1e-4, schedule="constant", warmup_steps=0, min_lr_ratio=0.0,
                                    b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, clip_norm=1.0)
  tx, schedule = optim.make_optimizer(optim_cfg, 1000, labels), optim.make_schedule(optim_cfg, 1000)
  mesh = sharding.make_mesh(-1, fsdp, jax.devices()[:fsdp])
  sharding.check_batch_divides(batch_size, 1, mesh)
  repl = sharding.replicated(mesh)
  param_sh = sharding.param_shardings(params, mesh)
  trainable_sh, frozen_sh = lora.split(param_sh, labels)
  opt_sh = sharding.opt_state_shardings(tx, params, param_sh, mesh)
  placed = lambda tree, sh: jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)
  trainable, frozen = lora.split(params, labels)
  state = {"trainable": placed(trainable, trainable_sh),
           "opt_state": placed(jax.eval_shape(tx.init, params), opt_sh),
           "step": jax.ShapeDtypeStruct((), np.int32, sharding=repl),
           "rng": jax.ShapeDtypeStruct((2,), np.uint32, sharding=repl)}
  state_sh = {"trainable": trainable_sh, "opt_state": opt_sh, "step": repl, "rng": repl}
  rows = lambda dtype: jax.ShapeDtypeStruct((batch_size, seq_len), dtype, sharding=sharding.batch_sharding(mesh))
  batch = {"inputs": rows(np.int32), "targets": rows(np.int32), "positions": rows(np.int32),
           "segment_ids": rows(np.int32), "loss_mask": rows(np.float32)}
  step_fn = train.jit_train_step(lora.make_model(config, lora_cfg), labels, 1, tx, schedule, mesh,
                                 state_sh, frozen_sh)
  return step_fn, (state, placed(frozen, frozen_sh), batch), (params, trainable)


def train_step_memory(preset: str, rank: int, batch_size: int = 8, seq_len: int = 1024, fsdp: int = 1,
                      targets=("c_attn", "c_proj", "c_fc"), remat: str = "none",
                      scan_layers: bool = False) -> dict:
  """Bytes per device that XLA plans for one train step of a GPT-2 size, from abstract inputs.

  See abstract_train_step: everything is a ShapeDtypeStruct, nothing is allocated, the step is
  lowered and compiled for the backend at hand (the numbers are that compiler's plan).
  """
  step_fn, args, (params, trainable) = abstract_train_step(preset, rank, batch_size, seq_len, fsdp,
                                                           targets, remat, scan_layers)
  memory = step_fn.lower(*args).compile().memory_analysis()
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  n_trainable = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable))
  args, out = memory.argument_size_in_bytes, memory.output_size_in_bytes
  alias, temp = memory.alias_size_in_bytes, memory.temp_size_in_bytes
  # Donated state is aliased to the outputs: peak = inputs + new outputs + temporaries.
  return {"preset": preset, "mode": f"LoRA r={rank}" if rank else "full FT", "fsdp": fsdp,
          "params": n_params, "trainable": n_trainable, "arguments": args, "outputs_not_aliased": out - alias,
          "temp": temp, "peak": args + out - alias + temp}


def memory_table(presets, ranks=(16, 0), fsdp_sizes=(1,), **kw) -> str:
  """A Markdown table of train_step_memory over presets x modes x fsdp sizes (GiB per device)."""
  gib = lambda b: f"{b / 2**30:.2f}"
  lines = ["| model | params | mode | fsdp | state + batch (GiB) | temporaries (GiB) | peak / device (GiB) |",
           "|---|---|---|---|---|---|---|"]
  print("\n".join(lines), flush=True)  # rows follow as each compiles (a large model takes minutes)
  for preset in presets:
    for rank in ranks:
      for fsdp in fsdp_sizes:
        m = train_step_memory(preset, rank, fsdp=fsdp, **kw)
        lines.append(f"| {preset} | {m['params'] / 1e6:.0f}M | {m['mode']} ({m['trainable'] / 1e6:.1f}M "
                     f"trained) | {fsdp} | {gib(m['arguments'])} | {gib(m['temp'])} | {gib(m['peak'])} |")
        print(lines[-1], flush=True)
  return "\n".join(lines)


if __name__ == "__main__":
  import argparse
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--memory_table", action="store_true", help="print the per-device memory table")
  parser.add_argument("--sizes", default="gpt2,gpt2-medium,gpt2-large,gpt2-xl")
  parser.add_argument("--ranks", default="16,0", help="LoRA ranks; 0 = full fine-tuning")
  parser.add_argument("--fsdp", default="1", help="fsdp sizes (CPU devices are faked to the largest)")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--seq_len", type=int, default=1024)
  parser.add_argument("--remat", default="none")
  args = parser.parse_args()
  if not args.memory_table:
    parser.error("nothing to do: pass --memory_table")
  fsdp_sizes = [int(x) for x in args.fsdp.split(",")]
  # Before the backend starts: enough fake CPU devices for the largest fsdp size.
  if jax.config.jax_platforms in (None, "", "cpu"):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={max(fsdp_sizes)}")
  print(f"backend {jax.default_backend()}, batch {args.batch_size} x {args.seq_len}, remat {args.remat}")
  memory_table(args.sizes.split(","), [int(r) for r in args.ranks.split(",")], fsdp_sizes,
               batch_size=args.batch_size, seq_len=args.seq_len, remat=args.remat)
