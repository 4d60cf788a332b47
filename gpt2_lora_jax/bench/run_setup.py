"""The pieces of one benchmark configuration (a harness.BenchConfig): the GPT-2 config it runs, its
synthetic batch, and the train step set up on the devices, for harness.py and preflight.py."""
from __future__ import annotations

import functools
import types

import jax
import numpy as np
from flax import traverse_util

from gpt2_lora_jax import lora, optim, sharding, stacking, train
from gpt2_lora_jax.bench import attention_check, records
from gpt2_lora_jax import model as gpt2_model


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
  config = gpt2_model.GPT2Config(vocab_size=cfg.vocab_size, dtype=dtype, param_dtype=param_dtype,
                                 attention_impl=cfg.attention, remat=cfg.remat, scan_layers=cfg.scan_layers,
                                 lora_dropout_rng=cfg.lora_dropout_rng,
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
          "lora_dropout_rng": cfg.lora_dropout_rng,
          "remat": cfg.remat, "scan_layers": cfg.scan_layers, "attention": cfg.attention,
          "segment_ids": cfg.segment_ids, "segments": cfg.segments}


@functools.partial(jax.jit, static_argnums=(0, 1))
def _init_with_adapters(config, lora_cfg, base_key, lora_key):
  return lora.add(gpt2_model.init_params(config, base_key), lora_cfg, lora_key)


_stack_layers = jax.jit(stacking.stack_layers)


def _lora_config(cfg: BenchConfig) -> lora.LoraConfig:
  return lora.LoraConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.lora_targets)


def _params(config, cfg: BenchConfig) -> dict:
  """Base + adapters (per-layer tree), built in one program on the device: a host-side threefry
  init of gpt2-xl takes minutes, and op by op each adapter is a small compile of its own. The
  weights do not depend on the attention kernel, so one program serves every path. The init's own
  memory is freed before a step runs, and the step's peak (weights included) is far above it."""
  return _init_with_adapters(config.replace(attention_impl="xla"), _lora_config(cfg), jax.random.PRNGKey(cfg.seed),
                             jax.random.PRNGKey(cfg.seed + 1))


def base_params(config, cfg: BenchConfig) -> dict:
  """The base weights of `config` (per-layer tree) from the program train_setup runs for cfg (one
  compile serves both: the adapters are dropped; lora.add leaves the base untouched)."""
  flat = traverse_util.flatten_dict(_params(config, cfg))
  return traverse_util.unflatten_dict({k: v for k, v in flat.items() if k[-1] not in ("lora_a", "lora_b")})


def train_setup(cfg: BenchConfig) -> types.SimpleNamespace:
  """The run's pieces for cfg: config, devices, param_shapes and labels (per-layer trees), the
  jitted train step, its state, frozen params and one synthetic batch on the mesh (the step is
  not compiled yet)."""
  config = gpt2_config(cfg)
  devices = jax.devices()[:cfg.num_devices or None]
  mesh = sharding.make_mesh(devices=devices)
  sharding.check_batch_divides(cfg.batch_size, cfg.micro_batches, mesh)
  lora_cfg = _lora_config(cfg)
  params = _params(config, cfg)
  labels = lora.labels(params, lora_cfg)
  param_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  run_params, run_labels = params, labels
  if config.scan_layers:  # the blocks stacked under 'h', as a scanned run holds them (experiment.py)
    run_params, run_labels = _stack_layers(params), stacking.stack_layers(labels)
  del params  # only the run's copy stays on the device
  total_steps = cfg.warmup_steps + cfg.timed_steps + 1
  optim_cfg = types.SimpleNamespace(lr=1e-4, schedule="constant", warmup_steps=0, min_lr_ratio=0.0,
                                    b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, clip_norm=1.0)
  tx = optim.make_optimizer(optim_cfg, total_steps, run_labels)
  schedule = optim.make_schedule(optim_cfg, total_steps)
  state, frozen, state_sh, frozen_sh = train.init_state(run_params, run_labels, cfg.seed, mesh, tx)
  step_fn = train.jit_train_step(lora.make_model(config, lora_cfg), run_labels, cfg.micro_batches, tx,
                                 schedule, mesh, state_sh, frozen_sh)
  host_batch = synthetic_batch(cfg, config.vocab_size)
  batch = sharding.global_batch({k: v for k, v in host_batch.items() if v is not None}, mesh)
  if not cfg.segment_ids:
    batch["segment_ids"] = None
  return types.SimpleNamespace(config=config, devices=devices, param_shapes=param_shapes, labels=labels, step_fn=step_fn,
                               state=state, frozen=frozen, batch=batch, host_batch=host_batch)


def attention_path(config, cfg: BenchConfig, segment_ids) -> str:
  """The path the model's layers take for this batch (model.layer_mask), or why it is unknown."""
  try:
    return gpt2_model.layer_mask(config, cfg.seq_len, cfg.seq_len, None,
                                 segment_ids if cfg.segment_ids else None).path
  except Exception as e:  # the step ran; only the label is missing
    return f"unknown ({records.error_text(e)})"
