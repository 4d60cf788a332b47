"""Where does the XLA attention's time go here? Lower, compile, first run and steady run of a jitted
attention forward + backward at GPT-2 shapes, bf16, with a dense packed-segment mask.

    python -m gpt2_lora_jax.bench.xla_attention                                   # B2 T1024 H12 K64
    XLA_FLAGS=--xla_gpu_autotune_level=0 python -m gpt2_lora_jax.bench.xla_attention   # the A/B: no autotuning

Cases, in this order (each recorded with records.emit, kind 'xla_attention', phase by phase):
  attend_xla      the project's attention.attend with Mask('xla', dense mask): what the model's
                  XLA path and the sampler run, whatever attention.py's implementation is
  nn_xla          jax.nn.dot_product_attention(implementation='xla', mask=...)
  einsum_f32acc   plain einsums, bf16 inputs, fp32 accumulation via preferred_element_type and no
                  explicit dot algorithm (a reference written here)
  nn_cudnn        jax.nn.dot_product_attention(implementation='cudnn', mask=...), NVIDIA GPUs only
The lower phase also counts the dots carrying an explicit algorithm (`algorithm = ` in the lowered
text). gpu_check.sh runs this twice, with and without XLA_FLAGS=--xla_gpu_autotune_level=0 (XLA's
GPU autotuner is a known source of long compiles). A case still running at --case_timeout_s is
abandoned and the next runs; a stack dump of every thread goes to stderr every --stall_dump_s.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from gpt2_lora_jax import attention
from gpt2_lora_jax.bench import records

CASES = ("attend_xla", "nn_xla", "einsum_f32acc", "nn_cudnn")


def einsum_f32acc(q_BTHK, k_BSHK, v_BSHK, mask_B1TS):
  K = q_BTHK.shape[-1]
  s_BHTS = jnp.einsum("bthk,bshk->bhts", q_BTHK, k_BSHK, preferred_element_type=jnp.float32) / np.sqrt(K)
  p_BHTS = jax.nn.softmax(jnp.where(mask_B1TS, s_BHTS, jnp.finfo(jnp.float32).min), axis=-1)
  out = jnp.einsum("bhts,bshk->bthk", p_BHTS.astype(q_BTHK.dtype), v_BSHK, preferred_element_type=jnp.float32)
  return out.astype(q_BTHK.dtype)


def attention_fn(case: str):
  if case == "attend_xla":
    return lambda q, k, v, m: attention.attend(q, k, v, attention.Mask("xla", m))
  if case == "einsum_f32acc":
    return einsum_f32acc
  impl = "xla" if case == "nn_xla" else "cudnn"
  return lambda q, k, v, m: jax.nn.dot_product_attention(q, k, v, mask=m, implementation=impl)


def inputs(B: int, T: int, H: int, K: int, dtype: str):
  seg = np.ones((B, T), np.int32)
  seg[:, T // 3:] = 2  # two conversations per row
  mask = (seg[:, None, :, None] == seg[:, None, None, :]) & np.tril(np.ones((T, T), bool))
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((B, T, H, K)), dtype) for _ in range(3))
  return q, k, v, jnp.asarray(mask)


def phases(case: str, args, repeats: int):
  f = attention_fn(case)

  def fwd_bwd(q, k, v, m):
    out, vjp = jax.vjp(lambda q, k, v: f(q, k, v, m), q, k, v)
    return out, vjp(out)

  box = {}

  def lower(_):
    box["args"] = inputs(args.batch_size, args.seq_len, args.heads, args.head_dim, args.dtype)
    lowered = jax.jit(fwd_bwd).lower(*box["args"])
    return lowered, {"dots_with_algorithm": lowered.as_text().count("algorithm = ")}

  def run(compiled):
    jax.block_until_ready(compiled(*box["args"]))
    return compiled, {}

  def steady(compiled):
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(*box["args"]))
      times.append(time.perf_counter() - t0)
    return compiled, {"median_ms": round(1e3 * statistics.median(times), 4)}

  return [("lower", lower), ("compile", lambda lowered: (lowered.compile(), {})), ("first_run", run),
          ("steady", steady)]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m gpt2_lora_jax.bench.xla_attention", description=__doc__.split("\n")[0])
  for name, default in (("batch_size", 2), ("seq_len", 1024), ("heads", 12), ("head_dim", 64), ("repeats", 5)):
    parser.add_argument(f"--{name}", type=int, default=default)
  parser.add_argument("--dtype", default="bfloat16")
  records.add_case_flags(parser, CASES, case_timeout_s=30.0)
  args = parser.parse_args(argv)
  cases = records.chosen_cases(parser, args, CASES)
  device = jax.devices()[0]
  if device.platform != "gpu":
    cases = [c for c in cases if c != "nn_cudnn"]
  xla_flags = os.environ.get("XLA_FLAGS", "")
  print(f"XLA attention on {device.device_kind}, jax {jax.__version__}, XLA_FLAGS '{xla_flags}'; "
        f"B{args.batch_size} T{args.seq_len} H{args.heads} K{args.head_dim} {args.dtype}", flush=True)
  meta = {"xla_flags": xla_flags, "device_kind": device.device_kind, "batch_size": args.batch_size,
          "seq_len": args.seq_len, "heads": args.heads, "head_dim": args.head_dim, "dtype": args.dtype}
  statuses = {case: records.run_phases("xla_attention", case, phases(case, args, args.repeats),
                                             args.case_timeout_s, **meta)["status"] for case in cases}
  code = 0 if all(s == "ok" for s in statuses.values()) else 1
  if records.any_timed_out():  # an abandoned thread may never return: do not wait for it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  return code


if __name__ == "__main__":
  sys.exit(main())
