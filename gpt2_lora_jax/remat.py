"""model.remat='auto': the train step's rematerialisation policy chosen from its compiled memory.

Policies from the least recompute to the most: 'none' (keep every activation for the backward),
'dots' (keep matmul outputs, recompute the rest), 'full' (keep each block's input only).
`choose` compiles the step for each in that order on the devices at hand and keeps the first whose
memory per device, as XLA's compiled memory_analysis() reports it, fits the budget: the program it
compiled is the one that runs (nothing is compiled twice). Why not fixed per model size: the plan
depends on the backend (CPU attention holds [B, H, T, T] scores, cuDNN attention does not: gpt2 at
32 x 1024 without remat plans 83.1 GiB on CPU, and gpt2 at 16 x 1024 without remat peaked at
7.8 GiB on an H200; benchmarks/README.md), on the batch, the micro-batches and the mesh.

Memory of a step per device: temporaries + arguments + outputs - outputs aliased to donated
arguments (the state). Budget per device: MEMORY_FRACTION x the allocator's limit
(device.memory_stats()['bytes_limit'], the smallest over the devices), or train.memory_limit_gib
when set. CPU devices report no limit: there the budget is MEMORY_FRACTION x the host's RAM shared
by its local devices, a rule of this module, not a measurement. An accelerator that reports none
is an error asking for train.memory_limit_gib.

When no policy fits, the error names what each needs and a setting that fits, found by compiling
the step again ('full', the least memory) with more micro-batches and, equivalently, the smaller
batch of the same rows per pass.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable

import jax
import numpy as np

from gpt2_lora_jax.errors import UserError

POLICIES = ("none", "dots", "full")  # least recompute first
# The share of the device's limit a step may plan for. memory_analysis() counts the step's own
# buffers only; the rest of a run holds more at the same time (the next batch placed while a step
# runs, held-out evaluation and checkpoint copies between steps) and the allocator fragments.
# 0.9 leaves a tenth for those: a margin chosen here, not measured (no GPU peak has been compared
# with a plan yet).
MEMORY_FRACTION = 0.9
GIB = 2 ** 30


def size_text(n_bytes: int) -> str:
  """'28.23 GiB', or MiB below 1 GiB (tiny models' steps)."""
  return f"{n_bytes / GIB:.2f} GiB" if n_bytes >= GIB else f"{n_bytes / 2**20:.1f} MiB"


def step_bytes(compiled) -> int:
  """Bytes per device a compiled step holds: temporaries + arguments + outputs not aliased to a
  donated argument (what XLA's buffer assignment reports; the program is the per-device one)."""
  m = compiled.memory_analysis()
  return int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
             - m.alias_size_in_bytes)


def _host_ram_bytes() -> int:
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def budget(devices, limit_gib: float = 0.0) -> tuple[int, str]:
  """(bytes per device a step may plan for, where the figure comes from), the same on every process
  (the smallest over them: every process must choose the same program)."""
  if limit_gib > 0:
    bytes_, source = int(limit_gib * GIB), f"train.memory_limit_gib={limit_gib:g}"
  else:
    limits = [(d.memory_stats() or {}).get("bytes_limit") for d in devices]
    if limits and all(limits):
      limit = min(limits)
      bytes_ = int(MEMORY_FRACTION * limit)
      source = f"{MEMORY_FRACTION:g} x bytes_limit {size_text(limit)} of {devices[0].device_kind}"
    elif devices[0].platform != "cpu":  # an accelerator without the figure: the host's RAM says nothing
      raise UserError(f"model.remat='auto': {devices[0].device_kind} ({devices[0].platform}) reports no "
                      "memory limit (memory_stats()['bytes_limit']); set --config.train.memory_limit_gib "
                      "to the GiB per device the train step may use, or choose model.remat")
    else:
      ram = _host_ram_bytes()
      bytes_ = int(MEMORY_FRACTION * ram / len(devices))
      source = (f"{MEMORY_FRACTION:g} x host RAM {size_text(ram)} / {len(devices)} devices "
                f"({devices[0].platform} reports no memory limit)")
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    bytes_ = int(np.min(multihost_utils.process_allgather(np.int64(bytes_))))
  return bytes_, source


@dataclasses.dataclass
class Choice:
  """The chosen policy, its compiled step, and what each policy tried needs (bytes per device)."""
  policy: str
  compiled: object  # jax.stages.Compiled: call it as the jitted step
  needs: dict  # policy -> bytes per device, in the order tried
  lower_s: dict  # policy -> seconds to trace and lower
  compile_s: dict  # policy -> seconds to compile
  budget: int
  source: str

  def line(self) -> str:
    tried = ", ".join(f"{p} {size_text(b)}" for p, b in self.needs.items())
    return (f"remat='auto': '{self.policy}' (train step memory per device: {tried}; budget "
            f"{size_text(self.budget)} = {self.source})")

  def record(self) -> dict:
    return {"policy": self.policy, "bytes_per_device": dict(self.needs), "lower_s": dict(self.lower_s),
            "compile_s": dict(self.compile_s), "budget_bytes": self.budget, "budget_source": self.source}


def choose(lower: Callable[..., object], budget_bytes: int, source: str, batch_size: int,
           micro_batches: int, n_devices: int) -> Choice:
  """The first of POLICIES whose compiled step fits budget_bytes, with that compiled step.

  lower(policy, micro_batches, batch_size) -> the step lowered (jax.stages.Lowered) for that
  policy, micro-batch count and global batch; only lower(policy, micro_batches, batch_size) with
  the run's own micro_batches and batch_size is called unless nothing fits. Then a UserError (one
  line) names each policy's need and a setting that fits (fitting_settings).
  """
  needs, lower_s, compile_s = {}, {}, {}
  for policy in POLICIES:
    t0 = time.perf_counter()
    lowered = lower(policy, micro_batches, batch_size)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    lower_s[policy], compile_s[policy] = t1 - t0, time.perf_counter() - t1
    needs[policy] = step_bytes(compiled)
    if needs[policy] <= budget_bytes:
      return Choice(policy, compiled, needs, lower_s, compile_s, budget_bytes, source)
    del compiled, lowered
  tried = ", ".join(f"{p} {size_text(b)}" for p, b in needs.items())
  raise UserError(f"the train step fits no remat policy: it needs per device {tried}, over the "
                  f"budget of {size_text(budget_bytes)} ({source}); "
                  + fitting_settings(lower, budget_bytes, batch_size, micro_batches, n_devices))


def fitting_settings(lower, budget_bytes: int, batch_size: int, micro_batches: int, n_devices: int) -> str:
  """What would fit, compiled with the heaviest policy ('full'): the fewest micro-batches above the
  run's that do (each pass holding batch_size / m rows spread over the devices), and the smaller
  batch of the same rows per pass at the run's micro_batches. Text for the error message."""
  heaviest = POLICIES[-1]
  for m in range(micro_batches + 1, batch_size + 1):
    if batch_size % m or (batch_size // m) % n_devices:
      continue
    fits = step_bytes(lower(heaviest, m, batch_size).compile())
    if fits > budget_bytes:
      continue
    smaller = batch_size * micro_batches // m
    text = f"train.micro_batches={m} fits ('{heaviest}' {size_text(fits)})"
    if smaller % (micro_batches * n_devices) == 0:
      small = step_bytes(lower(heaviest, micro_batches, smaller).compile())
      verdict = "fits" if small <= budget_bytes else "does not fit"
      text += f", and train.batch_size={smaller} {verdict} ('{heaviest}' {size_text(small)})"
    return text
  return (f"even {n_devices} row(s) per pass (train.micro_batches={batch_size // n_devices}) does not "
          "fit: use more devices (mesh.fsdp splits the weights) or a smaller model or max_length")
