"""The jitted train step and the loop: metrics one step late, held-out loss, checkpoints, preemption.

State that trains lives in one dict, donated to every step:
  {'trainable': adapter (and extra) leaves, 'opt_state': optimizer state, 'step': int32, 'rng': key}
The frozen base is a separate argument, never donated and never checkpointed.

Gradients are taken with respect to the trainable leaves only; the optimizer is an
optax.multi_transform over the whole tree (optim.py), so the labels are the one place that says
what trains, frozen leaves get set_to_zero, and XLA never computes a frozen weight gradient.
"""
from __future__ import annotations

import dataclasses
import json
import signal
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gpt2_lora_jax import lora
from gpt2_lora_jax import loss as loss_lib
from gpt2_lora_jax import preemption, timings


# Positions per logits chunk in the loss (at most): the (B, T, V) logits are never all alive at once.
LOSS_CHUNK = loss_lib.DEFAULT_CHUNK


def token_loss_sums(model, params, batch, rng, deterministic: bool, chunk: int = LOSS_CHUNK):
  """(sum of next-token NLL over loss_mask, number of loss tokens) for one (B, T) batch.

  The blocks run as the model; the head and the cross-entropy run fused in loss.head_nll_sum:
  `chunk` positions at a time, fp32 logits, the gradient of each chunk's logits formed in the
  forward pass (no recompute in the backward), so the fp32 logits of the whole batch
  ([B, T, 50257]: 3.3 GB at 16 x 1024) never exist. A T that `chunk` does not divide is cut into
  equal chunks of at most `chunk` positions.
  """
  rngs = None if deterministic else {"dropout": rng}
  h_BTD = model.apply({"params": params}, batch["inputs"], position_ids=batch["positions"],
                      segment_ids=batch["segment_ids"], deterministic=deterministic, rngs=rngs,
                      return_hidden=True)
  cfg = model.config
  head = loss_lib.head_from_params(params, cfg.tie_word_embeddings)
  spec = loss_lib.HeadSpec(vocab_size=cfg.vocab_size, tied=cfg.tie_word_embeddings, dtype=cfg.dtype,
                           lora_scale=float(model.lora_scale or 0.0), lora_dropout=model.lora_dropout,
                           lora_dropout_rng=cfg.lora_dropout_rng, deterministic=deterministic, chunk=chunk)
  if "lora_a" in head and model.lora_scale is None:
    raise ValueError("parameters at lm_head hold LoRA adapters but the model was built without a LoRA "
                     "scale: build it with gpt2_lora_jax.lora.make_model(config, lora_config)")
  mask_BT = batch["loss_mask"].astype(jnp.float32)
  nll_sum = loss_lib.head_nll_sum(h_BTD, head, batch["targets"], mask_BT, spec,
                                  None if deterministic else rng)
  return nll_sum, jnp.sum(mask_BT)


# Batch key of the per-row "this process saw SIGTERM/SIGINT" flag that multi-process runs feed to
# the step; the step returns its max over all rows as metrics[STOP_KEY], read with the metrics.
STOP_KEY = "stop"


def split_micro_batches(x_B, micro_batches: int):
  """(B, ...) -> (M, B / M, ...), micro-batch m holding rows m, m + M, m + 2M, ...

  Strided, not contiguous: the batch arrives split over the devices in contiguous blocks of B / n
  rows, and every block holds B / (M n) rows of every micro-batch, so each micro-batch is spread
  over all devices and a device computes only rows it holds. (Contiguous micro-batches would each
  live on n / M of the devices, and XLA would gather them: every device computing B / n rows per
  micro-batch whatever M, M times the compute and no activation memory saved.) The reshape keeps
  the rows' device split on axis 0 of (B / M, M); the swap makes it axis 1 of the result.
  """
  M = micro_batches
  return jnp.swapaxes(x_B.reshape((x_B.shape[0] // M, M) + x_B.shape[1:]), 0, 1)


def sft_loss(model) -> Callable:
  """The supervised loss as a train-step loss_fn: (NLL summed over loss tokens, loss tokens, {})."""
  def loss_fn(trainable, frozen, mbatch, rng):
    nll_sum, n_tokens = token_loss_sums(model, lora.combine(trainable, frozen), mbatch, rng,
                                        deterministic=False)
    return nll_sum, n_tokens, {}
  return loss_fn


def make_train_step(model, tx: optax.GradientTransformation, labels, micro_batches: int,
                    schedule: Callable, loss_fn: Callable | None = None):
  """One optimizer update from a (B, T) batch split into `micro_batches` passes.

  loss_fn(trainable, frozen, mbatch, rng) -> (numerator sum, denominator count, aux) for one
  micro-batch; aux is a dict of per-micro-batch sums. Default: sft_loss(model), the token NLL.
  The loss is the numerator summed over the whole batch divided by the denominator summed over the
  whole batch, not an average of micro-batch means, so 4 micro-batches of 2 rows give the update of
  one batch of 8 rows; each aux sum is divided by the same denominator for the metrics. An optional
  batch[STOP_KEY] (B,) flag comes back as metrics[STOP_KEY], the same on every process (see run()).
  """
  loss_fn = sft_loss(model) if loss_fn is None else loss_fn

  def train_step(state, frozen, batch):
    batch = dict(batch)
    stop_B = batch.pop(STOP_KEY, None)  # (B,) int32 in multi-process runs; see run()
    rng = jax.random.fold_in(state["rng"], state["step"])
    micro = jax.tree.map(lambda x: split_micro_batches(x, micro_batches), batch)

    def numerator(trainable, mbatch, mrng):
      num, den, aux = loss_fn(trainable, frozen, mbatch, mrng)
      return num, (den, aux)

    grad_fn = jax.value_and_grad(numerator, has_aux=True)

    def accumulate(carry, xs):
      grads_acc, num_acc, den_acc, aux_acc = carry
      mbatch, index = xs
      (num, (den, aux)), grads = grad_fn(state["trainable"], mbatch, jax.random.fold_in(rng, index))
      return (jax.tree.map(jnp.add, grads_acc, grads), num_acc + num, den_acc + den,
              jax.tree.map(jnp.add, aux_acc, aux)), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state["trainable"])
    first = jax.tree.map(lambda x: x[0], micro)
    aux_shapes = jax.eval_shape(lambda: loss_fn(state["trainable"], frozen, first, rng)[2])
    aux_zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), aux_shapes)
    (grads_sum, num_sum, den_sum, aux_sum), _ = jax.lax.scan(
        accumulate, (zeros, jnp.float32(0), jnp.float32(0), aux_zeros),
        (micro, jnp.arange(micro_batches)))
    denom = jnp.maximum(den_sum, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads_sum)
    loss = num_sum / denom
    # The optimizer sees the whole tree: zero gradients for frozen leaves, which it maps to zero.
    # (Top-level entries of `frozen` outside the parameter tree, e.g. DPO's reference adapters
    # under Objective.initial_copy_key, are the loss's inputs only.)
    param_frozen = {k: v for k, v in frozen.items() if k in labels}
    full_grads = lora.combine(grads, jax.tree.map(lambda p: jnp.zeros(p.shape, p.dtype), param_frozen))
    full_params = lora.combine(state["trainable"], param_frozen)
    updates, opt_state = tx.update(full_grads, state["opt_state"], full_params)
    new_trainable, _ = lora.split(optax.apply_updates(full_params, updates), labels)
    grad_norm = optax.tree.norm(grads)
    # A NaN/Inf loss or gradient leaves the state untouched; the loop stops on it and saves nothing
    # from it. Both are checked: a finite loss can come with non-finite gradients.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = {
        "trainable": keep(new_trainable, state["trainable"]),
        "opt_state": keep(opt_state, state["opt_state"]),
        "step": state["step"] + 1,
        "rng": state["rng"],
    }
    metrics = {"loss": loss, "loss_tokens": den_sum, "grad_norm": grad_norm,
               "lr": schedule(state["step"]), "finite": finite}
    metrics.update({k: v / denom for k, v in aux_sum.items()})
    if stop_B is not None:  # any process saw a signal: the max over every row is an all-reduce
      metrics[STOP_KEY] = jnp.max(stop_B)
    return new_state, metrics

  return train_step


def make_eval_step(model):
  def eval_step(trainable, frozen, batch):
    return token_loss_sums(model, lora.combine(trainable, frozen), batch, None, deterministic=True)
  return eval_step


def host_metrics(metrics) -> dict:
  """Device metrics -> Python floats (this is the one host sync, done one step late)."""
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def is_finite_update(m: dict) -> bool:
  return bool(m.get("finite", 1.0)) and np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])


def master_copy(x):
  """A trainable leaf as fp32 (host or device array; integer leaves are left alone)."""
  if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == jnp.float32:
    return x
  return x.astype(jnp.float32) if isinstance(x, jax.Array) else np.asarray(x, np.float32)


def init_state(params, labels, seed: int, mesh, tx):
  """(state, frozen, state shardings, frozen shardings): a run's arrays placed on the mesh.

  params: base + adapters (host or device arrays); labels: lora.labels of them; seed: of the
  step RNG (dropout); tx: the optimizer (its state is created here, sharded like its params).
  The trainable leaves and the optimizer state are fp32; the frozen base keeps its dtype.
  """
  from gpt2_lora_jax import sharding
  param_sh = sharding.param_shardings(params, mesh)
  trainable_sh, frozen_sh = lora.split(param_sh, labels)
  trainable, frozen = lora.split(params, labels)
  # Trainable leaves are an fp32 master copy whatever the base's storage dtype (rank 0 or
  # extra_trainable on a bf16 base), so Adam's moments are fp32 too and an update of lr 2e-4 is not
  # rounded away: in bf16 it is below half an ulp of any weight of magnitude >= 2^-4 (the layer
  # norms' 1.0 among them). The model casts them to the compute dtype where it uses them.
  trainable = jax.tree.map(master_copy, trainable)
  trainable, frozen = sharding.put(trainable, trainable_sh), sharding.put(frozen, frozen_sh)
  repl = sharding.replicated(mesh)
  opt_sh = sharding.opt_state_shardings(tx, params, param_sh, mesh)
  opt_state = jax.jit(tx.init, out_shardings=opt_sh)(lora.combine(trainable, frozen))
  state = {"trainable": trainable, "opt_state": opt_state,
           "step": jax.device_put(jnp.int32(0), repl),
           "rng": jax.device_put(jax.random.PRNGKey(seed), repl)}
  state_sh = {"trainable": trainable_sh, "opt_state": opt_sh, "step": repl, "rng": repl}
  return state, frozen, state_sh, frozen_sh


def frozen_for_step(state, frozen, state_sh, frozen_sh, initial_copy_key: str = ""):
  """(frozen tree, its shardings) for the step: `frozen`, plus a copy of state['trainable'] under
  initial_copy_key when set (Objective.initial_copy_key). The copy has its own buffers (the state is
  donated to every step) and the trainable leaves' shardings."""
  if not initial_copy_key:
    return frozen, frozen_sh
  copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=state_sh["trainable"])
  return ({**frozen, initial_copy_key: copy(state["trainable"])},
          {**frozen_sh, initial_copy_key: state_sh["trainable"]})


def jit_train_step(model, labels, micro_batches: int, tx, schedule, mesh, state_sh, frozen_sh,
                   loss_fn: Callable | None = None):
  """The train step under jit: explicit shardings, the state donated, compiled once per run.
  loss_fn: as in make_train_step (default: the supervised token NLL)."""
  from gpt2_lora_jax import sharding
  step = sharding.traced_on(mesh, make_train_step(model, tx, labels, micro_batches, schedule, loss_fn))
  return jax.jit(step, in_shardings=(state_sh, frozen_sh, sharding.batch_sharding(mesh)),
                 out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,))


@dataclasses.dataclass
class Objective:
  """What a run trains on and for: everything in run() that differs between SFT and DPO.

  build_data(split, log) -> (data, summary); batch_for_step(data, seed, step, B, process index,
  process count) and eval_batches(data, B, process index, process count) -> local batch dicts;
  loss_fn: the train step's loss_fn (make_train_step); eval_fn(trainable, frozen, batch) ->
  (numerator, denominator, aux sums) without dropout, logged as 'loss', denominator_name and each
  aux sum over the denominator; plot(workdir, window). initial_copy_key: when set, a copy of the
  initial trainable leaves (before any checkpoint is restored) rides in the frozen tree that the
  step and eval_fn get, under this top-level key, placed like the trainable leaves (DPO's reference).
  loss_fn_for(model) -> loss_fn: the same loss for another build of the model (model.remat='auto'
  compiles the step once per remat policy, remat.py); None: the run cannot use remat='auto'.
  """
  build_data: Callable
  batch_for_step: Callable
  eval_batches: Callable
  loss_fn: Callable
  eval_fn: Callable
  denominator_name: str = "loss_tokens"
  initial_copy_key: str = ""
  plot: Callable | None = None
  loss_fn_for: Callable | None = None


def sft_objective(exp, cache_dir, workdir: str = "") -> Objective:
  """Supervised fine-tuning on the texts of data.field: the token NLL under the loss mask; the training
  rows filtered by their reward with data.reward_filter (scored by reward_filter.scorer_for)."""
  from gpt2_lora_jax import data, metrics as metrics_lib, reward_filter
  tcfg = exp.config.train
  eval_step = make_eval_step(exp.model)
  scorer = reward_filter.scorer_for(exp.config, workdir)
  return Objective(
      build_data=lambda split, log: data.build(exp.config.data, exp.tokenizer, split, tcfg.batch_size,
                                               cache_dir, log=log, reward_scorer=scorer),
      batch_for_step=data.batch_for_step, eval_batches=data.eval_batches, loss_fn=sft_loss(exp.model),
      loss_fn_for=sft_loss,
      eval_fn=lambda trainable, frozen, batch: (*eval_step(trainable, frozen, batch), {}),
      plot=metrics_lib.plot_loss)


class NonFiniteLoss(FloatingPointError):
  """A step's loss or gradient norm was NaN/Inf; its update was skipped and never saved."""


def run(exp, workdir: str, objective: Callable | None = None) -> dict:
  """Trains exp (experiment.build) in workdir; resumes from its latest checkpoint. Returns a summary.

  objective(exp, cache_dir) -> Objective: what is trained (default sft_objective; dpo.objective).
  """
  from gpt2_lora_jax import checkpoint, experiment, flops, metrics as metrics_lib, sharding
  from gpt2_lora_jax import model as gpt2_model

  config = exp.config
  tcfg = config.train
  timings.mark_startup()
  is_main = jax.process_index() == 0
  multi_process = jax.process_count() > 1
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  # A bucket workdir keeps the tokenisation cache local (data.py writes it with plain file calls).
  cache_dir = config.data.cache_dir or (None if metrics_lib.is_remote(workdir) else f"{workdir}/cache")
  log = print if is_main else None
  obj = objective(exp, cache_dir) if objective else sft_objective(exp, cache_dir, workdir)
  train_data, summary = obj.build_data("train", log)
  eval_data = obj.build_data("eval", None)[0] if tcfg.eval_every > 0 else None
  timings.mark("data")
  if is_main:
    metrics_lib.write_text(f"{workdir}/data_summary.json", json.dumps(summary, indent=2))
    print(exp_summary_line(exp), flush=True)

  tx, schedule = experiment.optimizer(exp)
  state, frozen, state_sh, frozen_sh = init_state(exp.params, exp.labels, tcfg.seed, mesh, tx)
  repl = sharding.replicated(mesh)
  # What the step and eval_fn get as `frozen` (before any checkpoint is restored: see Objective).
  step_frozen, step_frozen_sh = frozen_for_step(state, frozen, state_sh, frozen_sh, obj.initial_copy_key)

  mngr = checkpoint.manager(workdir, keep=tcfg.keep_ckpts)
  start = 0
  if mngr.latest_step() is not None:
    start = mngr.latest_step()
    # A run already past train.steps trains nothing, so only base and layout must match (as for
    # evaluation); resuming checks the settings that shape the trajectory too.
    allow = None if start >= tcfg.steps else tcfg.allow_changed_config
    state = checkpoint.restore(mngr, start, checkpoint.abstract_like(state), exp.meta,
                               allow_changed_run=allow, log=log)
    if is_main:
      print(finished_message(start, tcfg.steps, workdir) if start >= tcfg.steps
            else f"resumed from {mngr.directory}/{start}", flush=True)
  if start >= tcfg.steps:
    return {"step": start, "params": lora.combine(state["trainable"], frozen)}

  batch_sh = sharding.batch_sharding(mesh)

  def batch_at(step, signalled: bool):
    local = obj.batch_for_step(train_data, tcfg.seed, step, tcfg.batch_size,
                               jax.process_index(), jax.process_count())
    if multi_process:  # this process's signal flag on each of its rows; the step all-reduces it
      local[STOP_KEY] = np.full(len(local["inputs"]), int(signalled), np.int32)
    return sharding.global_batch(local, mesh)


  eval_fn = jax.jit(sharding.traced_on(mesh, obj.eval_fn), in_shardings=(state_sh["trainable"], step_frozen_sh, batch_sh),
                    out_shardings=repl)
  seq_len = config.data.max_length
  step_flops = flops.train_flops_per_token(exp.params, exp.labels, exp.gpt2_config.n_layer,
                                           exp.gpt2_config.n_embd, seq_len)["total"] * tcfg.batch_size * seq_len
  peak = flops.peak_flops()
  writer = metrics_lib.MetricsWriter(workdir, tcfg.steps, start, enabled=is_main)
  timer = timings.StepTimer()
  spent = {"heldout_s": 0.0, "heldout_passes": 0, "checkpoint_s": 0.0, "plot_s": 0.0}  # in the loop
  last = {}

  def record(step, device_metrics) -> bool:
    """Reads step's metrics (the host sync, one step behind the device) and writes them.

    Returns whether any process had seen a stop signal when it dispatched that step: the same
    answer on every process, so all of them stop after the same step (multi-process runs only).
    """
    m = host_metrics(device_metrics)
    stop_seen = bool(m.pop(STOP_KEY, 0.0))
    if not is_finite_update(m):
      raise NonFiniteLoss(f"non-finite update at step {step} (loss {m['loss']}, gradient norm "
                          f"{m['grad_norm']}): it was skipped and nothing from it was saved; the last "
                          f"checkpoint is {mngr.latest_step()}. Lower --config.optim.lr or check the data.")
    seconds = timer.lap()
    m.pop("finite")
    if seconds is not None:  # steady-state steps only (see StepTimer)
      m["step_time_s"] = seconds
      m["tokens_per_s"] = tcfg.batch_size * seq_len / seconds
      if peak:
        m["mfu"] = step_flops / seconds / (peak * jax.device_count())
    writer.write(step, "train", m, progress=(step % tcfg.log_every == 0 or step == tcfg.steps))
    last.update(m)
    if step == start + 1:
      timings.mark("first_step")
      timings.write(workdir)
    return stop_seen

  def held_out(trainable) -> dict:
    """{'loss', denominator_name, aux...} over every held-out row."""
    totals = None
    for batch in obj.eval_batches(eval_data, tcfg.batch_size, jax.process_index(), jax.process_count()):
      out = jax.device_get(eval_fn(trainable, step_frozen, sharding.global_batch(batch, mesh)))
      totals = out if totals is None else jax.tree.map(lambda a, b: a + b, totals, out)
    num, den, aux = jax.tree.map(float, totals)
    return {"loss": num / max(den, 1.0), obj.denominator_name: den,
            **{k: v / max(den, 1.0) for k, v in aux.items()}}

  # Stopping on a signal. One process: at the next step boundary. Several: a signal may reach them
  # at different steps, and a checkpoint save is collective, so they must agree on the step. Each
  # feeds its flag into the step (batch_at); the flag comes back all-reduced with the metrics that
  # are read one step late anyway, so agreeing costs no extra host sync; all stop at the same step.
  stop = False  # the same value on every process
  pending = None
  step = start
  timings.mark("state")  # placed, optimizer initialised, checkpoint restored, metric writers opened
  if eval_data is not None and start == 0:  # where the held-out curve starts: the untrained model
    writer.write(0, "eval", held_out(state["trainable"]))
    timings.mark("initial_heldout")
  # The step's attention probes, then its compile, each timed alone; the loop calls the compiled step.
  gpt2_model.choose_attention(exp.gpt2_config, seq_len)
  timings.mark("probes")
  if config.model.remat == "auto":  # compiled here, once per policy tried; the chosen one runs
    step_fn = auto_remat_step(exp, obj, tx, schedule, mesh, state, state_sh, step_frozen, step_frozen_sh,
                              batch_at(start, False), log)
  else:
    step_fn = jit_train_step(exp.model, exp.labels, tcfg.micro_batches, tx, schedule, mesh, state_sh,
                             step_frozen_sh, obj.loss_fn).lower(state, step_frozen, batch_at(start, False)).compile()
  timings.mark("compile")
  with preemption.PreemptionGuard() as guard:
    try:
      for step in range(start, tcfg.steps):
        stop = stop or (not multi_process and guard.signum is not None)
        if stop:
          break
        state, device_metrics = step_fn(state, step_frozen, batch_at(step, guard.signum is not None))
        if pending is not None:
          stop = record(*pending) or stop
        pending = (step + 1, device_metrics)  # metrics of the update that ends at step + 1
        done = step + 1
        if eval_data is not None and (done % tcfg.eval_every == 0 or done == tcfg.steps):
          with timings.adding(spent, "heldout_s", count="heldout_passes"):
            writer.write(done, "eval", held_out(state["trainable"]))
          timer.interrupted()
        if done % tcfg.ckpt_every == 0 or done == tcfg.steps:
          stop = record(*pending) or stop  # never save an unchecked update
          pending = None
          with timings.adding(spent, "checkpoint_s"):
            checkpoint.save(mngr, done, state, exp.meta)
            writer.flush()  # a bucket's copy of metrics.jsonl keeps up with the checkpoints
          timer.interrupted()
        if is_main and tcfg.plot_every and done % tcfg.plot_every == 0:
          with timings.adding(spent, "plot_s"):
            writer.flush()
            obj.plot(workdir, tcfg.loss_avg_window)
          timer.interrupted()
      else:
        step = tcfg.steps
      if pending is not None:
        stop = record(*pending) or stop
      stop = stop or (not multi_process and guard.signum is not None)
      if stop:
        if step != mngr.latest_step():
          checkpoint.save(mngr, step, state, exp.meta, force=True)
        mngr.wait_until_finished()
        # A process the signal never reached stops too (exit code as if it had got SIGTERM).
        raise preemption.Preempted(guard.signum or signal.SIGTERM, step)
    finally:
      mngr.wait_until_finished()
      writer.close()
      if is_main:
        obj.plot(workdir, tcfg.loss_avg_window)
      timings.record("train", **timer.speed(tcfg.batch_size * seq_len), **spent)
      timings.mark("training")
      timings.write(workdir)
  return {"step": tcfg.steps, **last, "params": lora.combine(state["trainable"], frozen)}


def auto_remat_step(exp, obj: Objective, tx, schedule, mesh, state, state_sh, frozen, frozen_sh,
                    first_batch: dict, log=None):
  """The train step compiled with the remat policy remat.choose picks (model.remat='auto') for these
  arrays and batch shapes: a jax.stages.Compiled, called as the jitted step. log: where the line
  with the choice and every policy's figures goes (None: nowhere)."""
  from gpt2_lora_jax import remat
  if obj.loss_fn_for is None:
    raise ValueError("model.remat='auto' needs the objective's loss_fn_for (train.Objective)")
  tcfg = exp.config.train

  def lower(policy: str, micro_batches: int, batch_size: int):
    model = lora.make_model(exp.gpt2_config.replace(remat=policy), exp.lora_config)
    step = jit_train_step(model, exp.labels, micro_batches, tx, schedule, mesh, state_sh, frozen_sh,
                          obj.loss_fn_for(model))
    rows = lambda x: jax.ShapeDtypeStruct((batch_size,) + x.shape[1:], x.dtype, sharding=x.sharding)
    return step.lower(state, frozen, jax.tree.map(rows, first_batch))

  local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  budget, source = remat.budget(local, tcfg.memory_limit_gib)
  choice = remat.choose(lower, budget, source, tcfg.batch_size, tcfg.micro_batches, mesh.size)
  if log is not None:
    log(choice.line(), flush=True)
  return choice.compiled


def finished_message(checkpoint_step: int, steps: int, workdir: str) -> str:
  """What a rerun of a finished run says (it exits 0: there is nothing left to train)."""
  if checkpoint_step == steps:
    return f"{workdir}: already trained to step {steps}; nothing to do"
  return (f"{workdir}: the checkpoint is at step {checkpoint_step}, beyond train.steps={steps}; "
          f"nothing to train (evaluation, if asked for, uses step {checkpoint_step} unless "
          "--config.eval.step says otherwise)")


def exp_summary_line(exp) -> str:
  return f"{exp.base_name}: {lora.summary(exp.params, exp.labels)}"
