"""From a config to the objects a run needs: tokenizer, model, base + adapters, labels, optimizer.

Everything here is checked before anything compiles, so a bad flag costs a second, not a compile:
`validate(config)` raises one clear error naming the setting and the fix.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket

import jax
import ml_collections

from gpt2_lora_jax import (checkpoint, lora, optim, reward_filter, stacking, timings, tokenizer as tokenizer_lib,
                           weights)
from gpt2_lora_jax import model as gpt2_model
from gpt2_lora_jax.errors import UserError, UserPathError


@dataclasses.dataclass
class Experiment:
  config: ml_collections.ConfigDict
  gpt2_config: gpt2_model.GPT2Config
  lora_config: lora.LoraConfig
  model: gpt2_model.GPT2  # applies adapters factored when the tree has them
  base_model: gpt2_model.GPT2  # the same network without adapters (for the base-model baseline)
  params: dict  # base + fresh adapters (host arrays, not yet placed on the mesh); blocks stacked
  # under 'h' when gpt2_config.scan_layers
  labels: dict  # 'trainable' / 'frozen' per leaf
  tokenizer: object
  meta: dict  # what a checkpoint records about this run (base fingerprint, layout, configs)

  @property
  def base_name(self) -> str:
    return self.meta["base_name"]


def validate(config: ml_collections.ConfigDict, n_devices: int):
  """Errors for values that are wrong in any run, before loading or compiling anything."""
  problems = []
  if config.lora.rank < 0:
    problems.append(f"lora.rank={config.lora.rank}: must be >= 0 (0 = full fine-tuning)")
  if config.train.batch_size < 1 or config.train.micro_batches < 1:
    problems.append("train.batch_size and train.micro_batches must be >= 1")
  elif config.train.batch_size % config.train.micro_batches:
    problems.append(f"train.batch_size={config.train.batch_size} is not divisible by "
                    f"train.micro_batches={config.train.micro_batches}")
  elif (config.train.batch_size // config.train.micro_batches) % n_devices:
    problems.append(f"train.batch_size={config.train.batch_size} / micro_batches={config.train.micro_batches} "
                    f"rows per pass is not divisible by the {n_devices} devices")
  if config.train.steps < 1:
    problems.append(f"train.steps={config.train.steps}: must be >= 1")
  if config.data.max_length < 2:
    problems.append(f"data.max_length={config.data.max_length}: must be >= 2")
  if config.model.remat not in gpt2_model.REMAT_POLICIES + ("auto",):
    problems.append(f"model.remat={config.model.remat!r}: choose one of "
                    f"{gpt2_model.REMAT_POLICIES + ('auto',)}")
  if config.train.memory_limit_gib < 0:
    problems.append(f"train.memory_limit_gib={config.train.memory_limit_gib}: must be >= 0 (0: the device's)")
  if config.model.init not in ("pretrained", "random"):
    problems.append(f"model.init={config.model.init!r}: 'pretrained' or 'random'")
  if problems:
    raise UserError("invalid config:\n  " + "\n  ".join(problems))


def check_workdir(workdir: str):
  if "://" in workdir:
    return  # a bucket: Orbax and tf.io paths handle it
  try:
    os.makedirs(workdir, exist_ok=True)
    # One probe per process: several hosts may share the workdir and check it at once.
    probe = os.path.join(workdir, f".write_test.{socket.gethostname()}.{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise UserPathError(f"workdir {workdir!r} is not writable ({e}); pass a writable --workdir") from e


def load_base(config: ml_collections.ConfigDict, seed: int):
  """(GPT2Config, params, name): pretrained from model.name, or random of model.preset size."""
  # remat 'auto' is chosen when the train step is compiled (train.auto_remat_step); until then, and
  # in every program without gradients (held-out loss, sampling), the model holds 'none'.
  remat = "none" if config.model.remat == "auto" else config.model.remat
  run_fields = dict(attention_impl=config.model.attention_impl, remat=remat,
                    max_segments_per_row=config.data.max_segments_per_row,
                    scan_layers=bool(config.model.get("scan_layers", False)),
                    lora_dropout_rng=config.lora.get("dropout_rng", "packed"),
                    lora_fused_matmul=bool(config.lora.get("fused_matmul", False)))
  if config.model.init == "pretrained":
    gpt2_config, params = weights.load_pretrained(config.model.name, dtype=config.model.base_param_dtype,
                                                  compute_dtype=config.model.dtype, **run_fields)
    return gpt2_config, params, config.model.name
  gpt2_config = gpt2_model.GPT2Config.preset(config.model.preset, param_dtype=config.model.base_param_dtype,
                                             dtype=config.model.dtype, **run_fields,
                                             **config.model.overrides.to_dict())
  params = weights.random_params(gpt2_config, seed)  # one compiled program, host arrays
  return gpt2_config, params, f"random:{config.model.preset}:seed{seed}"


# Data settings that decide the training rows, by data.source (the ones every source reads first).
_DATA_SETTINGS = ("source", "field", "loss_mask", "max_length", "packing")
_SOURCE_SETTINGS = {"hub": ("hub_id", "subset", "train_split"), "files": ("train_files",),
                    "tfds": ("tfds_dir", "train_split"), "demo": ("demo_rows",)}


def run_settings(config: ml_collections.ConfigDict, dpo_reference: dict | None = None) -> dict:
  """'section.key' -> value of every setting that shapes a run's trajectory: the optimizer and its
  schedule (all of optim), train.steps (the schedule's length), batch size, seed (data order, init,
  dropout) and what decides the training rows. A checkpoint records them; resuming with any changed
  is refused unless train.allow_changed_config. Not among them: train.micro_batches (the same update,
  split differently), the mesh, logging / evaluation / checkpoint cadences, evaluation-only data.

  dpo_reference: for a DPO run, the identity of its reference (dpo.reference_identity: the resolved
  dpo.init_from, its step and a fingerprint of its adapters); every dpo.* setting is recorded too."""
  d = config.data
  keys = [f"optim.{k}" for k in config.optim] + ["train.steps", "train.batch_size", "train.seed"]
  keys += [f"data.{k}" for k in _DATA_SETTINGS + _SOURCE_SETTINGS.get(d.source, ())]
  if dpo_reference is not None:
    keys += [f"dpo.{k}" for k in config.dpo if k != "init_from"]  # init_from: resolved, below
  settings = {k: config[k.split(".")[0]][k.split(".")[1]] for k in keys}
  if d.source == "demo" and d.get("demo_wrong_share", 0.0):  # recorded when set: older runs resume
    settings["data.demo_wrong_share"] = d.demo_wrong_share
  settings.update(reward_filter.run_settings(config))
  settings.update(dpo_reference or {})
  return json.loads(json.dumps(settings))  # tuples as lists: as the checkpoint's JSON gives it back


def build(config: ml_collections.ConfigDict) -> Experiment:
  """Loads the base, adds adapters, labels every leaf; validates lengths against the model."""
  timings.mark_startup()
  validate(config, jax.device_count())
  gpt2_config, base, base_name = load_base(config, config.train.seed)
  timings.mark("weights")
  if config.data.max_length > gpt2_config.n_positions:
    raise UserError(f"data.max_length={config.data.max_length} is longer than the model's "
                     f"{gpt2_config.n_positions} positions; lower --config.data.max_length")
  lora_config = lora.LoraConfig.from_config(config.lora)
  adapter_rng = jax.random.fold_in(jax.random.PRNGKey(config.train.seed), 1)
  params = lora.add(base, lora_config, adapter_rng) if lora_config.rank > 0 else base
  fingerprint = checkpoint.base_fingerprint(base)
  # Host arrays until train.init_state places them sharded: a device copy kept here would be a
  # whole second base on device 0 for the whole run, defeating fsdp.
  params = jax.device_get(params)
  del base
  labels = lora.labels(params, lora_config)
  if gpt2_config.scan_layers:  # the run holds the blocks stacked; exports unstack (stacking.py)
    params, labels = stacking.stack_layers(params), stacking.stack_layers(labels)
  trainable, frozen = lora.split(params, labels)
  meta = {
      "meta_version": checkpoint.META_VERSION,
      "base_name": base_name,
      "base_fingerprint": fingerprint,
      "gpt2_config": gpt2_config.to_hf_dict(),
      "lora": lora_record(lora_config),
      "layout": checkpoint.layout(trainable),
      "run": run_settings(config),
  }
  exp = Experiment(
      config=config, gpt2_config=gpt2_config, lora_config=lora_config,
      model=lora.make_model(gpt2_config, lora_config), base_model=gpt2_model.GPT2(gpt2_config),
      params=params, labels=labels, tokenizer=tokenizer_lib.load(config.model.tokenizer), meta=meta)
  timings.mark("model")
  return exp


def lora_record(lora_config: lora.LoraConfig) -> dict:
  """The adapter settings as a checkpoint's meta records them (JSON: tuples as lists)."""
  return dataclasses.asdict(lora_config) | {"targets": list(lora_config.targets),
                                            "extra_trainable": list(lora_config.extra_trainable)}


def optimizer(exp: Experiment):
  """(optax transformation, learning-rate schedule) for this run's steps and labels."""
  cfg, steps = exp.config.optim, exp.config.train.steps
  return optim.make_optimizer(cfg, steps, exp.labels), optim.make_schedule(cfg, steps)
