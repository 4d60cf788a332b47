"""Device mesh, shardings and multi-host plumbing, all in one place.

The mesh has two named axes: 'data' (batch rows are split across it) and 'fsdp' (parameters
are split across it, and batch rows too, so every device holds a different slice of the batch).
Rules on parameter paths say which dimension of each parameter is split along 'fsdp';
`param_specs` asserts every leaf is covered by exactly one rule. The optimizer state takes the
shardings of the parameters it belongs to (`opt_state_shardings`).

Multi-host: `maybe_initialize_distributed` starts jax.distributed when several processes run;
every process then builds the same mesh over all devices (jax.devices() lists them process by
process, so a mesh row, the 'fsdp' group, stays inside one host when fsdp <= local devices), loads
only its own rows of each global batch (`global_batch`), and `fetch_to_host` / `barrier` are the
two collective helpers the rest of the package needs.

The per-device memory XLA plans for one train step of each GPT-2 size (BUILD.md's table) is
printed by `python -m gpt2_lora_jax.bench.step_plan --memory_table`.
"""
from __future__ import annotations

import functools
import os
import re

import jax
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from gpt2_lora_jax.errors import UserError

BATCH_AXES = ("data", "fsdp")

# (regex on the '/'-joined parameter path, dimensions that may be split along 'fsdp', in order of
# preference; () = replicate). The first listed dimension that 'fsdp' divides is split. Widths
# (768, 1024, 1280, 1600 and 4x those) divide by every power of two up to 64; the vocabulary
# (50257 = 29 x 1733) divides by nothing useful, so leaves with a vocabulary side split their
# other side: wte (V, D) by D, the head adapter lm_head/lora_b (r, V) by r. Stacked blocks
# (h/..., model.scan_layers) follow the same rules on their per-layer dimensions.
PARAM_RULES = (
    (r".*/lora_a$", (0,)),  # (in, r): in is D or 4D
    (r".*/lora_b$", (1, 0)),  # (r, out): out, or r when out is the vocabulary (lm_head)
    (r"^wte/embedding$", (1,)),  # (V, D)
    (r"^wpe/embedding$", (0,)),  # (n_positions, D)
    (r".*/kernel$", (0,)),  # (in, out) of every linear, and an untied lm_head/kernel (D, V)
    (r".*/(bias|scale)$", ()),  # 1-D and small: replicated
)
# A leaf this large that 'fsdp' cannot split is an error, not a silent full copy on every device.
MAX_REPLICATED_ELEMENTS = 1 << 20


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
    raise UserError(f"mesh.fsdp={fsdp} must divide the {n} devices; set --config.mesh.fsdp to a "
                     f"divisor of {n}")
  if data == -1:
    data = n // fsdp
  if data * fsdp != n:
    raise UserError(f"mesh.data={data} x mesh.fsdp={fsdp} = {data * fsdp}, but there are {n} devices; "
                     "set mesh.data=-1 to use all of them")
  return Mesh(np.asarray(devices).reshape(data, fsdp), BATCH_AXES)


def rule_for(path: str) -> tuple:
  """The split dimensions of the one rule in PARAM_RULES that covers `path` (an error otherwise)."""
  hits = [dims for pattern, dims in PARAM_RULES if re.fullmatch(pattern, path)]
  if len(hits) != 1:
    raise ValueError(f"parameter {path} is matched by {len(hits)} sharding rules, needs exactly one; "
                     "add or narrow a rule in sharding.PARAM_RULES")
  return hits[0]


def param_specs(params, mesh: Mesh) -> dict:
  """PartitionSpec per leaf by PARAM_RULES (params may be arrays or ShapeDtypeStructs)."""
  fsdp = mesh.shape["fsdp"]
  specs = {}
  for path, leaf in traverse_util.flatten_dict(params, sep="/").items():
    shape = np.shape(leaf)
    # Stacked blocks (model.scan_layers) carry a leading layer axis: never split (the scan slices
    # it), the rule's dimensions shift by one.
    layer_axis = int(path.startswith("h/"))
    dims = [d + layer_axis for d in rule_for(path) if d + layer_axis < len(shape)]
    split = next((d for d in dims if shape[d] % fsdp == 0), None)
    if fsdp == 1 or not dims:
      specs[path] = P()
    elif split is None:
      if np.prod(shape) > MAX_REPLICATED_ELEMENTS:
        raise UserError(f"mesh.fsdp={fsdp} divides no splittable dimension of {path} {shape} "
                         f"(dimensions {dims}); choose an fsdp that divides {[shape[d] for d in dims]}")
      specs[path] = P()  # small (e.g. a LoRA leaf of odd rank): a copy per device costs little
    else:
      specs[path] = P(*([None] * split + ["fsdp"]))
  return traverse_util.unflatten_dict(specs, sep="/")


def param_shardings(params, mesh: Mesh):
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs(params, mesh),
                      is_leaf=lambda x: isinstance(x, P))


def opt_state_shardings(tx: optax.GradientTransformation, params, param_sh, mesh: Mesh):
  """Shardings of tx.init(params): each moment as its parameter, scalars (Adam's count) replicated."""
  abstract_opt = jax.eval_shape(tx.init, params)
  masked = lambda x: isinstance(x, optax.MaskedNode)  # frozen leaves: no state, nothing to place
  return optax.tree_map_params(tx, lambda p, s: p if masked(p) else s, abstract_opt, param_sh,
                               transform_non_params=lambda _: replicated(mesh), is_leaf=masked)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows of a (B, T) batch split over every device ('data' and 'fsdp' together)."""
  return NamedSharding(mesh, P(BATCH_AXES))


def traced_on(mesh: Mesh, fn):
  """fn, traced with `mesh` as the abstract mesh in context: kernels that XLA's partitioner cannot
  split (flash.py's Pallas attention) read it to map themselves over the rows of each device."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)
  return wrapped


def check_batch_divides(batch_size: int, micro_batches: int, mesh: Mesh):
  devices = mesh.size
  if batch_size % micro_batches:
    raise UserError(f"train.batch_size={batch_size} is not divisible by train.micro_batches={micro_batches}")
  if (batch_size // micro_batches) % devices:
    raise UserError(f"each micro-batch has {batch_size // micro_batches} rows, not divisible by the "
                     f"{devices} devices of the mesh; change train.batch_size or train.micro_batches")


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """This process's rows of the global batch -> global jax.Arrays sharded along the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def put(tree, shardings):
  """Places full arrays on the mesh (every process passes the same full values).

  Arrays already on this process's devices move device to device (always a copy: the train step
  donates what it is given, and the caller's arrays must survive); host arrays are cut into the
  shards this process owns (what several processes need, since no one device holds everything).
  """
  leaves, treedef = jax.tree.flatten(tree)
  targets = treedef.flatten_up_to(shardings)
  on_device = [i for i, x in enumerate(leaves)
               if isinstance(x, jax.Array) and x.is_fully_addressable and jax.process_count() == 1]
  placed = list(leaves)
  if on_device:
    # One jitted identity for all of them writes fresh buffers (device_put(may_alias=False) still
    # shares the source device's buffer when the target replicates over several devices, jax
    # 0.10); one program, not one per leaf (each a compile: a thousand for unscanned gpt2-xl).
    copies = jax.jit(lambda xs: xs, out_shardings=[targets[i] for i in on_device])(
        [leaves[i] for i in on_device])
    for i, copy in zip(on_device, copies):
      placed[i] = copy
  for i in sorted(set(range(len(leaves))) - set(on_device)):
    host = np.asarray(leaves[i])
    placed[i] = jax.make_array_from_callback(host.shape, targets[i], lambda idx, host=host: host[idx])
  return jax.tree.unflatten(treedef, placed)


def fetch_to_host(tree):
  """Full numpy values of every leaf on every process (an all-gather where a leaf spans hosts)."""
  from jax.experimental import multihost_utils

  def fetch(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
  return jax.tree.map(fetch, tree)


def barrier(name: str):
  """Every process waits here until all arrive (no-op in a single process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
