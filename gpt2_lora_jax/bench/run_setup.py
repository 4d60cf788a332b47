"""The pieces of one benchmark configuration (a harness.BenchConfig): the GPT-2 config it runs, its
synthetic batch, and the train step set up on the devices, for harness.py and preflight.py."""
from __future__ import annotations

import contextlib
import functools
import time
import math
import types

import jax
import numpy as np
from flax import traverse_util

from gpt2_lora_jax import lora, optim, sharding, stacking, train, weights
from gpt2_lora_jax.bench import attention_check, records
from gpt2_lora_jax import model as gpt2_model


# jax.monitoring event of each program XLA compiles (or loads from the persistent cache), with its
# name (jax/_src/dispatch.py: BACKEND_COMPILE_EVENT).
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def compiled_programs():
  """Yields a list that collects the name of every program XLA compiles in the block (jitted
  functions as 'jit(name)'; an operation run eagerly outside jit is a program of its own, e.g.
  'jit(cumsum)'). A program jax already holds compiled in this process is not compiled again."""
  names = []

  def listen(event, duration_s, **kw):
    if event == COMPILE_EVENT:
      names.append(str(kw.get("fun_name")))

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    yield names
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)


def _on_accelerator() -> bool:
  return jax.devices()[0].platform != "cpu"


def gpt2_config(cfg: BenchConfig) -> gpt2_model.GPT2Config:
  """The GPT-2 shape (preset + overrides) and how to run it, with 'auto' dtypes resolved."""
  accel = _on_accelerator()
  dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if accel else "float32")
  param_dtype = cfg.param_dtype
  if param_dtype == "auto":
    param_dtype = "bfloat16" if accel and cfg.lora_rank > 0 else "float32"
  if cfg.preset not in gpt2_model.PRESETS:
    raise ValueError(f"unknown GPT-2 size {cfg.preset!r}: choose one of {sorted(gpt2_model.PRESETS)}")
  shape = {k: getattr(cfg, k) or v for k, v in gpt2_model.PRESETS[cfg.preset].items()}
  remat = "none" if cfg.remat == "auto" else cfg.remat  # 'auto': chosen when the step compiles
  config = gpt2_model.GPT2Config(vocab_size=cfg.vocab_size, dtype=dtype, param_dtype=param_dtype,
                                 attention_impl=cfg.attention, remat=remat, scan_layers=cfg.scan_layers,
                                 lora_dropout_rng=cfg.lora_dropout_rng, lora_fused_matmul=cfg.lora_fused_matmul,
                                 max_segments_per_row=cfg.max_segments, **shape)
  if cfg.seq_len > config.n_positions:
    raise ValueError(f"seq_len={cfg.seq_len} is longer than GPT-2's {config.n_positions} positions")
  return config


def model_name(cfg: BenchConfig) -> str:
  overrides = [f"{k}={getattr(cfg, k)}" for k in ("n_layer", "n_embd", "n_head") if getattr(cfg, k)]
  return cfg.preset + (f"[{','.join(overrides)}]" if overrides else "")


def synthetic_batch(cfg: BenchConfig, vocab_size: int) -> dict:
  """Random ids and targets; numpy (B, T). segments='one': one segment per row, every token a
  loss token; 'hh': HH-like packed rows (attention_check.hh_like_segment_ids), positions restarting
  per conversation, padding (segment 0) outside the loss."""
  rng = np.random.default_rng(cfg.seed)
  shape = (cfg.batch_size, cfg.seq_len)
  segment_ids = np.ones(shape, np.int32)
  positions = np.broadcast_to(np.arange(cfg.seq_len, dtype=np.int32), shape).copy()
  if cfg.segments == "hh":
    segment_ids = attention_check.hh_like_segment_ids(cfg.seed, cfg.batch_size, cfg.seq_len, cfg.max_segments)
    for b in range(cfg.batch_size):  # positions restart at each conversation's first token
      starts = np.r_[True, segment_ids[b, 1:] != segment_ids[b, :-1]]
      first = np.maximum.accumulate(np.where(starts, np.arange(cfg.seq_len), 0))
      positions[b] = np.arange(cfg.seq_len) - first
  batch = {"inputs": rng.integers(0, vocab_size, shape, dtype=np.int32),
           "targets": rng.integers(0, vocab_size, shape, dtype=np.int32),
           "positions": positions,
           "loss_mask": (segment_ids > 0).astype(np.int32),
           "segment_ids": segment_ids}
  if not cfg.segment_ids:
    batch["segment_ids"] = None  # the model then builds no mask: plain causal attention
  return batch


def setting_fields(cfg: BenchConfig) -> dict:
  """What a train record says about how it ran (the fields a setting fixes, and the shape)."""
  return {"model": model_name(cfg), "setting": cfg.setting, "batch_size": cfg.batch_size, "seq_len": cfg.seq_len,
          "lora_rank": cfg.lora_rank, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
          "lora_dropout_rng": cfg.lora_dropout_rng, "lora_fused_matmul": cfg.lora_fused_matmul,
          "remat": cfg.remat, "scan_layers": cfg.scan_layers, "attention": cfg.attention,
          "segment_ids": cfg.segment_ids, "segments": cfg.segments}


def _lora_config(cfg: BenchConfig) -> lora.LoraConfig:
  return lora.LoraConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.lora_targets)


def adapted_shapes(config, lora_cfg) -> dict:
  """Base + adapters as ShapeDtypeStructs, per layer: what lora.add(model.init_params(...)) makes."""
  base = gpt2_model.param_shapes(config.replace(attention_impl="xla"))  # (xla: asks no platform)
  return jax.eval_shape(lambda b: lora.add(b, lora_cfg, jax.random.PRNGKey(0)), base)


def init_rule(lora_cfg: lora.LoraConfig):
  """weights.init_rule for the base; lora.add's distributions for the adapters: A (in, r) from
  U(+-1/sqrt(in)) (PEFT's kaiming_uniform(a=sqrt(5))) or N(0, 1/r^2) ('gaussian'), B zeros."""
  def rule(path, leaf):
    if path[-1] == "lora_b":
      return ("zeros", None)
    if path[-1] == "lora_a":
      d_in = leaf.shape[-2]  # (in, r), or (L, in, r) stacked
      return (("uniform", 1.0 / math.sqrt(d_in)) if lora_cfg.init == "kaiming_uniform"
              else ("normal", 1.0 / lora_cfg.rank))
    return weights.init_rule(path)
  return rule


@functools.partial(jax.jit, static_argnums=(0, 1, 3))
def _init_with_adapters(config, lora_cfg, seed, stacked: bool):
  """Random base + adapters in one program: every leaf drawn for all blocks at once, stacked
  (weights.draw_params), then cut per layer unless `stacked`."""
  shapes = stacking.stack_layers(adapted_shapes(config, lora_cfg))
  params = weights.draw_params(shapes, init_rule(lora_cfg), jax.random.PRNGKey(seed))
  return params if stacked else stacking.unstack_layers(params)


def _params(config, cfg: BenchConfig) -> dict:
  """Base + adapters, blocks stacked under 'h' when config.scan_layers (as a scanned run holds them,
  experiment.py), else per layer: one jitted program on the device that draws each kind of leaf
  once for all blocks (_init_with_adapters). Same distributions as model.init_params + lora.add,
  not the same values. The weights do not depend on the attention kernel, so one program serves
  every path. The init's own memory is freed before a step runs (XLA:CPU plans 14.8 GiB of
  temporaries for gpt2-xl's; a GPU's plan is not measured: benchmarks/README.md)."""
  return _init_with_adapters(config.replace(attention_impl="xla"), _lora_config(cfg), cfg.seed,
                             config.scan_layers)


def base_params(config, cfg: BenchConfig) -> dict:
  """The base weights of `config` (stacked when config.scan_layers): the train case's base, from the
  program train_setup runs for cfg (one compile serves both), with the adapters dropped."""
  flat = traverse_util.flatten_dict(_params(config, cfg))
  return traverse_util.unflatten_dict({k: v for k, v in flat.items() if k[-1] not in ("lora_a", "lora_b")})


def train_setup(cfg: BenchConfig) -> types.SimpleNamespace:
  """The run's pieces for cfg: config, devices, param_shapes and labels (per-layer trees), its state,
  frozen params and one synthetic batch on the mesh, and the train step, not compiled yet:
  lower(policy, micro_batches, batch_size) lowers it for a remat policy (what remat.choose takes
  when cfg.remat is 'auto'); step_fn is the jitted step of cfg.remat (None for 'auto')."""
  config = gpt2_config(cfg)
  devices = jax.devices()[:cfg.num_devices or None]
  mesh = sharding.make_mesh(devices=devices)
  sharding.check_batch_divides(cfg.batch_size, cfg.micro_batches, mesh)
  lora_cfg = _lora_config(cfg)
  param_shapes = adapted_shapes(config, lora_cfg)  # per layer
  labels = lora.labels(param_shapes, lora_cfg)
  run_params = _params(config, cfg)  # stacked when scanned
  run_labels = stacking.stack_layers(labels) if config.scan_layers else labels
  total_steps = cfg.warmup_steps + cfg.timed_steps + 1
  optim_cfg = types.SimpleNamespace(lr=1e-4, schedule="constant", warmup_steps=0, min_lr_ratio=0.0,
                                    b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, clip_norm=1.0)
  tx = optim.make_optimizer(optim_cfg, total_steps, run_labels)
  schedule = optim.make_schedule(optim_cfg, total_steps)
  state, frozen, state_sh, frozen_sh = train.init_state(run_params, run_labels, cfg.seed, mesh, tx)
  host_batch = synthetic_batch(cfg, config.vocab_size)
  batch = sharding.global_batch({k: v for k, v in host_batch.items() if v is not None}, mesh)
  if not cfg.segment_ids:
    batch["segment_ids"] = None

  def step_for(policy: str, micro_batches: int):
    model = lora.make_model(config.replace(remat=policy), lora_cfg)
    return train.jit_train_step(model, run_labels, micro_batches, tx, schedule, mesh, state_sh, frozen_sh)

  def lower(policy: str, micro_batches: int, batch_size: int):
    rows = lambda x: jax.ShapeDtypeStruct((batch_size,) + x.shape[1:], x.dtype, sharding=x.sharding)
    return step_for(policy, micro_batches).lower(state, frozen, jax.tree.map(rows, batch))

  step_fn = None if cfg.remat == "auto" else step_for(cfg.remat, cfg.micro_batches)
  return types.SimpleNamespace(config=config, devices=devices, param_shapes=param_shapes, labels=labels,
                               step_fn=step_fn, lower=lower, state=state, frozen=frozen, batch=batch,
                               host_batch=host_batch)


def attention_path(config, cfg: BenchConfig, segment_ids) -> str:
  """The path the model's layers take for this batch (model.layer_path: no array operation, so
  nothing compiles here), or why it is unknown."""
  try:
    return gpt2_model.layer_path(config, cfg.seq_len, cfg.seq_len, None,
                                 segment_ids if cfg.segment_ids else None)
  except Exception as e:  # the step ran; only the label is missing
    return f"unknown ({records.error_text(e)})"


def compiled_step(run, cfg: BenchConfig) -> tuple:
  """(compiled step, lower s, lower + compile s, remat fields) of train_setup's run: for remat
  'auto' what train.run does (remat.py: each policy compiled until one fits; its seconds summed),
  else the step of cfg.remat lowered and compiled once."""
  from gpt2_lora_jax import remat
  if cfg.remat == "auto":
    choice = remat.choose(run.lower, *remat.budget(run.devices), cfg.batch_size, cfg.micro_batches,
                          len(run.devices))
    print(choice.line(), flush=True)
    lower_s = sum(choice.lower_s.values())
    return (choice.compiled, lower_s, lower_s + sum(choice.compile_s.values()),
            {"remat_policy": choice.policy, "remat_choice": choice.record()})
  t0 = time.perf_counter()
  lowered = run.lower(cfg.remat, cfg.micro_batches, cfg.batch_size)
  lower_s = time.perf_counter() - t0
  compiled = lowered.compile()
  return compiled, lower_s, time.perf_counter() - t0, {}
