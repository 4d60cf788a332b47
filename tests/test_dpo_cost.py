"""What the DPO step costs: its reference is one forward, no backward (dpo_forward.py).

The programs are the project's (train.make_train_step with dpo.make_loss_fn, dpo_forward.reply_stats),
compiled for this CPU from abstract inputs at configs/dpo_hh.py's layout (scanned blocks, remat 'dots',
LoRA on every block linear) at tiny width, T = 512 (two logits chunks of 256), one micro-batch
(test_dpo_reference.py runs micro-batches).
Matmul FLOPs come from bench.hlo_flops (each loop counted per trip: XLA's cost_analysis counts a
loop body once, so the design this replaced, whose reference ran forward and backward inside a
2-trip loop, read the same as this one there).
"""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2_lora_jax import config as config_lib
from gpt2_lora_jax import dpo, dpo_forward, lora, optim, stacking, train
from gpt2_lora_jax import loss as loss_lib
from gpt2_lora_jax import model as gpt2_model
from gpt2_lora_jax.bench import hlo_flops

B, T, J = 4, 512, 3  # rows, tokens, pairs per row
BLOCKS = lora.LoraConfig(rank=8, alpha=16.0, targets=("c_attn", "c_proj", "c_fc"))


def gpt2_config(scan=True, remat="dots"):
  return gpt2_model.GPT2Config(vocab_size=512, n_positions=T, n_embd=64, n_layer=2, n_head=4,
                               scan_layers=scan, remat=remat)


# --- the counter ---------------------------------------------------------------------------------

def test_dot_flops_counts_every_trip_of_every_loop():
  n = 64
  x = jax.ShapeDtypeStruct((n, n), jnp.float32)

  def loops(outer, inner):
    def f(a, w):
      body = lambda c, _: (jnp.tanh(c @ w), None)
      return jax.lax.scan(lambda c, _: (jax.lax.scan(body, c, None, length=inner)[0], None), a, None,
                          length=outer)[0]
    return hlo_flops.dot_flops(jax.jit(f).lower(x, x).compile().as_text())

  for outer, inner in [(1, 1), (3, 1), (2, 5)]:
    count = loops(outer, inner)
    assert count["flops"] == outer * inner * 2 * n ** 3, (outer, inner, count)
  assert sorted(loops(2, 5)["loops"].values()) == [2, 5]


# --- the DPO step against the reference-free step and one forward -----------------------------------

def programs(config, micro_batches=1):
  """Compiled {'dpo', 'reference_free', 'forward', 'sft'} on the same rows (abstract inputs)."""
  params = jax.eval_shape(lambda: lora.add(gpt2_model.init_params(config, jax.random.PRNGKey(0)), BLOCKS,
                                           jax.random.PRNGKey(1)))
  labels = lora.labels(params, BLOCKS)
  if config.scan_layers:
    params, labels = stacking.stack_layers(params), stacking.stack_layers(labels)
  model = lora.make_model(config, BLOCKS)
  opt = types.SimpleNamespace(lr=1e-4, schedule="constant", warmup_steps=0, min_lr_ratio=0.0, b1=0.9, b2=0.999,
                              eps=1e-8, weight_decay=0.0, clip_norm=1.0)
  tx, schedule = optim.make_optimizer(opt, 10, labels), optim.make_schedule(opt, 10)
  trainable, frozen = lora.split(params, labels)
  trainable = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), trainable)
  state = {"trainable": trainable, "opt_state": jax.eval_shape(tx.init, lora.combine(trainable, frozen)),
           "step": jax.ShapeDtypeStruct((), jnp.int32), "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
  rows = lambda dtype, *shape: jax.ShapeDtypeStruct((B,) + (shape or (T,)), dtype)
  batch = {"inputs": rows(jnp.int32), "targets": rows(jnp.int32), "positions": rows(jnp.int32),
           "segment_ids": rows(jnp.int32), "reply_index": rows(jnp.int32), "pair_mask": rows(jnp.float32, J)}
  sft_batch = {**{k: batch[k] for k in ("inputs", "targets", "positions", "segment_ids")},
               "loss_mask": rows(jnp.float32)}

  def dpo_step(reference_free: bool):
    settings = config_lib.default_config().dpo
    settings.reference_free = reference_free
    step = train.make_train_step(model, tx, labels, micro_batches, schedule, dpo.make_loss_fn(model, settings))
    step_frozen = frozen if reference_free else {**frozen, dpo.REFERENCE_KEY: trainable}
    return jax.jit(step).lower(state, step_frozen, batch).compile()

  forward = jax.jit(lambda t, f, b: dpo_forward.reply_stats(model, lora.combine(t, f), b, 2 * J))
  return {"dpo": dpo_step(False), "reference_free": dpo_step(True),
          "forward": forward.lower(trainable, frozen, batch).compile(),
          "sft": jax.jit(train.make_train_step(model, tx, labels, micro_batches, schedule)).lower(
              state, frozen, sft_batch).compile()}


@pytest.fixture(scope="module")
def compiled():
  return programs(gpt2_config())


def test_dpo_step_flops_are_the_reference_free_step_plus_one_forward(compiled):
  """The reference adds one forward over the step's rows and no backward. The counter reads a
  conditional's costlier branch on every trip: the reference's iteration skips the head's slope
  matmul (loss.token_logps, 2 B T D V_padded) through one, so the count holds it once more than runs.
  Measured here: 4.698e9 = 3.423e9 + 1.141e9 + 0.134e9 exactly; the design this replaced (jax.lax.map
  over [policy, reference] inside the differentiated loss, the head recomputing its logits in the
  backward) counted 7.114e9, 2.08x the SFT step's 3.423e9 on the same rows."""
  flops = {name: hlo_flops.dot_flops(c.as_text())["flops"] for name, c in compiled.items()}
  config = gpt2_config()
  n, C = loss_lib.chunking(T, loss_lib.DEFAULT_CHUNK)
  slope = 2.0 * B * n * C * config.n_embd * loss_lib.HeadSpec(vocab_size=config.vocab_size).padded_vocab
  print({k: f"{v:.4e}" for k, v in flops.items()}, f"dpo / sft {flops['dpo'] / flops['sft']:.3f}")
  assert flops["forward"] > 0 and flops["dpo"] == flops["reference_free"] + flops["forward"] + slope, flops


def test_dpo_step_memory_plan_holds_one_set_of_residuals(compiled):
  """The compiled plan's temporaries: at most those of the reference-free step plus those of one
  forward (the reference's activations live only during its own forward). Measured here: 72.8 MiB
  against 72.8 + 19.2 MiB; the design this replaced planned 112.2 MiB (the reference's residuals and
  backward as well)."""
  temp = {name: c.memory_analysis().temp_size_in_bytes for name, c in compiled.items()}
  print({k: f"{v / 2 ** 20:.1f} MiB" for k, v in temp.items()})
  assert temp["dpo"] <= temp["reference_free"] + temp["forward"], temp


# --- the gradient is the policy's alone ----------------------------------------------------------

@pytest.mark.parametrize("scan, targets", [(True, BLOCKS.targets), (False, BLOCKS.targets + ("lm_head",))])
def test_gradient_is_that_of_the_policy_forward_alone(scan, targets):
  """Policy != reference (adapters B random, the reference's halved): loss and gradient of the step's
  loss_fn against jax.grad of the DPO loss (dpo_losses.loss) of the policy's reply log-probs from the
  model's full logits (jax.nn.log_softmax), the reference's computed the same way by a separate
  program and fed in as constants."""
  config = gpt2_config(scan, "dots" if scan else "none").replace(n_positions=64)
  lcfg = lora.LoraConfig(rank=4, alpha=8.0, targets=targets)
  params = lora.add(gpt2_model.init_params(config, jax.random.PRNGKey(0)), lcfg, jax.random.PRNGKey(1))
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: 0.05 * jax.random.normal(jax.random.PRNGKey(len(jax.tree_util.keystr(path))), x.shape)
      if jax.tree_util.keystr(path).endswith("['lora_b']") else x, params)
  labels = lora.labels(params, lcfg)
  if scan:
    params, labels = stacking.stack_layers(params), stacking.stack_layers(labels)
  trainable, base = lora.split(params, labels)
  reference = jax.tree.map(lambda x: 0.5 * x, trainable)
  model = lora.make_model(config, lcfg)
  rng = np.random.default_rng(0)
  rows, pairs, seg_len = 4, 2, 16  # each row: 2 pairs, 4 segments of 16 tokens, the last 8 the reply
  reply_BT = np.where(np.arange(64) % seg_len >= 8, np.arange(64) // seg_len, -1)
  batch = {"inputs": rng.integers(0, 512, (rows, 64), dtype=np.int32),
           "targets": rng.integers(0, 512, (rows, 64), dtype=np.int32),
           "positions": np.tile(np.arange(64, dtype=np.int32) % seg_len, (rows, 1)),
           "segment_ids": np.tile(np.arange(64, dtype=np.int32) // seg_len + 1, (rows, 1)),
           "reply_index": np.tile(reply_BT.astype(np.int32), (rows, 1)),
           "pair_mask": np.ones((rows, pairs), np.float32)}
  settings = config_lib.default_config().dpo
  loss_fn = dpo.make_loss_fn(model, settings)
  frozen = {**base, dpo.REFERENCE_KEY: reference}
  got_loss, got_grads = jax.jit(jax.value_and_grad(lambda t: loss_fn(t, frozen, batch, None)[0]))(trainable)

  def full_logits_reply_logps(adapters):  # (rows, pairs, 2)
    logits = model.apply({"params": lora.combine(adapters, base)}, batch["inputs"], position_ids=batch["positions"],
                         segment_ids=batch["segment_ids"], deterministic=True).astype(jnp.float32)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], axis=-1)[..., 0]
    onehot = batch["reply_index"][..., None] == jnp.arange(2 * pairs)
    return jnp.einsum("bt,btr->br", logp, onehot).reshape(rows, pairs, 2)

  ref_BJ2 = jax.jit(full_logits_reply_logps)(reference)

  def policy_only(t):
    logps = full_logits_reply_logps(t)
    losses, _, _ = dpo.loss(logps[..., 0], logps[..., 1], ref_BJ2[..., 0], ref_BJ2[..., 1], beta=settings.beta)
    return jnp.sum(losses)

  want_loss, want_grads = jax.jit(jax.value_and_grad(policy_only))(trainable)
  np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-6)
  assert abs(float(want_loss) - rows * pairs * np.log(2)) > 1e-3  # the policy is off its reference
  for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5 * np.abs(want).max())
  assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(got_grads))
