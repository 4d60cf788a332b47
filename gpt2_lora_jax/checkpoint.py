"""All Orbax code in one place: save / restore the trainable state, never the frozen base.

A checkpoint in <workdir>/checkpoints/<step>/ holds two items:
  state: {'trainable': params that train, 'opt_state': optimizer state, 'step', 'rng'}
  meta:  JSON naming the base it needs (name and a content fingerprint), the LoRA layout
         (config and the path/shape of every trainable leaf) and the GPT-2 config.
Restoring checks `meta` against the run first and refuses another base or layout by name.
"""
from __future__ import annotations

import hashlib
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util


class CheckpointMismatchError(ValueError):
  """A checkpoint was written for another base model or another adapter layout."""


def base_fingerprint(frozen_params) -> str:
  """A content hash of the frozen base: every leaf's path, shape, dtype and a strided sample.

  Sampling (at most 65,536 values a leaf) keeps it to milliseconds for gpt2-xl while any real
  change of base (another checkpoint, another seed, another size) changes it.
  """
  h = hashlib.sha256()
  for path, leaf in sorted(traverse_util.flatten_dict(frozen_params, sep="/").items()):
    arr = np.asarray(jax.device_get(leaf)).astype(np.float32).ravel()
    stride = max(1, arr.size // 65536)
    h.update(f"{path}:{leaf.shape}:{leaf.dtype};".encode())
    h.update(np.ascontiguousarray(arr[::stride]).tobytes())
  return h.hexdigest()[:16]


def layout(trainable_params) -> dict:
  """'/'-joined path -> shape of every trainable leaf: the adapter layout a checkpoint belongs to."""
  return {p: list(np.shape(v)) for p, v in traverse_util.flatten_dict(trainable_params, sep="/").items()}


def manager(workdir: str, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
  directory = os.path.abspath(os.path.join(workdir, "checkpoints")) if "://" not in workdir \
      else workdir.rstrip("/") + "/checkpoints"
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))


def save(mngr: ocp.CheckpointManager, step: int, state: dict, meta: dict, force: bool = False) -> bool:
  """Writes `state` (a pytree of arrays) and `meta` (JSON) for `step`; async unless waited on."""
  return mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                 meta=ocp.args.JsonSave(meta)), force=force)


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
  return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def check_meta(saved: dict, expected: dict, where: str):
  """Refuses a checkpoint written for another base, GPT-2 config or adapter layout."""
  problems = []
  if saved.get("base_fingerprint") != expected["base_fingerprint"]:
    problems.append(f"it was trained on base {saved.get('base_name')!r} (fingerprint "
                    f"{saved.get('base_fingerprint')}), this run loads {expected['base_name']!r} "
                    f"(fingerprint {expected['base_fingerprint']})")
  if saved.get("gpt2_config") != expected["gpt2_config"]:
    problems.append(f"GPT-2 config differs: checkpoint {saved.get('gpt2_config')}, run {expected['gpt2_config']}")
  if saved.get("lora") != expected["lora"] or saved.get("layout") != expected["layout"]:
    mine, theirs = expected["layout"], saved.get("layout", {})
    diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    problems.append(f"LoRA layout differs: checkpoint lora={saved.get('lora')}, run lora={expected['lora']}"
                    + (f"; differing leaves: {', '.join(diff[:5])}" + (" ..." if len(diff) > 5 else "")
                       if diff else ""))
    stacked = lambda layout: any(k.startswith("h/") for k in layout)  # blocks stacked under 'h'
    if stacked(mine) != stacked(theirs):
      problems.append(f"the checkpoint holds {'stacked' if stacked(theirs) else 'per-layer'} blocks: set "
                      f"--config.model.scan_layers={stacked(theirs)} as when it was written")
  if problems:
    raise CheckpointMismatchError(
        f"checkpoint {where} does not belong to this run: " + "; ".join(problems) +
        ". Use a fresh --workdir, or the base model and LoRA settings the checkpoint was made with.")


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: dict, expected_meta: dict) -> dict:
  """Restores `state` for `step` into the shardings of `abstract_state` after checking its meta."""
  check_meta(read_meta(mngr, step), expected_meta, f"{mngr.directory}/{step}")
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
  return restored["state"]


def abstract_like(tree):
  """ShapeDtypeStructs (with shardings) for restoring into the same layout as `tree`."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
