"""Every JAX program a GPU user runs, lowered for CUDA on this CPU, and what each must hold.

Compiling for CUDA is not possible here (no CUDA backend), but lowering runs every rule jax
applies for a GPU, cuDNN's attention included: the H200's crash (the attention probe) was such a
lowering error. conftest's simulated_gpu makes this process an H100/H200 with cuDNN 9.8 (the packed
layout available) or 9.5 (not). Programs are built as the project builds them (train.jit_train_step,
train.make_eval_step, dpo.make_loss_fn, dpo._forward_logps, sample._prefill / _decode,
attention.probe_lowered, attention_check._run, the benchmark's init bench.run_setup._init_with_adapters)
from abstract arguments: nothing is allocated or run.
The settings are configs/gpt2_hh.py's at tiny width: bf16 base and compute, LoRA r16 dropout 0.05
on c_attn/c_proj/c_fc, scanned blocks with remat 'dots' (the config's 'auto' compiles one of 'none',
'dots', 'full': each is lowered below), GPT-2's 50,257-token vocabulary.

Each lowered program must hold
- exactly the cuDNN custom calls of the attention path the dispatcher picks for its masks
  (packed rows: the packed layout where cuDNN >= 9.6, else cuDNN with a dense mask; 'xla': none),
  a backward call only where the program takes gradients;
- no dot with an explicit algorithm (`algorithm = <...>`): jax.nn.dot_product_attention's XLA path
  pins BF16_BF16_F32 on bf16 dots, a lead for why no XLA-path train step finished on the H200;
- no fp32 [B, T, V] buffer (the whole batch's logits; the loss runs in chunks of 256 positions,
  so T = 512 here shows a whole-batch buffer should one appear);
- the DPO step: cuDNN's attention backward as often per step as in the SFT step on the same rows (one
  backward: the reference's forward is not differentiated), its forward once more per layer and
  micro-batch than there (the reference's), counted per trip of every loop of the traced program.

On a multi-device mesh the cuDNN calls lower to `CustomSPMDPartitioning` custom calls whose
per-device bodies XLA's SPMD partitioner lowers at compile time (not possible here); there the
test reads which of jax's cuDNN kernels each one partitions (forward or backward, mask type, bias)
from jax's registry of those calls.
"""
import collections
import re
import types

import jax
import jax.numpy as jnp
import pytest

from conftest import TINY
from gpt2_lora_jax import attention, dpo, lora, optim, sample, sharding, stacking, train
from gpt2_lora_jax.bench import attention_check
from gpt2_lora_jax import model as gpt2_model

V, V_PADDED = 50257, 50304  # GPT-2's vocabulary; the loss pads it to a multiple of 128
B, T = 8, 512  # T > loss.DEFAULT_CHUNK (256): a whole-batch logits buffer would have its own shape
PAIRS_PER_ROW = 3  # J of a DPO batch

# attention_impl and whether the packed layout is available -> the path of packed rows (attention.py:
# the packed layout needs cuDNN >= 9.6 on compute capability 9.0+, else cuDNN with the dense mask).
PACKED_ROWS_PATH = {("auto", True): "cudnn_packed", ("cudnn", True): "cudnn_packed",
                    ("auto", False): "cudnn_mask", ("cudnn", False): "cudnn_mask",
                    ("xla", True): "xla", ("xla", False): "xla"}
# attention_impl -> the path of rows without segment ids (the benchmark's --no_segment_ids): causal.
CAUSAL_ROWS_PATH = {"auto": "cudnn_causal", "cudnn": "cudnn_causal", "xla": "xla"}
# The sampler's path on an H100/H200 for attention_impl 'auto' and 'cudnn', keyed by whether the
# packed layout is available ('xla' always gives 'xla'). Each row's prompt fills the first cache
# slots, so its masks are per-row key lengths (causal in the prefill): cuDNN with kv lengths.
SAMPLER_PREFILL_PATH = {True: "cudnn_lengths", False: "cudnn_lengths"}
SAMPLER_DECODE_PATH = {True: "cudnn_lengths", False: "cudnn_lengths"}

# The forward custom call of each cuDNN path (jax's fused_attention_stablehlo); its backward is
# the same name + "Backward".
CUDNN_CALL = {"xla": None, "cudnn_causal": "__cudnn$fmhaSoftmax",
              "cudnn_packed": "__cudnn$fmhaSoftmax", "cudnn_mask": "__cudnn$fmhaScaleBiasSoftmax",
              "cudnn_lengths": "__cudnn$fmhaSoftmax"}
# What a CustomSPMDPartitioning call of each path partitions: (mask type, with a bias).
CUDNN_KERNEL = {"cudnn_causal": ("CAUSAL", False), "cudnn_packed": ("PADDING_CAUSAL", False),
                "cudnn_mask": ("NO_MASK", True)}


# The project's module-level jitted programs that run the model. jax caches a trace by function and
# arguments (models compare by value), not by the simulated platform: without eviction a program
# traced for one simulated GPU (or for this CPU) would be reused for another.
MODEL_JITS = (sample._prefill, sample._decode, dpo._forward_logps)


@pytest.fixture(autouse=True)
def fresh_traces():
  for jitted in MODEL_JITS:
    jitted.clear_cache()
  yield
  for jitted in MODEL_JITS:
    jitted.clear_cache()


def expected_path(program_paths, impl: str, packed: bool) -> str:
  return "xla" if impl == "xla" else program_paths[packed]


def cuda(jitted, *args):
  """jitted's program for these (abstract) arguments, lowered for CUDA."""
  return jitted.trace(*args).lower(lowering_platforms=("cuda",))


def whole_batch_logits(text: str, T: int) -> list:
  """fp32 tensors shaped [..., T, V] (or the padded V) in StableHLO text."""
  return re.findall(rf"tensor<(?:\d+x)*{T}x(?:{V}|{V_PADDED})xf32>", text)


def partitioned_kernels(lowered) -> list:
  """[(jax's partition function, mask type, with a bias)] of each CustomSPMDPartitioning call."""
  from jax._src import custom_partitioning
  keys = re.findall(r'CustomSPMDPartitioning\(.*?backend_config = "(\d+)"', lowered.as_text())
  kernels = []
  for key in keys:  # the registry holds each call's callbacks while `lowered` lives
    info = custom_partitioning._sharding_callbacks[key.encode()]
    # jax's static arguments of both kernels: scale, seed, dropout rate, (bias, bias gradient), mask type
    (has_bias, _), mask_type = info.static_args[3:5]
    kernels.append((info.partition.__name__, mask_type.name, has_bias))
  return kernels


def assert_holds(lowered, path: str, *, training: bool, T: int, devices: int = 1):
  """The cuDNN calls of `path` (and nothing else of cuDNN), no forced dot algorithm, no fp32 [B, T, V]."""
  text = lowered.as_text()
  assert "algorithm = <" not in text, "a dot with an explicit algorithm"
  assert not whole_batch_logits(text, T), whole_batch_logits(text, T)[:3]
  calls = set(re.findall(r"__cudnn\$\w+", text))
  if devices == 1 or path == "xla":
    want = set()
    if path != "xla":
      want = {CUDNN_CALL[path]} | ({CUDNN_CALL[path] + "Backward"} if training else set())
    assert calls == want, (path, calls)
    assert "CustomSPMDPartitioning" not in text, "a cuDNN call partitioned over devices"
    return
  assert not calls, calls  # lowered per device by the SPMD partitioner, at compile time
  kernels = partitioned_kernels(lowered)
  mask_type, has_bias = CUDNN_KERNEL[path]
  assert {k[1:] for k in kernels} == {(mask_type, has_bias)}, kernels
  names = {k[0] for k in kernels}
  assert names == ({"_dot_product_attention_fwd_partition", "_dot_product_attention_bwd_partition"}
                   if training else {"_dot_product_attention_fwd_partition"}), names


def kernel_runs(traced) -> collections.Counter:
  """{'forward' | 'backward': how often jax's cuDNN attention kernel runs per call} of a traced program:
  each equation counted once per trip of every lax.scan around it (its length: layers, micro-batches,
  the logits chunks, DPO's [reference, policy] loop), a cond by its branch with the most runs."""
  from jax.extend import core as jcore

  def walk(jaxpr, times) -> collections.Counter:
    runs = collections.Counter()
    for eqn in jaxpr.eqns:
      name = eqn.primitive.name
      if name.startswith("dot_product_attention_fwd") or name.startswith("dot_product_attention_bwd"):
        runs["forward" if "_fwd" in name else "backward"] += times
      assert name != "while", "a while loop: its trip count is not in the program"
      trips = eqn.params["length"] if name == "scan" else 1
      subs = [sub.jaxpr if isinstance(sub, jcore.ClosedJaxpr) else sub
              for value in eqn.params.values() for sub in (value if isinstance(value, (tuple, list)) else (value,))
              if isinstance(sub, (jcore.ClosedJaxpr, jcore.Jaxpr))]
      counts = [walk(sub, times * trips) for sub in subs]
      if name == "cond":
        counts = [max(counts, key=lambda c: sum(c.values()))] if counts else []
      for c in counts:
        runs.update(c)
    return runs

  return walk(traced.jaxpr.jaxpr, 1)


# --- the programs, from abstract arguments ----------------------------------------------------

def gpt2_config(impl: str, scan: bool = True, remat: str = "dots", **kw):
  return gpt2_model.GPT2Config(**{**TINY, "n_positions": T, **kw}, vocab_size=V, dtype="bfloat16",
                               param_dtype="bfloat16", attention_impl=impl, scan_layers=scan,
                               remat=remat)


LORA = lora.LoraConfig(rank=16, alpha=32.0, dropout=0.05, targets=("c_attn", "c_proj", "c_fc"))


def abstract_params(config):
  """(params, labels) as ShapeDtypeStructs, stacked when the blocks are scanned (experiment.build)."""
  params = jax.eval_shape(lambda: lora.add(gpt2_model.init_params(config, jax.random.PRNGKey(0)), LORA,
                                           jax.random.PRNGKey(1)))
  labels = lora.labels(params, LORA)
  if config.scan_layers:
    params, labels = stacking.stack_layers(params), stacking.stack_layers(labels)
  return params, labels


def placed(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def rows(mesh, dtype, *shape):
  return jax.ShapeDtypeStruct((B,) + shape, dtype, sharding=sharding.batch_sharding(mesh))


def sft_batch(mesh):
  return {"inputs": rows(mesh, jnp.int32, T), "targets": rows(mesh, jnp.int32, T),
          "positions": rows(mesh, jnp.int32, T), "segment_ids": rows(mesh, jnp.int32, T),
          "loss_mask": rows(mesh, jnp.float32, T)}


def preference_batch(mesh):
  """A DPO batch (preference.PreferenceData.rows)."""
  return {**sft_batch(mesh), "reply_index": rows(mesh, jnp.int32, T),
          "pair_mask": rows(mesh, jnp.float32, PAIRS_PER_ROW)}


def train_program(config, micro_batches: int, devices: int, loss_fn=None, batch=sft_batch, fsdp: int = 1):
  """(jitted step, its abstract arguments, (model, mesh, state, trainable and frozen shardings)) as
  train.run builds them, on a ('data', 'fsdp') mesh of `devices` CPU devices (train.init_state's
  shardings; the batch split over both axes)."""
  params, labels = abstract_params(config)
  model = lora.make_model(config, LORA)
  optim_cfg = types.SimpleNamespace(lr=3e-4, schedule="cosine", warmup_steps=100, min_lr_ratio=0.0,
                                    b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, clip_norm=1.0)
  tx, schedule = optim.make_optimizer(optim_cfg, 3000, labels), optim.make_schedule(optim_cfg, 3000)
  mesh = sharding.make_mesh(-1, fsdp, jax.devices()[:devices])
  repl = sharding.replicated(mesh)
  param_sh = sharding.param_shardings(params, mesh)
  trainable_sh, frozen_sh = lora.split(param_sh, labels)
  trainable, frozen = lora.split(params, labels)
  trainable = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), trainable)  # master copy
  opt_sh = sharding.opt_state_shardings(tx, params, param_sh, mesh)
  state = {"trainable": placed(trainable, trainable_sh),
           "opt_state": placed(jax.eval_shape(tx.init, lora.combine(trainable, frozen)), opt_sh),
           "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=repl),
           "rng": jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=repl)}
  state_sh = {"trainable": trainable_sh, "opt_state": opt_sh, "step": repl, "rng": repl}
  loss = None if loss_fn is None else loss_fn(model)
  if loss_fn is dpo_loss:  # the reference adapters ride in the frozen tree (train.frozen_for_step)
    frozen, frozen_sh = {**frozen, dpo.REFERENCE_KEY: trainable}, {**frozen_sh, dpo.REFERENCE_KEY: trainable_sh}
  step = train.jit_train_step(model, labels, micro_batches, tx, schedule, mesh, state_sh, frozen_sh, loss)
  return step, (state, placed(frozen, frozen_sh), batch(mesh)), (model, mesh, state, trainable_sh, frozen_sh)


def dpo_loss(model):
  from gpt2_lora_jax import config as config_lib
  return dpo.make_loss_fn(model, config_lib.default_config().dpo)  # sigmoid, with the reference


# --- the SFT train step -----------------------------------------------------------------------

# (attention_impl, packed layout available, scanned, remat, micro-batches, devices, fsdp): every
# value of each setting at least once; the first two rows are configs/gpt2_hh.py's (remat 'auto'
# compiles 'none', then 'dots', then 'full' until one fits the device; 'full' scanned: below).
TRAIN_CASES = [
    ("auto", True, True, "none", 1, 1, 1),
    ("auto", True, True, "dots", 2, 1, 1),
    ("auto", False, True, "dots", 1, 1, 1),
    ("cudnn", True, False, "none", 2, 1, 1),
    ("cudnn", False, False, "full", 2, 1, 1),
    ("xla", True, True, "full", 2, 1, 1),
    ("xla", False, False, "dots", 1, 1, 1),
    ("auto", True, True, "dots", 2, 8, 2),
    ("cudnn", False, False, "none", 2, 8, 1),
    ("xla", True, True, "dots", 2, 8, 1),
]


@pytest.mark.parametrize("impl, packed, scan, remat, micro_batches, devices, fsdp", TRAIN_CASES)
def test_sft_train_step_lowers_for_cuda(simulated_gpu, impl, packed, scan, remat, micro_batches, devices,
                                        fsdp):
  simulated_gpu(packed=packed)
  step, args, _ = train_program(gpt2_config(impl, scan, remat), micro_batches, devices, fsdp=fsdp)
  assert_holds(cuda(step, *args), PACKED_ROWS_PATH[impl, packed], training=True, T=T, devices=devices)


@pytest.mark.parametrize("impl", ["auto", "xla"])
def test_train_step_on_rows_without_segments_lowers_for_cuda(simulated_gpu, impl):
  """benchmarks' --no_segment_ids: the model builds no mask, plain causal attention."""
  simulated_gpu()
  unpacked = lambda mesh: {**sft_batch(mesh), "segment_ids": None}
  step, args, _ = train_program(gpt2_config(impl), 1, 1, batch=unpacked)
  assert_holds(cuda(step, *args), CAUSAL_ROWS_PATH[impl], training=True, T=T)


def test_the_buffer_check_sees_whole_batch_logits():
  """The fp32 [B, T, V] check is not vacuous: the model's full logits in fp32 show up in it."""
  config = gpt2_config("xla")
  params, _ = abstract_params(config)
  model = lora.make_model(config, LORA)
  ids = jax.ShapeDtypeStruct((B, T), jnp.int32)
  logits = jax.jit(lambda p, x: model.apply({"params": p}, x).astype(jnp.float32))
  assert len(whole_batch_logits(cuda(logits, params, ids).as_text(), T)) >= 1


# --- the DPO step, the held-out evaluation and DPO's reference pass ---------------------------

@pytest.mark.parametrize("impl, packed, devices", [("auto", True, 1), ("cudnn", False, 1),
                                                   ("xla", True, 1), ("auto", True, 8)])
def test_dpo_train_step_lowers_for_cuda(simulated_gpu, impl, packed, devices):
  """Lowered as the SFT step is; on a cuDNN path, cuDNN's backward runs as often as in the SFT step
  (the design this replaced ran it twice as often: the reference's backward too) and its forward
  that of the SFT step plus one forward per micro-batch (dpo._forward_logps on a micro-batch)."""
  simulated_gpu(packed=packed)
  micro_batches = 2
  step, args, (model, mesh, state, _, _) = train_program(gpt2_config(impl), micro_batches, devices,
                                                         loss_fn=dpo_loss, batch=preference_batch)
  path = PACKED_ROWS_PATH[impl, packed]
  assert_holds(cuda(step, *args), path, training=True, T=T, devices=devices)
  if path == "xla":
    return
  sft_step, sft_args, _ = train_program(gpt2_config(impl), micro_batches, devices)
  sft = kernel_runs(sft_step.trace(*sft_args))
  frozen = {k: v for k, v in args[1].items() if k != dpo.REFERENCE_KEY}
  micro_batch = {k: jax.ShapeDtypeStruct((B // micro_batches,) + v.shape[1:], v.dtype)
                 for k, v in preference_batch(mesh).items()}
  forward = kernel_runs(dpo._forward_logps.trace(model, lora.combine(state["trainable"], frozen), micro_batch,
                                                 2 * PAIRS_PER_ROW))
  runs = kernel_runs(step.trace(*args))
  assert sft["backward"] > 0 and forward["forward"] > 0 and forward["backward"] == 0, (sft, forward)
  assert runs["backward"] == sft["backward"], (runs, sft)
  assert runs["forward"] == sft["forward"] + micro_batches * forward["forward"], (runs, sft, forward)


@pytest.mark.parametrize("impl, packed", [("auto", True), ("cudnn", False), ("xla", False)])
def test_held_out_evaluation_lowers_for_cuda(simulated_gpu, impl, packed):
  """SFT's held-out step (train.run's eval_fn; evaluate.heldout_loss runs the same function), DPO's
  held-out loss and DPO's reference pass: forward only, so no backward call."""
  simulated_gpu(packed=packed)
  config = gpt2_config(impl)
  _, (state, frozen, batch), (model, mesh, _, trainable_sh, frozen_sh) = train_program(config, 1, 1)
  batch_sh, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  eval_step = jax.jit(train.make_eval_step(model), in_shardings=(trainable_sh, frozen_sh, batch_sh),
                      out_shardings=repl)
  path = PACKED_ROWS_PATH[impl, packed]
  assert_holds(cuda(eval_step, state["trainable"], frozen, batch), path, training=False, T=T)

  params = lora.combine(state["trainable"], frozen)
  reference = dpo._forward_logps.trace(model, params, preference_batch(mesh), 2 * PAIRS_PER_ROW)
  assert_holds(reference.lower(lowering_platforms=("cuda",)), path, training=False, T=T)

  _, (state, frozen, pairs), (_, _, _, trainable_sh, frozen_sh) = train_program(
      config, 1, 1, loss_fn=dpo_loss, batch=preference_batch)
  dpo_eval = jax.jit(lambda tr, fr, b: dpo_loss(model)(tr, fr, b, None),
                     in_shardings=(trainable_sh, frozen_sh, batch_sh), out_shardings=repl)
  assert_holds(cuda(dpo_eval, state["trainable"], frozen, pairs), path, training=False, T=T)


# --- the sampler --------------------------------------------------------------------------------

PROMPT, NEW = 64, 32  # bucket length P and max_new_tokens


def sampler_programs(config):
  """(prefill, decode) of sample.generate_tokens for the model evaluation samples from: the LoRA
  model, adapters factored (evaluate.py), bf16 base, blocks scanned as the run trained them."""
  params, _ = abstract_params(config)
  model = lora.make_model(config, LORA)
  sampling = sample.Sampling(temperature=0.7)  # evaluation's default temperature
  ids = jax.ShapeDtypeStruct((B, PROMPT), jnp.int32)
  keys = jax.ShapeDtypeStruct((B, 2), jnp.uint32)
  prefill = sample._prefill.trace(model, params, ids, ids, keys, NEW, sampling)
  state = jax.eval_shape(lambda p, i, m, k: sample._prefill(model, p, i, m, k, NEW, sampling), params,
                         ids, ids, keys)
  decode = sample._decode.trace(model, params, state, jax.ShapeDtypeStruct((), jnp.int32), sampling,
                                sample.EOT_ID, sample.EOT_ID)
  return prefill, decode


@pytest.mark.parametrize("impl, packed, scan", [("auto", True, True), ("auto", False, True),
                                                ("cudnn", True, False), ("xla", True, True)])
def test_sampler_prefill_and_decode_lower_for_cuda(simulated_gpu, impl, packed, scan):
  simulated_gpu(packed=packed)
  prefill, decode = sampler_programs(gpt2_config(impl, scan, remat="none"))
  assert_holds(prefill.lower(lowering_platforms=("cuda",)),
               expected_path(SAMPLER_PREFILL_PATH, impl, packed), training=False, T=PROMPT)
  decode_text = decode.lower(lowering_platforms=("cuda",))
  assert_holds(decode_text, expected_path(SAMPLER_DECODE_PATH, impl, packed), training=False, T=1)
  assert "stablehlo.while" in decode_text.as_text()  # the decode loop stays on the device


# --- the probe and the attention check --------------------------------------------------------

@pytest.mark.parametrize("path", ["cudnn_packed", "cudnn_mask", "cudnn_causal", "cudnn_lengths", "xla"])
def test_the_probe_lowers_for_cuda(simulated_gpu, path):
  """What probe(path) compiles and runs on a GPU before first choosing a path (forward and backward
  on its test batch, forward only for the sampler's cudnn_lengths; 'xla' is the reference it is
  compared with)."""
  simulated_gpu()
  assert_holds(attention.probe_lowered(path, ("cuda",)), path, training=path != "cudnn_lengths",
               T=attention.PROBE_SHAPE[1])


@pytest.mark.parametrize("packed", [True, False])
def test_the_attention_check_lowers_for_cuda(simulated_gpu, packed):
  """python -m gpt2_lora_jax.bench.attention_check: every jitted program it runs on a GPU (the fp32
  reference, each bf16 path forward + backward on HH-like packed rows, the overflow row)."""
  plat = simulated_gpu(packed=packed)
  Bc, Tc, H, K, cap = 2, 256, 4, 64, 8
  seg = jnp.asarray(attention_check.hh_like_segment_ids(0, Bc, Tc, cap))
  chosen = attention.select_path("cudnn", "segments", plat, "bfloat16", K, Tc, cap, log_fallbacks=False)
  assert chosen == PACKED_ROWS_PATH["cudnn", packed]  # what the check reports as the model's path
  seg_arg = jax.ShapeDtypeStruct(seg.shape, seg.dtype)
  for dtype, path in [(jnp.float32, "xla"), (jnp.bfloat16, "xla"), (jnp.bfloat16, "layout_xla"),
                      (jnp.bfloat16, "cudnn_packed"), (jnp.bfloat16, "cudnn_mask")]:
    x = jax.ShapeDtypeStruct((Bc, Tc, H, K), dtype)
    lowered = cuda(attention_check._run(path, cap), x, x, x, x, seg_arg)
    assert_holds(lowered, "xla" if path == "layout_xla" else path, training=True, T=Tc)
    assert_no_folded_inputs(lowered.as_text(), Bc, Tc)
  x = jax.ShapeDtypeStruct((Bc, Tc, H, K), jnp.bfloat16)
  text = cuda(attention_check._run("pallas", cap), x, x, x, x, seg_arg).as_text()  # flash.py's kernels
  assert re.findall(r"__gpu\$xla\.gpu\.triton", text) and not re.findall(r"__cudnn\$\w+", text)
  assert_no_folded_inputs(text, Bc, Tc)
  overflow = attention_check._overflow_nans.trace(x, x, x, seg_arg, cap).lower(lowering_platforms=("cuda",))
  assert_holds(overflow, "cudnn_packed", training=False, T=Tc)
  assert_no_folded_inputs(overflow.as_text(), Bc, Tc)


def assert_no_folded_inputs(text: str, B: int, T: int):
  """No (B, T) constant (segment ids baked into the program: the H200's layout_xla compile stall had
  them) and no integer dot (its layout mask came from an s32 batched dot; benchmarks/README.md)."""
  assert not re.findall(rf"stablehlo\.constant dense<.*> : tensor<{B}x{T}xi32>", text)
  integer_dots = re.findall(r"stablehlo\.dot_general.*-> tensor<[\dx]*x?i\d+>", text)
  assert not integer_dots, integer_dots[:2]


def test_the_no_folded_inputs_check_sees_the_old_layout_mask():
  """The check above is not vacuous: the attention check's layout_xla as it was (segment ids closed
  over, the mask from an integer einsum) trips both halves."""
  Bc, Tc, cap = 2, 64, 4
  seg = jnp.asarray(attention_check.hh_like_segment_ids(0, Bc, Tc, cap))
  x = jax.ShapeDtypeStruct((Bc, Tc, 2, 16), jnp.bfloat16)

  def old_layout_xla(q):
    seqlens, offsets, _ = attention.segment_layout(seg, cap + 1)  # seg: a closed-over constant
    t = jnp.arange(Tc)
    in_BMT = (seqlens[:, :, None] >= 0) & (t >= offsets[:, :-1, None]) & (t < offsets[:, :-1, None] + seqlens[:, :, None])
    same = jnp.einsum("bmq,bmk->bqk", in_BMT.astype(jnp.int32), in_BMT.astype(jnp.int32)) > 0
    return same, q * 2

  text = cuda(jax.jit(old_layout_xla), x).as_text()
  with pytest.raises(AssertionError):
    assert_no_folded_inputs(text, Bc, Tc)
  assert re.findall(rf"stablehlo\.constant dense<.*> : tensor<{Bc}x{Tc}xi32>", text)
  assert re.findall(r"stablehlo\.dot_general.*-> tensor<[\dx]*x?i\d+>", text)


def test_the_attention_check_reports_a_kernel_that_fails_with_an_empty_message(simulated_gpu, monkeypatch):
  """On the H200, jax's cuDNN lowering raised an AssertionError with an empty message; the check's
  record of a failed path must survive that (as every other path's row), not raise IndexError."""
  simulated_gpu()
  real_run = attention_check._run

  def run(path, *args):
    fn = real_run(path, *args)
    if not path.startswith("cudnn"):
      return fn

    class Refused:  # what jax's cuDNN lowering did on the H200
      def lower(self, *call_args):
        raise AssertionError()
    return Refused()

  monkeypatch.setattr(attention_check, "_run", run)
  result = attention_check.check(batch_size=2, seq_len=64, heads=2, head_dim=16, max_segments=4, repeats=1)
  rows = result["paths"]
  assert rows["cudnn_packed"] == rows["cudnn_mask"] == {"error": "AssertionError: (no message)", "ok": False}
  assert rows["xla"]["ok"] and rows["layout_xla"]["ok"]  # the XLA paths ran on this CPU
  assert "error: AssertionError: (no message)" in attention_check.to_markdown({**result, "timestamp": "t"})


# --- the benchmark's random init ---------------------------------------------------------------

def main_calls(text: str) -> list:
  """Names of the functions the lowered module's main function calls (jax lowers each random draw
  to a call of a private function, e.g. @_normal_3)."""
  main = re.search(r"func\.func public @main\(.*?\n  }", text, re.S).group(0)
  return re.findall(r"call @(\w+)\(", main)


@pytest.mark.parametrize("stacked", [True, False])
def test_the_benchmark_init_lowers_for_cuda_with_one_draw_per_kind_of_leaf(stacked):
  """bench.run_setup's init program (the benchmark's base + adapters) draws each kind of leaf once
  for all blocks: the same draws at 2 and at 4 blocks, one per random leaf of the stacked tree. (Its
  predecessor, a jitted model.init_params + lora.add, drew every leaf of every block: 581 threefry
  hashes and 151,018 StableHLO operations once calls are inlined for gpt2-xl, benchmarks/README.md.)"""
  from flax import traverse_util
  from gpt2_lora_jax.bench import run_setup
  draws = {}
  for n_layer in (2, 4):
    config = gpt2_config("xla", scan=stacked, n_layer=n_layer)
    text = run_setup._init_with_adapters.trace(config, LORA, 0, stacked).lower(lowering_platforms=("cuda",)).as_text()
    draws[n_layer] = sorted(re.sub(r"_\d+$", "", name) for name in main_calls(text)
                            if name.startswith(("_normal", "_uniform")))
    stacked_tree = stacking.stack_layers(run_setup.adapted_shapes(config, LORA))
    random_leaves = [p for p in traverse_util.flatten_dict(stacked_tree) if p[-1] in ("kernel", "embedding", "lora_a")]
    assert len(draws[n_layer]) == len(random_leaves), (draws[n_layer], random_leaves)
  assert draws[2] == draws[4]


# --- TPU --------------------------------------------------------------------------------------

@pytest.mark.parametrize("devices", [1, 8])
def test_train_step_and_sampler_lower_for_tpu(monkeypatch, devices):
  """On a TPU attention.platform() reports backend 'tpu' and every path is XLA; jax lowers for TPU
  on this CPU machine (jax 0.10.2), so the programs of configs/gpt2_hh.py ('auto') are checked.
  (A cuDNN path cannot be lowered for TPU: NotImplementedError "MLIR translation rule for primitive
  'dot_product_attention_fwd' not found for platform tpu"; the dispatcher never picks one there.)"""
  plat = attention.Platform("tpu", jax_version=attention._version_tuple(jax.__version__))
  monkeypatch.setattr(attention, "platform", lambda: plat)
  config = gpt2_config("auto")
  step, args, _ = train_program(config, 2, devices)
  tpu = lambda traced: traced.lower(lowering_platforms=("tpu",))
  assert_holds(tpu(step.trace(*args)), "xla", training=True, T=T, devices=devices)
  if devices == 1:
    prefill, decode = sampler_programs(config.replace(remat="none"))
    assert_holds(tpu(prefill), "xla", training=False, T=PROMPT)
    assert_holds(tpu(decode), "xla", training=False, T=1)
