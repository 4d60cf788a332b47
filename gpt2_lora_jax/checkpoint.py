"""All Orbax code in one place: save / restore the trainable state, never the frozen base.

A checkpoint in <workdir>/checkpoints/<step>/ holds two items:
  state: {'trainable': params that train, 'opt_state': optimizer state, 'step', 'rng'}
  meta:  JSON naming the base it needs (name and a content fingerprint), the LoRA layout
         (config and the path/shape of every trainable leaf), the GPT-2 config, and the settings
         that shape the training trajectory (experiment.run_settings: optimizer, schedule, steps,
         batch size, seed, data).
Restoring checks `meta` against the run first and refuses another base or layout by name; resuming
training also refuses changed run settings, unless the run accepts them deliberately.
"""
from __future__ import annotations

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util
from gpt2_lora_jax.errors import UserError


# 2: base fingerprints independent of the storage dtype, and run settings recorded.
META_VERSION = 2
ALLOW_FLAG = "--config.train.allow_changed_config=True"


class CheckpointMismatchError(UserError):
  """A checkpoint was written for another base model, adapter layout or run."""


def base_fingerprint(frozen_params) -> str:
  """A content hash of the frozen base: every leaf's path, shape and a strided sample of values.

  Sampling (at most 65,536 values a leaf) keeps it to milliseconds for gpt2-xl while any real
  change of base (another checkpoint, another seed, another size) changes it. The samples are
  rounded to bfloat16 and the dtype is left out, so a float32 and a bfloat16 copy of the same base
  (model.base_param_dtype) are the same base: a run trained on one may be evaluated on the other.
  """
  h = hashlib.sha256()
  for path, leaf in sorted(traverse_util.flatten_dict(frozen_params, sep="/").items()):
    flat = np.asarray(jax.device_get(leaf)).reshape(-1)
    sample = flat[::max(1, flat.size // 65536)].astype(np.float32).astype(jnp.bfloat16)
    h.update(f"{path}:{tuple(leaf.shape)};".encode())
    h.update(np.ascontiguousarray(sample).tobytes())
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


def check_meta(saved: dict, expected: dict, where: str) -> list[str]:
  """Refuses a checkpoint written for another base, GPT-2 config or adapter layout; returns notes
  on what could not be checked."""
  problems, notes = [], []
  if saved.get("meta_version", 1) < 2:  # its fingerprint hashed the storage dtype: compare names
    notes.append(f"checkpoint {where} predates dtype-independent base fingerprints: its base is "
                 f"checked by name ({saved.get('base_name')!r}), GPT-2 config and layout, not by content")
    if saved.get("base_name") != expected["base_name"]:
      problems.append(f"it was trained on base {saved.get('base_name')!r}, this run loads "
                      f"{expected['base_name']!r}")
  elif saved.get("base_fingerprint") != expected["base_fingerprint"]:
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
  return notes


def check_run(saved: dict, expected: dict, where: str, allow_changed: bool) -> list[str]:
  """Refuses to resume a checkpoint whose run settings (meta['run']) differ from this run's, with
  one error naming every change (old -> new) and the flag that accepts them; with allow_changed,
  returns them as notes instead."""
  old, new = saved.get("run"), expected["run"]
  if old is None:
    what = (f"checkpoint {where} records no run settings (it predates them), so resuming cannot check "
            "that this run has its optimizer, schedule, steps, batch size, seed and data")
    if not allow_changed:
      raise CheckpointMismatchError(f"{what}. Pass {ALLOW_FLAG} to resume it with this run's settings, "
                                    "or use a fresh --workdir.")
    return [f"{what}; resuming with this run's settings (train.allow_changed_config)"]
  show = lambda d, k: json.dumps(d[k]) if k in d else "(not recorded)"
  changed = [f"{k}: {show(old, k)} -> {show(new, k)}" for k in sorted(set(old) | set(new))
             if old.get(k, KeyError) != new.get(k, KeyError)]
  if not changed:
    return []
  if not allow_changed:
    raise CheckpointMismatchError(
        f"checkpoint {where} was trained with other settings: " + "; ".join(changed) + ". Resuming "
        "would change its learning-rate curve, updates or data stream. Rerun with its settings, use a "
        f"fresh --workdir, or pass {ALLOW_FLAG} to continue with the new ones (e.g. more train.steps).")
  return [f"resuming {where} with changed settings (train.allow_changed_config): " + "; ".join(changed)]


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: dict, expected_meta: dict,
            allow_changed_run: bool | None = None, log=print) -> dict:
  """Restores `state` for `step` into the shardings of `abstract_state` after checking its meta.

  allow_changed_run: None checks only base and layout (evaluation); False also refuses changed run
  settings (resuming training); True accepts them with a note. Notes go to `log` (None: dropped,
  for processes other than the first).
  """
  where = f"{mngr.directory}/{step}"
  saved = read_meta(mngr, step)
  notes = check_meta(saved, expected_meta, where)
  if allow_changed_run is not None:
    notes += check_run(saved, expected_meta, where, allow_changed_run)
  for note in notes if log else ():
    log(note)
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
  return restored["state"]


def checkpoints_dir(path: str) -> tuple[str, int | None]:
  """(absolute checkpoints/ directory, step or None) that `path` names: a run's workdir, its
  checkpoints/ directory, or one step's directory (checkpoints/<step>)."""
  path = path.rstrip("/")
  step = None
  if os.path.basename(path).isdigit() and os.path.isdir(os.path.join(path, "state")):
    path, step = os.path.dirname(path), int(os.path.basename(path))
  elif os.path.isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  return os.path.abspath(path), step


def read_trainable(path: str, step: int | None = None) -> tuple[dict, dict, str, int]:
  """(trainable leaves as saved, meta, where, step) of a checkpoint under `path` (checkpoints_dir):
  `step`, else the step `path` names, else the latest.

  Leaves come back as jax.Arrays in the sharding they were saved with when this process's devices
  can hold it (a multi-process fsdp run's leaves then span processes: fetch them with
  sharding.fetch_to_host), else replicated over this process's devices.
  """
  directory, named_step = checkpoints_dir(path)
  mngr = ocp.CheckpointManager(directory, item_names=("state", "meta"))
  step = step if step is not None else named_step if named_step is not None else mngr.latest_step()
  if step is None or step not in mngr.all_steps():
    raise FileNotFoundError(f"{path!r} holds no checkpoint" + (f" for step {step} (it holds "
                            f"{sorted(mngr.all_steps())})" if step is not None else "") +
                            " (expected a run's workdir, its checkpoints/ directory or checkpoints/<step>)")
  meta = read_meta(mngr, step)
  replicated = jax.sharding.NamedSharding(jax.sharding.Mesh(np.asarray(jax.devices()), ("all",)),
                                          jax.sharding.PartitionSpec())
  state = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(fallback_sharding=replicated)))["state"]
  return state["trainable"], meta, f"{mngr.directory}/{step}", step


def latest_meta(workdir: str) -> tuple[int, dict] | None:
  """(step, meta) of the latest checkpoint in workdir, or None when it holds none."""
  if "://" not in workdir and not os.path.isdir(os.path.join(workdir, "checkpoints")):
    return None
  mngr = manager(workdir)
  step = mngr.latest_step()
  return None if step is None else (step, read_meta(mngr, step))


def tree_fingerprint(tree) -> str:
  """An exact content hash of a small tree (adapters): every leaf's path, shape and fp32 values."""
  h = hashlib.sha256()
  for path, leaf in sorted(traverse_util.flatten_dict(tree, sep="/").items()):
    values = np.ascontiguousarray(np.asarray(leaf, np.float32))
    h.update(f"{path}:{values.shape};".encode())
    h.update(values.tobytes())
  return h.hexdigest()[:16]


def abstract_like(tree):
  """ShapeDtypeStructs (with shardings) for restoring into the same layout as `tree`."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
