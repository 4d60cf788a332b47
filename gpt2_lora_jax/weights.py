"""Hugging Face GPT-2 checkpoints <-> Flax parameters, with every key and shape checked.

Hugging Face's Conv1D stores weights as (in, out), the layout of a Flax kernel, so nothing is
transposed except an untied lm_head (an nn.Linear, stored (out, in)).
"""
from __future__ import annotations

import functools
import json
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from gpt2_lora_jax import hub
from gpt2_lora_jax import model as gpt2_model
from gpt2_lora_jax.model import GPT2Config, param_shapes
from gpt2_lora_jax.errors import MissingPackageError, UserError

# Buffers some checkpoints carry that are not parameters (causal-mask caches of old GPT-2 code).
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
_BLOCK_KEYS = {  # Hugging Face name inside block i -> path inside h_{i}
    "ln_1.weight": ("ln_1", "scale"), "ln_1.bias": ("ln_1", "bias"),
    "attn.c_attn.weight": ("attn", "c_attn", "kernel"), "attn.c_attn.bias": ("attn", "c_attn", "bias"),
    "attn.c_proj.weight": ("attn", "c_proj", "kernel"), "attn.c_proj.bias": ("attn", "c_proj", "bias"),
    "ln_2.weight": ("ln_2", "scale"), "ln_2.bias": ("ln_2", "bias"),
    "mlp.c_fc.weight": ("mlp", "c_fc", "kernel"), "mlp.c_fc.bias": ("mlp", "c_fc", "bias"),
    "mlp.c_proj.weight": ("mlp", "c_proj", "kernel"), "mlp.c_proj.bias": ("mlp", "c_proj", "bias"),
}
_TOP_KEYS = {
    "wte.weight": ("wte", "embedding"), "wpe.weight": ("wpe", "embedding"),
    "ln_f.weight": ("ln_f", "scale"), "ln_f.bias": ("ln_f", "bias"),
}


class CheckpointMismatchError(ValueError):
  """A checkpoint's tensors do not line up with the GPT-2 config it comes with."""


def hf_key_to_path(key: str) -> Optional[tuple]:
  """'transformer.h.3.mlp.c_fc.weight' (or without 'transformer.') -> ('h_3','mlp','c_fc','kernel')."""
  if key == "lm_head.weight":
    return ("lm_head", "kernel")
  key = key.removeprefix("transformer.")
  if key in _TOP_KEYS:
    return _TOP_KEYS[key]
  parts = key.split(".", 2)
  if len(parts) == 3 and parts[0] == "h" and parts[1].isdigit() and parts[2] in _BLOCK_KEYS:
    return (f"h_{parts[1]}",) + _BLOCK_KEYS[parts[2]]
  return None


def path_to_hf_key(path: tuple) -> str:
  if path == ("lm_head", "kernel"):
    return "lm_head.weight"
  for k, v in _TOP_KEYS.items():
    if v == path:
      return "transformer." + k
  layer = path[0].removeprefix("h_")
  for k, v in _BLOCK_KEYS.items():
    if v == tuple(path[1:]):
      return f"transformer.h.{layer}.{k}"
  raise KeyError(f"no Hugging Face name for parameter {'/'.join(path)}")


def hf_state_to_params(state: dict, config: GPT2Config, source: str = "checkpoint") -> dict:
  """Maps a Hugging Face state dict (name -> array) onto a Flax tree of host (numpy) arrays in
  config.param_dtype; one error lists every problem."""
  expected = traverse_util.flatten_dict(param_shapes(config))
  dtype = jnp.dtype(config.param_dtype)
  found, unexpected, misshaped = {}, [], []
  for key, value in state.items():
    if key.endswith(_IGNORED_SUFFIXES):
      continue
    if key == "lm_head.weight" and config.tie_word_embeddings:
      continue  # tied to wte: checked below, not loaded twice
    path = hf_key_to_path(key)
    if path is None or path not in expected:
      unexpected.append(key)
      continue
    value = np.asarray(value)
    if path == ("lm_head", "kernel"):
      value = value.T  # nn.Linear stores (out, in)
    if value.shape != expected[path].shape:
      misshaped.append(f"{key}: checkpoint {tuple(value.shape)}, config needs {expected[path].shape}")
      continue
    found[path] = value.astype(dtype)  # host memory: train.init_state places it, sharded
  missing = [path_to_hf_key(p) for p in expected if p not in found]
  problems = []
  if missing:
    problems.append("missing tensors: " + ", ".join(sorted(missing)))
  if unexpected:
    problems.append("unexpected tensors: " + ", ".join(sorted(unexpected)))
  if misshaped:
    problems.append("wrong shapes: " + "; ".join(sorted(misshaped)))
  if problems:
    raise CheckpointMismatchError(
        f"{source} does not match its GPT-2 config (n_layer={config.n_layer}, n_embd={config.n_embd}, "
        f"vocab_size={config.vocab_size}):\n  " + "\n  ".join(problems))
  if config.tie_word_embeddings and "lm_head.weight" in state:
    if not np.array_equal(np.asarray(state["lm_head.weight"]), np.asarray(found[("wte", "embedding")])):
      raise CheckpointMismatchError(
          f"{source}: config says tie_word_embeddings=True but lm_head.weight differs from wte.weight")
  return traverse_util.unflatten_dict(found)


def _read_state(model_dir: str) -> dict:
  st = os.path.join(model_dir, "model.safetensors")
  if os.path.exists(st):
    from safetensors import safe_open
    with safe_open(st, framework="flax") as f:  # the flax reader keeps bf16 tensors intact
      return {k: np.asarray(f.get_tensor(k).astype(jnp.float32)) for k in f.keys()}
  if os.path.exists(os.path.join(model_dir, "model.safetensors.index.json")):
    raise FileNotFoundError(f"{model_dir}: sharded safetensors checkpoints are not supported; "
                            "save the model again with a larger max_shard_size")
  binary = os.path.join(model_dir, "pytorch_model.bin")
  if os.path.exists(binary):
    try:
      import torch
    except ImportError as e:
      raise MissingPackageError(f"{binary} is a PyTorch checkpoint: install torch (pip install "
                        "'gpt2-lora-jax[eval]') or convert it to model.safetensors") from e
    state = torch.load(binary, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() for k, v in state.items()}
  raise FileNotFoundError(f"{model_dir} holds neither model.safetensors nor pytorch_model.bin")


def load_pretrained(name_or_path: str, dtype="float32", compute_dtype=None, **config_overrides):
  """A Hugging Face GPT-2 from a hub id ('gpt2', 'openai-community/gpt2-xl') or a local dir.

  dtype: the dtype the parameters are stored in (e.g. 'bfloat16' for a frozen base on GPU).
  compute_dtype: GPT2Config.dtype, the dtype of activations and matmuls (default float32).
  config_overrides: other run-time fields of GPT2Config (attention_impl, remat).
  Returns (GPT2Config, params), params as host numpy arrays: no device holds a copy until they are
  placed (train.init_state shards them over the mesh; jax.device_put for one device).
  """
  model_dir = hub.resolve(name_or_path, ["config.json", "model.safetensors"],
                          what="GPT-2 model", flag="--config.model.name")
  with open(os.path.join(model_dir, "config.json")) as f:
    hf_config = json.load(f)
  if hf_config.get("model_type", "gpt2") != "gpt2":
    raise UserError(f"{model_dir}/config.json is a {hf_config.get('model_type')!r} model, not GPT-2")
  if compute_dtype is not None:
    config_overrides["dtype"] = jnp.dtype(compute_dtype).name
  config = GPT2Config.from_hf_dict(hf_config, param_dtype=jnp.dtype(dtype).name, **config_overrides)
  params = hf_state_to_params(_read_state(model_dir), config, source=model_dir)
  return config, params


# Standard deviations of GPT2's normal initialisers (model.py; Hugging Face's, but for the c_proj
# rescaling): every matmul kernel and the token embedding 0.02, the position embedding 0.01.
def random_params(config: GPT2Config, seed: int) -> dict:
  """Random GPT-2 parameters of `config`'s shapes and dtype, distributed as model.init_params draws
  them (init_rule: normal kernels and embeddings, zero biases, unit layer-norm scales), as the
  per-layer tree of host (numpy) arrays, drawn by one compiled program (one per config and process).

  Each block leaf is drawn for every layer at once, (L, ...) (draw_params on the stacked
  tree), so the program holds a few dozen draws at any depth; init_params instead runs a forward
  pass eagerly, op by op (78 small compiles at gpt2-medium), and draws per leaf and layer. The
  values differ from init_params' for the same seed; their distributions are the same."""
  from gpt2_lora_jax import stacking
  return stacking.unstack_layers(jax.device_get(_draw_random(jax.random.PRNGKey(seed), config)))


@functools.partial(jax.jit, static_argnums=1)
def _draw_random(key, config: GPT2Config) -> dict:
  """The stacked tree (blocks under 'h' as (L, ...) leaves) drawn by draw_params."""
  from gpt2_lora_jax import stacking
  shapes = stacking.stack_layers(param_shapes(config))
  return draw_params(shapes, lambda path, _: init_rule(path), key)


def init_rule(path: tuple) -> tuple:
  """How GPT2.init draws the parameter at `path` (a key path of a per-layer or stacked tree):
  ('normal', std), ('zeros', None) or ('ones', None). tests/test_model.py checks it against
  model.init_params leaf by leaf."""
  if path[0] == "wpe":
    return ("normal", gpt2_model.WPE_INIT_STD)
  if path[-1] in ("kernel", "embedding"):
    return ("normal", gpt2_model.INIT_STD)
  if path[-1] == "scale":  # layer norms
    return ("ones", None)
  if path[-1] == "bias":  # linears and layer norms
    return ("zeros", None)
  raise ValueError(f"no init rule for parameter {'/'.join(path)}")


def draw_params(shapes: dict, rule, rng) -> dict:
  """A tree of arrays shaped like `shapes` (ShapeDtypeStructs): the leaf at path p drawn as
  rule(p, shape) says, ('normal', std), ('uniform', bound) for U(-bound, bound), ('zeros', None) or
  ('ones', None); random draws in float32, then cast to the leaf's dtype. One draw per leaf, so
  under jit a stacked tree (blocks as (L, ...) leaves, stacking.py) is a program of a few dozen
  draws whatever the depth, where init_params (flax's init, a draw per parameter of each of the L
  blocks) grows with it: the gpt2-xl benchmark's jitted init_params + adapters did not finish
  compiling in 60 s on an H200 (benchmarks/README.md). The values differ from init_params'; their
  distributions are the same (tests/test_bench.py)."""
  flat = sorted(traverse_util.flatten_dict(shapes).items())
  out = {}
  for key, (path, leaf) in zip(jax.random.split(rng, len(flat)), flat):
    kind, scale = rule(path, leaf)
    if kind == "normal":
      value = jax.random.normal(key, leaf.shape, jnp.float32) * scale
    elif kind == "uniform":
      value = jax.random.uniform(key, leaf.shape, jnp.float32, -scale, scale)
    elif kind in ("zeros", "ones"):
      value = (jnp.zeros if kind == "zeros" else jnp.ones)(leaf.shape, jnp.float32)
    else:
      raise ValueError(f"init rule {kind!r} for {'/'.join(path)}: 'normal', 'uniform', 'zeros' or 'ones'")
    out[path] = value.astype(leaf.dtype)
  return traverse_util.unflatten_dict(out)


def save_pretrained(params: dict, config: GPT2Config, out_dir: str) -> str:
  """Writes config.json + model.safetensors that transformers.GPT2LMHeadModel.from_pretrained loads.

  Stacked blocks (model.scan_layers, see stacking.py) are written per layer, as Hugging Face names them.
  """
  from gpt2_lora_jax import stacking
  flat = traverse_util.flatten_dict(stacking.unstack_layers(params))
  adapters = [p for p in flat if p[-1].startswith("lora_")]
  if adapters:
    raise ValueError("params still hold LoRA adapters (e.g. " + "/".join(adapters[0]) + "): "
                     "merge them first with gpt2_lora_jax.lora.merge(params, lora_config, gpt2_config)")
  expected = traverse_util.flatten_dict(param_shapes(config))
  if set(flat) != set(expected):
    missing = sorted("/".join(p) for p in set(expected) - set(flat))
    extra = sorted("/".join(p) for p in set(flat) - set(expected))
    raise CheckpointMismatchError(f"params do not match the config: missing {missing}, extra {extra}")
  from safetensors.numpy import save_file
  tensors = {}
  for path, value in flat.items():
    value = np.asarray(jax.device_get(value), np.float32)
    if path == ("lm_head", "kernel"):
      value = value.T
    tensors[path_to_hf_key(path)] = np.ascontiguousarray(value)
  os.makedirs(out_dir, exist_ok=True)
  save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config.to_hf_dict(), f, indent=2)
  return out_dir
