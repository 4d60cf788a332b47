"""LoRA as a parameter-tree transform: plain functions on GPT-2's parameter dict, no wrapper classes.

    add(params, cfg, rng)       puts lora_a (in, r) and lora_b (r, out) (fp32, B = 0) next to each targeted
                                kernel; no base path changes, so a pretrained checkpoint loads as-is
    labels(params, cfg)         'trainable' / 'frozen' per leaf, for optim.make_optimizer
    split / combine             trainable and frozen halves of the tree and back
    merge(params, cfg, config)  a plain GPT-2 tree (kernel + s A B, in fp32) for weights.save_pretrained
    save_peft / load_peft       Hugging Face PEFT's adapter_config.json + adapter_model.safetensors
    summary(params, labels)     PEFT's "trainable params: N || all params: M || trainable%: P" line

model.py applies the adapters factored, y = x W + s (x A) B, so W + s A B never exists in a train step.

Module paths are the tree's paths joined by '/': 'h_3/attn/c_attn', 'h_3/mlp/c_proj', 'lm_head'. A target
pattern selects a module when it fully matches a tail of whole segments of its path, so PEFT's short
names work ('c_attn', 'c_proj' (attention output and MLP output), 'c_fc', 'lm_head') and so do regexes
('attn/c_proj', 'h_(0|1)/mlp/.*'). An `extra_trainable` pattern selects a leaf when it fully matches any
run of whole segments of the leaf's path ('ln_f', 'ln_.*', '.*bias', 'h_0/attn').

The lm_head adapter: GPT-2's head is tied to the token embedding, so the tree has no lm_head kernel;
the adapter lives at lm_head/lora_a (D, r), lm_head/lora_b (r, V) and the head stays tied, as in PEFT.
Merging it unties the head: merge returns (params, config) with tie_word_embeddings=False and
lm_head/kernel (D, V) = wte^T + s A B, because the merged head can no longer equal the embedding.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from gpt2_lora_jax import model as gpt2_model
from gpt2_lora_jax import stacking, weights
from gpt2_lora_jax.errors import UserError

INITS = ("kaiming_uniform", "gaussian")
ADAPTER_LEAVES = ("lora_a", "lora_b")
PEFT_PREFIX = "base_model.model."
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"


def _as_tuple(value) -> tuple:
  """A tuple of strings from a tuple, list, or a comma-separated string (as a flag override gives)."""
  if isinstance(value, str):
    return tuple(s.strip() for s in value.split(",") if s.strip())
  return tuple(value)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  rank: int = 8  # r; 0 turns LoRA off and trains every parameter (full fine-tuning)
  alpha: float = 16.0  # scale = alpha / r (alpha / sqrt(r) with use_rslora)
  dropout: float = 0.0  # dropout on the adapter's input only
  targets: tuple = ("c_attn", "c_proj", "c_fc")  # module-path patterns (see the module docstring)
  use_rslora: bool = False
  init: str = "kaiming_uniform"  # init of A: PEFT / loralib's kaiming_uniform(a=sqrt(5)) or N(0, 1/r)
  extra_trainable: tuple = ()  # leaf-path patterns trained besides the adapters (biases, layer norms)

  def __post_init__(self):
    object.__setattr__(self, "targets", _as_tuple(self.targets))
    object.__setattr__(self, "extra_trainable", _as_tuple(self.extra_trainable))
    if not isinstance(self.rank, (int, np.integer)) or self.rank < 0:
      raise UserError(f"LoRA rank={self.rank!r}: must be an integer >= 0 (0 = full fine-tuning)")
    if self.rank > 0 and not self.alpha > 0:
      raise UserError(f"LoRA alpha={self.alpha!r}: must be > 0")
    if not 0.0 <= self.dropout < 1.0:
      raise UserError(f"LoRA dropout={self.dropout!r}: must be in [0, 1)")
    if self.init not in INITS:
      raise UserError(f"LoRA init={self.init!r}: choose one of {INITS}")
    if self.rank > 0 and not self.targets:
      raise UserError("LoRA targets are empty: name modules such as ('c_attn', 'c_proj', 'c_fc')")
    for pattern in self.targets + self.extra_trainable:
      try:
        re.compile(pattern)
      except re.error as e:
        raise UserError(f"LoRA pattern {pattern!r} is not a valid regex: {e}") from e

  @classmethod
  def from_config(cls, section) -> "LoraConfig":
    """From the `lora` section of config.default_config() (an ml_collections.ConfigDict)."""
    return cls(rank=int(section.rank), alpha=float(section.alpha), dropout=float(section.dropout),
               targets=_as_tuple(section.targets), use_rslora=bool(section.use_rslora),
               init=str(section.init), extra_trainable=_as_tuple(section.extra_trainable))


def scale(cfg: LoraConfig) -> float:
  """s in y = x W + s (x A) B: alpha / r, or alpha / sqrt(r) with rsLoRA. 0.0 for rank 0 (no adapters)."""
  if cfg.rank == 0:
    return 0.0
  return cfg.alpha / (math.sqrt(cfg.rank) if cfg.use_rslora else cfg.rank)


def make_model(gpt2_config: gpt2_model.GPT2Config, lora_cfg: LoraConfig) -> gpt2_model.GPT2:
  """The GPT-2 module that applies the adapters of a tree made by `add` (plain GPT2 for rank 0)."""
  if lora_cfg.rank == 0:
    return gpt2_model.GPT2(gpt2_config)
  return gpt2_model.GPT2(gpt2_config, lora_scale=scale(lora_cfg), lora_dropout=lora_cfg.dropout)


# --- paths and patterns ------------------------------------------------------------------------------
def _join(path: tuple) -> str:
  return "/".join(path)


def _selects_module(pattern: str, module_path: str) -> bool:
  return re.fullmatch(rf"(?:.*/)?(?:{pattern})", module_path) is not None


def _selects_leaf(pattern: str, leaf_path: str) -> bool:
  return re.fullmatch(rf"(?:.*/)?(?:{pattern})(?:/.*)?", leaf_path) is not None


def _module_shapes(flat: dict) -> dict:
  """Module path -> (in, out) of every module that can carry an adapter: each kernel, and lm_head."""
  shapes = {p[:-1]: tuple(v.shape) for p, v in flat.items() if p[-1] == "kernel"}
  vocab, width = flat[("wte", "embedding")].shape
  shapes[("lm_head",)] = (width, vocab)  # tied head: no kernel leaf, same shape as an untied one
  return shapes


def _describe_modules(module_paths) -> str:
  """Block 0's modules plus the rest, so a 48-layer model gives a readable message."""
  names = sorted(_join(p) for p in module_paths)
  layers = sorted({int(p[0][2:]) for p in module_paths if re.fullmatch(r"h_\d+", p[0])})
  shown = [n for n in names if not re.match(r"h_\d+/", n) or n.startswith("h_0/")]
  if len(layers) < 2:
    return ", ".join(shown)
  return ", ".join(shown) + f" (and the same in h_1{f' .. h_{layers[-1]}' if len(layers) > 2 else ''})"


def _adapter_modules(flat: dict) -> list:
  return sorted({p[:-1] for p in flat if p[-1] in ADAPTER_LEAVES})


def target_modules(params: dict, cfg: LoraConfig) -> list:
  """Module paths (tuples) the targets select; an error names a pattern that selects nothing."""
  candidates = _module_shapes(traverse_util.flatten_dict(params))
  selected = set()
  for pattern in cfg.targets:
    hits = {p for p in candidates if _selects_module(pattern, _join(p))}
    if not hits:
      raise UserError(f"LoRA target {pattern!r} matches no module; module paths here: "
                       f"{_describe_modules(candidates)}")
    selected |= hits
  return sorted(selected)


def _compress_targets(adapted: Sequence[tuple], candidates, name=_join) -> list:
  """Short names (PEFT style) when they select exactly the adapted modules, else every full path."""
  short = {p[-1] for p in adapted}
  if {p for p in candidates if p[-1] in short} == set(adapted):
    return sorted(short)
  return sorted(name(p) for p in adapted)


# --- add / labels / split / combine / merge -------------------------------------------------------------
def add(params: dict, cfg: LoraConfig, rng) -> dict:
  """The tree with lora_a (in, r) and lora_b (r, out) (fp32, B = 0) next to every targeted module.

  Base parameter paths are unchanged; rank 0 returns params as they are (full fine-tuning).
  A tree with stacked blocks (stacking.py) gets the same adapters, stacked.
  """
  if cfg.rank == 0:
    return params
  if stacking.is_stacked(params):
    return stacking.stack_layers(add(stacking.unstack_layers(params), cfg, rng))
  flat = dict(traverse_util.flatten_dict(params))
  if _adapter_modules(flat):
    raise ValueError(f"params already hold LoRA adapters (e.g. {_join(_adapter_modules(flat)[0])})")
  shapes = _module_shapes(flat)
  modules = target_modules(params, cfg)
  for path in modules:
    if cfg.rank > min(shapes[path]):
      raise UserError(f"LoRA rank={cfg.rank} is larger than the smaller side of {_join(path)} "
                       f"{shapes[path]}: choose rank <= {min(shapes[path])} or drop that target")
  for path, key in zip(modules, jax.random.split(rng, len(modules))):
    d_in, d_out = shapes[path]
    if cfg.init == "kaiming_uniform":  # PEFT/loralib: kaiming_uniform_(a=sqrt(5)) -> U(+-1/sqrt(in))
      bound = 1.0 / math.sqrt(d_in)
      a = jax.random.uniform(key, (d_in, cfg.rank), jnp.float32, -bound, bound)
    else:  # PEFT's init_lora_weights='gaussian': N(0, (1/r)^2)
      a = jax.random.normal(key, (d_in, cfg.rank), jnp.float32) / cfg.rank
    flat[path + ("lora_a",)] = a  # (in, r)
    flat[path + ("lora_b",)] = jnp.zeros((cfg.rank, d_out), jnp.float32)  # (r, out): starts at W
  return traverse_util.unflatten_dict(flat)


def labels(params: dict, cfg: LoraConfig) -> dict:
  """'trainable' or 'frozen' for every leaf (same structure as params).

  Rules in order: adapters -> trainable (rank 0: every leaf -> trainable), each extra_trainable
  pattern -> trainable, the default -> frozen. Each leaf is covered by exactly one rule, the first that
  matches it (big_vision's masks); checked: every leaf gets one label, and every extra_trainable
  pattern matches some leaf (a pattern that selects nothing is a typo, so it is an error).
  Stacked blocks (stacking.py) are labelled per layer, then stacked: every layer must agree.
  """
  if stacking.is_stacked(params):
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), params)
    return stacking.stack_layers(labels(stacking.unstack_layers(shapes), cfg))
  flat = traverse_util.flatten_dict(params)
  if cfg.rank == 0:
    rules = [("everything (rank 0: full fine-tuning)", lambda p: True, "trainable")]
  else:
    if not _adapter_modules(flat):
      raise ValueError("LoRA rank > 0 but params hold no adapters: call lora.add(params, cfg, rng) first")
    rules = [("adapters", lambda p: p[-1] in ADAPTER_LEAVES, "trainable")]
  rules += [(f"extra_trainable {x!r}", lambda p, x=x: _selects_leaf(x, _join(p)), "trainable")
            for x in cfg.extra_trainable]
  rules.append(("frozen (default)", lambda p: True, "frozen"))
  matches = {name: 0 for name, _, _ in rules}  # leaves each rule matches (first or not)
  out = {}
  for path in flat:
    matched = [(name, label) for name, test, label in rules if test(path)]
    for name, _ in matched:
      matches[name] += 1
    out[path] = matched[0][1]  # the one rule that covers this leaf: the first that matches
  assert set(out) == set(flat) and set(out.values()) <= {"trainable", "frozen"}
  unused = [name for name, count in matches.items() if name.startswith("extra_trainable") and count == 0]
  if unused:
    leaves = sorted(_join(p) for p in flat if not re.match(r"h_[1-9]", p[0]))  # block 0 stands for all
    raise UserError(f"LoRA {unused[0]} matches no parameter; parameters here (block h_0 shown for "
                     f"every block): {', '.join(leaves)}")
  return traverse_util.unflatten_dict(out)


def split(params: dict, labels_tree: dict) -> tuple:
  """(trainable, frozen): two sparse nested dicts that together hold every leaf once."""
  flat, flat_labels = traverse_util.flatten_dict(params), traverse_util.flatten_dict(labels_tree)
  if set(flat) != set(flat_labels):
    raise ValueError("labels do not cover the same leaves as params: "
                     f"{sorted(_join(p) for p in set(flat) ^ set(flat_labels))[:10]}")
  parts = {"trainable": {}, "frozen": {}}
  for path, value in flat.items():
    parts[flat_labels[path]][path] = value
  return (traverse_util.unflatten_dict(parts["trainable"]), traverse_util.unflatten_dict(parts["frozen"]))


def combine(trainable: dict, frozen: dict) -> dict:
  """The inverse of split."""
  flat_t, flat_f = traverse_util.flatten_dict(trainable), traverse_util.flatten_dict(frozen)
  both = set(flat_t) & set(flat_f)
  if both:
    raise ValueError(f"leaves both trainable and frozen: {sorted(_join(p) for p in both)[:10]}")
  return traverse_util.unflatten_dict({**flat_f, **flat_t})


def merge(params: dict, cfg: LoraConfig, gpt2_config: gpt2_model.GPT2Config) -> tuple:
  """(plain GPT-2 params, config): each adapted kernel becomes W + s A B in float32, adapters removed.

  The merged kernels are float32 whatever the base's storage dtype: on a bf16 base, W + s A B rounded
  back to bf16 loses much of a small update (bf16 values near 0.1 are 4.9e-4 apart: a smaller change
  to such a weight rounds to half that step or to nothing), so a bf16 merge would be another model than the one trained. Leaves without an adapter keep
  their dtype. weights.save_pretrained writes every tensor as float32.
  An adapter on a tied lm_head unties it: the returned config has tie_word_embeddings=False and the
  tree gains lm_head/kernel (D, V) = wte^T + s A B.
  Stacked blocks (stacking.py) are merged per layer and come back stacked.
  """
  if stacking.is_stacked(params):
    merged, gpt2_config = merge(stacking.unstack_layers(params), cfg, gpt2_config)
    return stacking.stack_layers(merged), gpt2_config
  flat = dict(traverse_util.flatten_dict(params))
  modules = _adapter_modules(flat)
  if not modules:
    return params, gpt2_config
  if cfg.rank == 0:
    raise ValueError("params hold LoRA adapters but the LoRA config has rank 0")
  s = scale(cfg)
  for path in modules:
    a, b = flat.pop(path + ("lora_a",)), flat.pop(path + ("lora_b",))  # (in, r), (r, out)
    if a.shape[1] != cfg.rank:
      raise ValueError(f"{_join(path)}/lora_a has rank {a.shape[1]}, the LoRA config says {cfg.rank}")
    delta = s * jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)  # (in, out)
    if path + ("kernel",) in flat:
      base = flat[path + ("kernel",)]
    else:  # the tied head: untie it
      base = flat[("wte", "embedding")].T  # (D, V)
      gpt2_config = gpt2_config.replace(tie_word_embeddings=False)
    flat[path + ("kernel",)] = base.astype(jnp.float32) + delta  # float32 (docstring)
  return traverse_util.unflatten_dict(flat), gpt2_config


def summary(params: dict, labels_tree: dict) -> str:
  """PEFT's print_trainable_parameters line (the tied head counted once, as the tree holds it once)."""
  sizes = traverse_util.flatten_dict(jax.tree.map(lambda x: int(np.prod(x.shape)), params))
  flat_labels = traverse_util.flatten_dict(labels_tree)
  total = sum(sizes.values())
  trainable = sum(n for p, n in sizes.items() if flat_labels[p] == "trainable")
  return (f"trainable params: {trainable:,d} || all params: {total:,d} || "
          f"trainable%: {100 * trainable / max(total, 1):.4f}")


# --- Hugging Face PEFT interop ---------------------------------------------------------------------
def _peft_module_name(path: tuple) -> str:
  """('h_0', 'attn', 'c_attn') -> 'transformer.h.0.attn.c_attn'; ('lm_head',) -> 'lm_head'."""
  return weights.path_to_hf_key(path + ("kernel",)).removesuffix(".weight")


def save_peft(params: dict, cfg: LoraConfig, out_dir: str, base_model_name_or_path: str = "") -> str:
  """Writes adapter_config.json + adapter_model.safetensors that peft.PeftModel.from_pretrained loads.

  Tensors: base_model.model.<module>.lora_A.weight (r, in) and .lora_B.weight (out, r), fp32.
  fan_in_fan_out=True because GPT-2's Conv1D stores (in, out) (PEFT flips it off for lm_head itself).
  Stacked blocks (stacking.py) are written per layer, as PEFT names them.
  """
  flat = traverse_util.flatten_dict(stacking.unstack_layers(params))
  modules = _adapter_modules(flat)
  if not modules:
    raise ValueError("params hold no LoRA adapters to save (rank 0 trains the full model: use "
                     "weights.save_pretrained)")
  tensors = {}
  for path in modules:
    name = PEFT_PREFIX + _peft_module_name(path)
    a = np.asarray(jax.device_get(flat[path + ("lora_a",)]), np.float32)  # (in, r)
    b = np.asarray(jax.device_get(flat[path + ("lora_b",)]), np.float32)  # (r, out)
    tensors[name + ".lora_A.weight"] = np.ascontiguousarray(a.T)  # torch nn.Linear(in, r): (r, in)
    tensors[name + ".lora_B.weight"] = np.ascontiguousarray(b.T)  # (out, r)
  candidates = _module_shapes(flat)
  targets = _compress_targets(modules, candidates, name=_peft_module_name)
  peft_config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_model_name_or_path or None, "revision": None,
      "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "use_rslora": cfg.use_rslora,
      "target_modules": targets, "fan_in_fan_out": True, "bias": "none", "use_dora": False,
      "init_lora_weights": True if cfg.init == "kaiming_uniform" else "gaussian",
      "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
      "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
  }
  from safetensors.numpy import save_file
  os.makedirs(out_dir, exist_ok=True)
  save_file(tensors, os.path.join(out_dir, PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
  with open(os.path.join(out_dir, PEFT_CONFIG_FILE), "w") as f:
    json.dump(peft_config, f, indent=2)
  return out_dir


def _check_peft_config(pc: dict, source: str):
  """Refuses PEFT features this tree transform does not implement, naming the field."""
  problems = [f"{k}={pc.get(k)!r} (only {v!r})" for k, v in (("peft_type", "LORA"), ("bias", "none"))
              if pc.get(k, v) != v]
  problems += [f"{field}=True" for field in ("use_dora", "lora_bias") if pc.get(field)]
  problems += [f"{field}={pc[field]!r} (per-module ranks/alphas and saved modules are not supported)"
               for field in ("rank_pattern", "alpha_pattern", "modules_to_save", "trainable_token_indices")
               if pc.get(field)]
  if problems:
    raise UserError(f"{source}: unsupported PEFT adapter: " + "; ".join(problems))


def load_peft(params: dict, adapter_dir: str) -> tuple:
  """(params with the adapters of a PEFT LoRA checkpoint, its LoraConfig).

  Everything is validated before the new tree is built, so a bad adapter never half-applies; errors
  name the tensor (unknown module, shape or rank mismatch, missing half of a pair).
  Stacked blocks (stacking.py) get the adapters per layer and come back stacked.
  """
  if stacking.is_stacked(params):
    loaded, cfg = load_peft(stacking.unstack_layers(params), adapter_dir)
    return stacking.stack_layers(loaded), cfg
  config_file = os.path.join(adapter_dir, PEFT_CONFIG_FILE)
  weights_file = os.path.join(adapter_dir, PEFT_WEIGHTS_FILE)
  for f in (config_file, weights_file):
    if not os.path.exists(f):
      raise FileNotFoundError(f"{f} not found: a PEFT adapter dir holds {PEFT_CONFIG_FILE} and "
                              f"{PEFT_WEIGHTS_FILE} (adapter_model.bin is not supported)")
  with open(config_file) as f:
    pc = json.load(f)
  _check_peft_config(pc, config_file)
  rank = int(pc["r"])
  flat = dict(traverse_util.flatten_dict(params))
  if _adapter_modules(flat):
    raise ValueError(f"params already hold LoRA adapters (e.g. {_join(_adapter_modules(flat)[0])}): "
                     "load a PEFT adapter into the base tree")
  shapes = _module_shapes(flat)
  from safetensors import safe_open
  with safe_open(weights_file, framework="flax") as f:  # the flax reader handles bf16 too
    state = {k: np.asarray(f.get_tensor(k).astype(jnp.float32)) for k in f.keys()}
  found, problems = {}, []
  for key, value in sorted(state.items()):
    name = key.removeprefix(PEFT_PREFIX)
    if name == "lm_head.base_layer.weight":  # PEFT saves the tied head beside an lm_head adapter
      wte = flat[("wte", "embedding")]  # compared in wte's dtype, so a bf16 base still matches
      if value.shape != wte.shape or not np.allclose(
          np.asarray(jnp.asarray(value, wte.dtype), np.float32), np.asarray(wte, np.float32), atol=1e-6):
        problems.append(f"{key}: the adapter's base head differs from this model's wte (another base?)")
      continue
    m = re.fullmatch(r"(.+)\.lora_([AB])\.weight", name)
    path = weights.hf_key_to_path(m.group(1) + ".weight") if m else None
    module = path[:-1] if path else None
    if module not in shapes:
      problems.append(f"{key}: no such LoRA module in this GPT-2 (module paths here: "
                      f"{_describe_modules(shapes)})")
      continue
    d_in, d_out = shapes[module]
    expected = (rank, d_in) if m.group(2) == "A" else (d_out, rank)
    if value.shape != expected:
      problems.append(f"{key}: shape {value.shape}, this model with r={rank} needs {expected}")
      continue
    leaf = "lora_a" if m.group(2) == "A" else "lora_b"
    found[module + (leaf,)] = jnp.asarray(value.T, jnp.float32)  # (in, r) / (r, out)
  problems += [f"{PEFT_PREFIX}{_peft_module_name(m)}.lora_{leaf[-1].upper()}.weight: missing (its pair is "
               "present)" for m in _adapter_modules(found) for leaf in ADAPTER_LEAVES
               if m + (leaf,) not in found]
  if not found and not problems:
    problems.append(f"{weights_file} holds no lora_A/lora_B tensors")
  if problems:
    raise UserError(f"PEFT adapter {adapter_dir} does not fit these params:\n  " + "\n  ".join(problems))
  flat.update(found)
  modules = _adapter_modules(found)
  cfg = LoraConfig(rank=rank, alpha=float(pc.get("lora_alpha", 8)),
                   dropout=float(pc.get("lora_dropout", 0.0)), use_rslora=bool(pc.get("use_rslora")),
                   targets=tuple(_compress_targets(modules, shapes)),
                   init="gaussian" if pc.get("init_lora_weights") == "gaussian" else "kaiming_uniform")
  return traverse_util.unflatten_dict(flat), cfg
