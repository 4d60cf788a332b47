"""Flash attention for packed rows through Pallas on NVIDIA GPUs (attention path 'pallas').

    segment_attention(q_BTHK, k_BTHK, v_BTHK, segment_ids_BT) -> (B, T, H, K), causal inside each
                                                                 run of equal segment ids

It calls jax's own Pallas (Triton) flash-attention kernels, jax.experimental.pallas.ops.gpu.
attention.mha (causal=True with segment ids; its custom_vjp runs a Pallas backward), so the mask
is computed inside the kernel from the (B, T) ids: no dense (B, 1, T, T) mask, no cuDNN packed
layout. Why it exists: on one H200 (jax 0.11.2, 2026-12-04, gpt2 b16 x 1024, benchmarks/results/
explore_20261204.md) every cuDNN packed-layout backward call spent 0.37 ms zeroing a 1.69 GB
workspace and 0.25 ms in its dO.O pass: 11.9 ms of a 45.5 ms step went to attention backward.

Semantics equal model.make_attention_mask for packed rows: query t sees key s iff s <= t and both
carry the same id (trailing padding, id 0, attends among itself; its loss is masked). T must be a
multiple of the kernel's block (min(BLOCK, T)); attention.select_path checks it.

On a device mesh the kernel is mapped over the rows with shard_map (a Pallas call is not split by
XLA's partitioner: it would gather the whole batch on every device). The mesh comes from the
abstract mesh in context (jax.sharding.use_abstract_mesh, which train.py sets while tracing its
steps); with none, the call is left as it is, as on one device. `interpret=True` runs the same
kernels in Pallas' interpreter, which is how CPU tests check them.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from gpt2_lora_jax.sharding import BATCH_AXES  # the mesh axes that split a batch's rows

BLOCK = 128  # query and key rows per kernel block (the kernel's default block sizes)


def supported(seq_len: int, head_dim: int) -> str:
  """'' when the kernel takes this shape, else why not."""
  block = min(BLOCK, seq_len)
  if seq_len % block:
    return f"sequence length {seq_len} is not a multiple of the kernel's block {BLOCK}"
  if head_dim > 256:
    return f"head size {head_dim} (the kernel holds a head in registers: at most 256)"
  return ""


def _kernel(q, k, v, segment_ids, interpret: bool):
  from jax.experimental.pallas.ops.gpu import attention as pallas_attention
  T = q.shape[1]
  sizes = pallas_attention.BlockSizes(block_q=min(BLOCK, T), block_k=min(BLOCK, T),
                                      block_q_dkv=min(BLOCK, T), block_kv_dkv=min(BLOCK, T),
                                      block_q_dq=min(BLOCK, T), block_kv_dq=min(BLOCK, T))
  return pallas_attention.mha(q, k, v, segment_ids, sm_scale=float(1.0 / np.sqrt(q.shape[-1])),
                              causal=True, block_sizes=sizes, interpret=interpret)


def _row_axes(mesh) -> tuple:
  """The mesh's batch axes that split rows (size > 1), in BATCH_AXES order."""
  if mesh is None or getattr(mesh, "empty", True):
    return ()
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  return tuple(a for a in BATCH_AXES if sizes.get(a, 1) > 1)


def segment_attention(q_BTHK, k_BTHK, v_BTHK, segment_ids_BT, interpret: bool = False):
  """softmax(q k^T / sqrt(K) + segment-causal mask) v: see the module docstring."""
  kernel = functools.partial(_kernel, interpret=interpret)
  segment_ids_BT = jnp.asarray(segment_ids_BT, jnp.int32)
  mesh = jax.sharding.get_abstract_mesh()
  axes = _row_axes(mesh)
  if not axes:
    return kernel(q_BTHK, k_BTHK, v_BTHK, segment_ids_BT)
  rows = P(axes)
  mapped = jax.shard_map(kernel, mesh=mesh, in_specs=(rows, rows, rows, rows), out_specs=rows,
                         check_vma=False)
  return mapped(q_BTHK, k_BTHK, v_BTHK, segment_ids_BT)
