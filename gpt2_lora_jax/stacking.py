"""Per-layer <-> stacked parameter trees, for GPT-2 run with model.scan_layers.

The per-layer tree (h_0 ... h_{L-1}) is the project's format everywhere a tree leaves the run:
Hugging Face import/export, PEFT adapters, LoRA targets and labels (patterns such as 'h_(0|1)/mlp'
see per-layer paths). A scanned model takes the blocks stacked under one key instead:

    h_3/attn/c_attn/kernel (D, 3D)   <->   h/attn/c_attn/kernel (L, D, 3D), row 3

`stack_layers` and `unstack_layers` convert at those boundaries. They work on any tree with that
key layout: arrays (numpy stays numpy), ShapeDtypeStructs, and label trees of strings (a stacked
leaf gets one label, so every layer must agree). Stacking needs every block to hold the same
leaves with the same shapes and labels; an error names the first difference.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

STACKED = "h"  # the stacked blocks' key; per layer they are h_0, h_1, ...
_LAYER = re.compile(r"h_(\d+)")


def is_stacked(tree: dict) -> bool:
  return STACKED in tree


def _layer_keys(tree: dict) -> list:
  keys = sorted((int(m.group(1)), k) for k in tree if (m := _LAYER.fullmatch(k)))
  if [i for i, _ in keys] != list(range(len(keys))):
    raise ValueError(f"blocks {[k for _, k in keys]} are not numbered 0 .. {len(keys) - 1}")
  return [k for _, k in keys]


def _stack(values: list, where: str):
  first = values[0]
  if isinstance(first, str):  # labels
    if len(set(values)) > 1:
      by_label = {}
      for i, v in enumerate(values):
        by_label.setdefault(v, []).append(i)
      raise ValueError(
          f"model.scan_layers stacks the blocks, so every block must label {where} alike; here it is "
          + ", ".join(f"{label!r} in h_{ids[0]}" + (f" (and {len(ids) - 1} more)" if len(ids) > 1 else "")
                      for label, ids in sorted(by_label.items())) +
          ". Use LoRA targets / extra_trainable patterns that select every block, or "
          "--config.model.scan_layers=False")
    return first
  shapes = {tuple(np.shape(v)) for v in values}
  if len(shapes) > 1:
    raise ValueError(f"model.scan_layers: {where} has different shapes across blocks: {sorted(shapes)}")
  if isinstance(first, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(values),) + tuple(first.shape), first.dtype)
  if isinstance(first, np.ndarray):
    return np.stack(values)
  return jnp.stack(values)


def stack_layers(tree: dict) -> dict:
  """{'h_0': t0, ..., 'h_{L-1}': t} -> {'h': leaves stacked on a new axis 0}; other keys unchanged.

  A tree that is already stacked (or has no blocks) comes back as it is.
  """
  keys = _layer_keys(tree)
  if not keys:
    return tree
  flats = [traverse_util.flatten_dict(tree[k], sep="/") for k in keys]
  for k, flat in zip(keys[1:], flats[1:]):
    if set(flat) != set(flats[0]):
      missing, extra = sorted(set(flats[0]) - set(flat)), sorted(set(flat) - set(flats[0]))
      raise ValueError(
          f"model.scan_layers stacks the blocks, so every block must hold the same leaves: {k} "
          + (f"lacks {missing[:3]} " if missing else "") + (f"has extra {extra[:3]} " if extra else "")
          + "compared with h_0 (LoRA targets that select some blocks only?). Target every block, or "
          "set --config.model.scan_layers=False")
  stacked = {path: _stack([flat[path] for flat in flats], f"{STACKED}/{path}") for path in flats[0]}
  out = {k: v for k, v in tree.items() if k not in keys}
  out[STACKED] = traverse_util.unflatten_dict(stacked, sep="/")
  return out


def unstack_layers(tree: dict) -> dict:
  """The inverse of stack_layers: {'h': (L, ...) leaves} -> {'h_0': ..., 'h_{L-1}': ...}.

  A per-layer tree comes back as it is.
  """
  if not is_stacked(tree):
    return tree
  flat = traverse_util.flatten_dict(tree[STACKED], sep="/")
  lengths = {np.shape(v)[0] for v in flat.values() if not isinstance(v, str)}
  if len(lengths) != 1:
    raise ValueError(f"stacked blocks disagree on the number of layers: {sorted(lengths)}")
  (n_layer,) = lengths

  def row(v, i):
    if isinstance(v, str):
      return v
    if isinstance(v, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(tuple(v.shape[1:]), v.dtype)
    return v[i]
  out = {k: v for k, v in tree.items() if k != STACKED}
  for i in range(n_layer):
    out[f"h_{i}"] = traverse_util.unflatten_dict({p: row(v, i) for p, v in flat.items()}, sep="/")
  return out
