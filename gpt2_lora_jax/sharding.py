"""Device mesh, shardings and multi-host plumbing, all in one place.

The mesh has two named axes: 'data' (batch rows are split across it) and 'fsdp' (parameters
are split across it, and batch rows too, so every device holds a different slice of the batch).
Rules on parameter paths say which dimension of each parameter is split along 'fsdp';
`param_specs` asserts every leaf is covered by exactly one rule.
"""
from __future__ import annotations

import os
import re

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")

# (regex on the '/'-joined parameter path, the dimension to split along 'fsdp'; None = replicate).
# The largest dimension that every GPT-2 size divides evenly is chosen: kernels split their
# input side (rows), embeddings their vocabulary/position rows. Adapters: A (in, r) by rows,
# B (r, out) by columns; 1-D leaves (biases, layer norms) are small and replicated.
PARAM_RULES = (
    (r".*/lora_a$", 0),
    (r".*/lora_b$", 1),
    (r"^(wte|wpe)/embedding$", 0),
    (r".*/kernel$", 0),
    (r".*/(bias|scale)$", None),
)


def maybe_initialize_distributed(coordinator: str = "", num_processes: int = 0, process_id: int = -1):
  """jax.distributed.initialize() when this is one of several processes.

  Explicit flags win; otherwise JAX auto-detects Cloud TPU pods and SLURM jobs (SLURM_NTASKS > 1).
  On CPU, collectives across processes go through gloo.
  """
  explicit = bool(coordinator) and num_processes > 1
  on_tpu_pod = "TPU_WORKER_HOSTNAMES" in os.environ and "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
  on_slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
  if not (explicit or on_tpu_pod or on_slurm):
    return False
  if jax.config.jax_platforms in (None, "", "cpu") and not on_tpu_pod:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if explicit:
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
  else:
    jax.distributed.initialize()
  return True


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
  """A ('data', 'fsdp') mesh over all devices (or `devices`); -1 on 'data' takes what is left."""
  devices = jax.devices() if devices is None else devices
  n = len(devices)
  if fsdp < 1 or n % fsdp:
    raise ValueError(f"mesh.fsdp={fsdp} must divide the {n} devices")
  if data == -1:
    data = n // fsdp
  if data * fsdp != n:
    raise ValueError(f"mesh.data={data} x mesh.fsdp={fsdp} = {data * fsdp}, but there are {n} devices; "
                     "set mesh.data=-1 to use all of them")
  return Mesh(np.asarray(devices).reshape(data, fsdp), BATCH_AXES)


def param_specs(params, mesh: Mesh) -> dict:
  """PartitionSpec per leaf by PARAM_RULES; a dimension that 'fsdp' does not divide is replicated."""
  fsdp = mesh.shape["fsdp"]
  flat = traverse_util.flatten_dict(params, sep="/")
  specs = {}
  for path, leaf in flat.items():
    hits = [dim for pattern, dim in PARAM_RULES if re.fullmatch(pattern, path)]
    if len(hits) != 1:
      raise ValueError(f"parameter {path} is matched by {len(hits)} sharding rules, needs exactly one")
    dim = hits[0]
    shape = np.shape(leaf)
    if dim is None or fsdp == 1 or dim >= len(shape) or shape[dim] % fsdp:
      specs[path] = P()
    else:
      specs[path] = P(*([None] * dim + ["fsdp"]))
  return traverse_util.unflatten_dict(specs, sep="/")


def param_shardings(params, mesh: Mesh):
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs(params, mesh),
                      is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows of a (B, T) batch split over every device ('data' and 'fsdp' together)."""
  return NamedSharding(mesh, P(BATCH_AXES))


def check_batch_divides(batch_size: int, micro_batches: int, mesh: Mesh):
  devices = mesh.size
  if batch_size % micro_batches:
    raise ValueError(f"train.batch_size={batch_size} is not divisible by train.micro_batches={micro_batches}")
  if (batch_size // micro_batches) % devices:
    raise ValueError(f"each micro-batch has {batch_size // micro_batches} rows, not divisible by the "
                     f"{devices} devices of the mesh; change train.batch_size or train.micro_batches")


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """This process's rows of the global batch -> global jax.Arrays sharded along the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def put(tree, shardings):
  """Places host arrays on the mesh (every process passes the same full values)."""
  return jax.tree.map(lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx]),
                      tree, shardings)
