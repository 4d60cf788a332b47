"""lora.py and optim.py: adapters leave the base model exact, merge and export agree with the factored
model, training moves only trainable leaves, XLA drops the frozen weight gradients, bad input is named."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from conftest import make_hf_gpt2
from gpt2_lora_jax import config as config_lib
from gpt2_lora_jax import lora, model, optim, train, weights

STUDY = lora.LoraConfig(rank=1, alpha=1, targets=("c_attn", "c_proj", "c_fc", "lm_head"))  # issue 3.6
BLOCKS = lora.LoraConfig(rank=4, alpha=8, targets=("c_attn", "c_proj", "c_fc"))


def _ids(vocab, shape=(2, 16), seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


def _randomise_b(params, seed=1, std=0.05):
  """Non-zero lora_b, so the adapters change the model (fresh ones are exactly zero)."""
  flat = traverse_util.flatten_dict(params)
  keys = iter(jax.random.split(jax.random.PRNGKey(seed), len(flat)))
  return traverse_util.unflatten_dict({
      p: (std * jax.random.normal(next(keys), v.shape) if p[-1] == "lora_b" else v) for p, v in flat.items()})


def _optim_cfg(**kw):
  c = config_lib.default_config().optim
  c.update({**dict(lr=1e-2, warmup_steps=0, schedule="constant", clip_norm=1.0), **kw})
  return c


def _make_step(net, tx):
  """One train step: next-token cross-entropy, value_and_grad over the whole tree, optimizer update."""
  def loss_fn(params, ids_BT):
    logits = net.apply({"params": params}, ids_BT[:, :-1])  # (B, T-1, V)
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids_BT[:, 1:]).mean()

  def step(params, opt_state, ids_BT):
    loss, grads = jax.value_and_grad(loss_fn)(params, ids_BT)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return step


@pytest.fixture(scope="module")
def base(tiny_hf_dir):
  """(config, params) of the 2-layer random GPT-2 with the real 50257-token vocabulary."""
  return weights.load_pretrained(tiny_hf_dir)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  """(config, params) of a 2-layer GPT-2 with a 256-token vocabulary, for training steps."""
  d = str(tmp_path_factory.mktemp("small_gpt2"))
  make_hf_gpt2(d, vocab_size=256)
  return weights.load_pretrained(d)


def test_fresh_adapters_keep_base_logits_bitwise(base):
  config, params = base
  with_adapters = lora.add(params, STUDY, jax.random.PRNGKey(0))
  flat, flat_base = traverse_util.flatten_dict(with_adapters), traverse_util.flatten_dict(params)
  assert {p: v for p, v in flat.items() if p[-1] not in lora.ADAPTER_LEAVES} == flat_base  # paths unchanged
  D, V = config.n_embd, config.vocab_size
  assert flat[("lm_head", "lora_a")].shape == (D, 1) and flat[("lm_head", "lora_b")].shape == (1, V)
  assert flat[("h_1", "mlp", "c_proj", "lora_a")].shape == (4 * D, 1)
  assert flat[("h_0", "attn", "c_attn", "lora_b")].shape == (1, 3 * D)
  assert all(v.dtype == jnp.float32 for p, v in flat.items() if p[-1] in lora.ADAPTER_LEAVES)
  assert len([p for p in flat if p[-1] == "lora_a"]) == 4 * config.n_layer + 1
  ids = _ids(V)
  base_logits = model.GPT2(config).apply({"params": params}, ids)
  lora_logits = lora.make_model(config, STUDY).apply({"params": with_adapters}, ids)
  np.testing.assert_array_equal(np.asarray(lora_logits), np.asarray(base_logits))


@pytest.mark.parametrize("lora_cfg", [BLOCKS, STUDY, lora.LoraConfig(rank=2, alpha=4, use_rslora=True,
                                                                     targets=("attn/c_proj", "lm_head"))])
def test_merge_matches_factored_and_exports_to_transformers(base, lora_cfg, tmp_path):
  import torch
  import transformers
  config, params = base
  tuned = _randomise_b(lora.add(params, lora_cfg, jax.random.PRNGKey(0)))
  ids = _ids(config.vocab_size)
  factored = np.asarray(lora.make_model(config, lora_cfg).apply({"params": tuned}, ids))
  base_logits = np.asarray(model.GPT2(config).apply({"params": params}, ids))
  assert np.abs(factored - base_logits).max() > 1e-3  # the adapters do change the model

  merged, merged_config = lora.merge(tuned, lora_cfg, config)
  head_adapted = "lm_head" in lora_cfg.targets
  expected_paths = set(traverse_util.flatten_dict(params))
  if head_adapted:
    expected_paths.add(("lm_head", "kernel"))
  assert set(traverse_util.flatten_dict(merged)) == expected_paths
  assert merged_config.tie_word_embeddings == (not head_adapted)  # an adapted head is untied
  merged_logits = np.asarray(model.GPT2(merged_config).apply({"params": merged}, ids))
  assert np.abs(merged_logits - factored).max() <= 1e-5

  out = weights.save_pretrained(merged, merged_config, str(tmp_path / "merged"))
  hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
  with torch.no_grad():
    hf_logits = hf(torch.tensor(np.asarray(ids))).logits.numpy()
  assert np.abs(hf_logits - merged_logits).max() <= 1e-4


def test_training_moves_only_adapters_and_state_holds_only_trainable(small):
  config, params = small
  tuned = lora.add(params, STUDY, jax.random.PRNGKey(0))
  labels = lora.labels(tuned, STUDY)
  tx = optim.make_optimizer(_optim_cfg(), total_steps=10, labels=labels)
  opt_state = tx.init(tuned)
  step = jax.jit(_make_step(lora.make_model(config, STUDY), tx))
  ids = _ids(config.vocab_size, (4, 17))
  new, state, losses = tuned, opt_state, []
  for _ in range(3):  # B = 0 gives A no gradient in step 1; from step 2 both move
    new, state, loss = step(new, state, ids)
    losses.append(float(loss))
  assert losses[-1] < losses[0]

  flat_old, flat_new = traverse_util.flatten_dict(tuned), traverse_util.flatten_dict(new)
  flat_labels = traverse_util.flatten_dict(labels)
  for path, label in flat_labels.items():
    if label == "frozen":
      np.testing.assert_array_equal(np.asarray(flat_new[path]), np.asarray(flat_old[path]), err_msg=str(path))
    else:
      assert path[-1] in lora.ADAPTER_LEAVES and not np.array_equal(flat_new[path], flat_old[path]), path

  # Adam's moments: an array exactly where the label is 'trainable', optax.MaskedNode elsewhere.
  for moment in ("mu", "nu"):
    flat_moment = traverse_util.flatten_dict(optax.tree_utils.tree_get(state, moment))
    assert set(flat_moment) == set(flat_labels)
    for path, value in flat_moment.items():
      assert isinstance(value, jax.Array) == (flat_labels[path] == "trainable"), (moment, path)
  n_trainable = sum(v.size for p, v in flat_old.items() if flat_labels[p] == "trainable")
  n_state = sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0)
  assert n_state == 2 * n_trainable  # mu + nu, nothing for the frozen base


def test_rank0_is_full_finetuning_through_the_same_code(small):
  config, params = small
  full = lora.LoraConfig(rank=0)
  assert lora.add(params, full, jax.random.PRNGKey(0)) is params
  labels = lora.labels(params, full)
  assert set(traverse_util.flatten_dict(labels).values()) == {"trainable"}
  net = lora.make_model(config, full)
  assert net.lora_scale is None
  tx = optim.make_optimizer(_optim_cfg(), total_steps=10, labels=labels)
  new, state, _ = jax.jit(_make_step(net, tx))(params, tx.init(params), _ids(config.vocab_size, (4, 17)))
  for path, value in traverse_util.flatten_dict(params).items():
    assert not np.array_equal(traverse_util.flatten_dict(new)[path], value), path
  n_params = sum(x.size for x in jax.tree.leaves(params))
  assert sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0) == 2 * n_params
  assert lora.summary(params, labels).startswith(
      f"trainable params: {n_params:,d} || all params: {n_params:,d}")


def test_extra_trainable_selects_exactly_the_matching_leaves(small):
  _, params = small
  cfg = lora.LoraConfig(rank=2, alpha=2, targets=("c_fc",), extra_trainable=("ln_f", ".*bias"))
  flat_labels = traverse_util.flatten_dict(lora.labels(lora.add(params, cfg, jax.random.PRNGKey(0)), cfg))
  trainable = {p for p, label in flat_labels.items() if label == "trainable"}
  adapters = {p for p in flat_labels if p[-1] in lora.ADAPTER_LEAVES}
  expected = adapters | {("ln_f", "scale")} | {p for p in flat_labels if p[-1] == "bias"}
  assert trainable == expected
  assert {p[:-1] for p in adapters} == {("h_0", "mlp", "c_fc"), ("h_1", "mlp", "c_fc")}


def test_split_combine_roundtrip_and_summary(small):
  _, params = small
  tuned = lora.add(params, STUDY, jax.random.PRNGKey(0))
  labels = lora.labels(tuned, STUDY)
  trainable, frozen = lora.split(tuned, labels)
  assert {p[-1] for p in traverse_util.flatten_dict(trainable)} == set(lora.ADAPTER_LEAVES)
  assert traverse_util.flatten_dict(lora.combine(trainable, frozen)) == traverse_util.flatten_dict(tuned)
  n_adapter = sum(x.size for x in jax.tree.leaves(trainable))
  n_all = sum(x.size for x in jax.tree.leaves(tuned))
  assert lora.summary(tuned, labels) == (f"trainable params: {n_adapter:,d} || all params: {n_all:,d} || "
                                         f"trainable%: {100 * n_adapter / n_all:.4f}")


def test_lora_train_step_flops_at_most_three_quarters_of_full_finetuning():
  """The production step (train.make_train_step, as the loop jits it), compiled from abstract inputs.
  One micro-batch: XLA's CPU cost analysis counts a loop body once, so more would be undercounted."""
  # Wide relative to the sequence, so the weight-gradient matmuls (what LoRA removes) dominate.
  config = model.GPT2Config(vocab_size=512, n_positions=64, n_embd=256, n_layer=4, n_head=4)
  rows = lambda dtype: jax.ShapeDtypeStruct((2, 32), dtype)
  batch = {"inputs": rows(jnp.int32), "targets": rows(jnp.int32), "positions": rows(jnp.int32),
           "segment_ids": rows(jnp.int32), "loss_mask": rows(jnp.float32)}

  def step_flops(lora_cfg):
    base = model.param_shapes(config)
    params = jax.eval_shape(lambda: lora.add(base, lora_cfg, jax.random.PRNGKey(1))) if lora_cfg.rank else base
    labels = lora.labels(params, lora_cfg)
    cfg = _optim_cfg(weight_decay=0.01)
    tx, schedule = optim.make_optimizer(cfg, 100, labels), optim.make_schedule(cfg, 100)
    trainable, frozen = lora.split(params, labels)
    state = {"trainable": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), trainable),
             "opt_state": jax.eval_shape(tx.init, params), "step": jax.ShapeDtypeStruct((), jnp.int32),
             "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
    step = train.make_train_step(lora.make_model(config, lora_cfg), tx, labels, 1, schedule)
    cost = jax.jit(step).lower(state, frozen, batch).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # a list of dicts on some jax versions
    return cost["flops"]

  full = step_flops(lora.LoraConfig(rank=0))
  adapted = step_flops(lora.LoraConfig(rank=8, alpha=16, targets=("c_attn", "c_proj", "c_fc", "lm_head")))
  print(f"train-step FLOPs: LoRA {adapted:.3e}, full {full:.3e}, ratio {adapted / full:.3f}")
  assert full > 0 and adapted <= 0.75 * full, (adapted, full, adapted / full)


def test_clipping_uses_only_trainable_gradients(small):
  _, params = small
  tuned = lora.add(params, BLOCKS, jax.random.PRNGKey(0))
  labels = lora.labels(tuned, BLOCKS)
  tx = optim.make_optimizer(_optim_cfg(clip_norm=1e-3), total_steps=10, labels=labels)
  state = tx.init(tuned)
  flat_labels = traverse_util.flatten_dict(labels)

  def grads(frozen_value):  # trainable grads fixed; frozen grads 0 or huge
    return traverse_util.unflatten_dict({
        p: jnp.full(v.shape, 0.01 if flat_labels[p] == "trainable" else frozen_value)
        for p, v in traverse_util.flatten_dict(tuned).items()})

  small_updates, _ = tx.update(grads(0.0), state, tuned)
  huge_updates, _ = tx.update(grads(1e6), state, tuned)
  jax.tree.map(np.testing.assert_array_equal, small_updates, huge_updates)
  assert all(not np.any(u) for p, u in traverse_util.flatten_dict(huge_updates).items()
             if flat_labels[p] == "frozen")


def test_schedules():
  sched = optim.make_schedule(_optim_cfg(schedule="cosine", warmup_steps=10, min_lr_ratio=0.1), 110)
  assert float(sched(0)) == 0.0 and float(sched(5)) == pytest.approx(5e-3)
  assert float(sched(10)) == pytest.approx(1e-2) and float(sched(110)) == pytest.approx(1e-3)
  linear = optim.make_schedule(_optim_cfg(schedule="linear", warmup_steps=0), 100)
  assert float(linear(0)) == pytest.approx(1e-2) and float(linear(100)) == pytest.approx(0.0)
  assert float(optim.make_schedule(_optim_cfg(warmup_steps=0), 100)(77)) == pytest.approx(1e-2)
  with pytest.raises(ValueError, match="optim.schedule='step'"):
    optim.make_schedule(_optim_cfg(schedule="step"), 100)
  with pytest.raises(ValueError, match="optim.warmup_steps=200"):
    optim.make_schedule(_optim_cfg(warmup_steps=200), 100)


def test_config_section_and_scale():
  cfg = lora.LoraConfig.from_config(config_lib.default_config().lora)
  assert (cfg.rank, cfg.alpha, cfg.init) == (8, 16.0, "kaiming_uniform")
  assert cfg.targets == ("c_attn", "c_proj", "c_fc")
  assert lora.scale(cfg) == 2.0
  assert lora.scale(lora.LoraConfig(rank=4, alpha=8, use_rslora=True)) == 4.0
  # A string override (e.g. --config.lora.targets=c_attn,lm_head in an unlocked dict) splits on commas.
  section = types.SimpleNamespace(**{**config_lib.default_config().lora.to_dict(),
                                     "targets": "c_attn, lm_head"})
  assert lora.LoraConfig.from_config(section).targets == ("c_attn", "lm_head")


def test_gaussian_init_and_scale_of_a(small):
  _, params = small
  for init, std in (("kaiming_uniform", 1 / np.sqrt(64) / np.sqrt(3)), ("gaussian", 1 / 4)):
    cfg = lora.LoraConfig(rank=4, alpha=4, targets=("c_fc",), init=init)
    a = np.asarray(lora.add(params, cfg, jax.random.PRNGKey(0))["h_0"]["mlp"]["c_fc"]["lora_a"])  # (64, 4)
    assert a.std() == pytest.approx(std, rel=0.2), init


def test_bad_input_errors_name_the_input(small):
  config, params = small
  with pytest.raises(ValueError, match=r"'wte'.*h_0/attn/c_attn.*h_0/mlp/c_proj.*lm_head"):
    lora.add(params, lora.LoraConfig(targets=("c_attn", "wte")), jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="rank=-1"):
    lora.LoraConfig(rank=-1)
  with pytest.raises(ValueError, match=r"rank=65 .* h_0/attn/c_attn \(64, 192\)"):
    lora.add(params, lora.LoraConfig(rank=65, targets=("c_attn",)), jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="init='xavier'"):
    lora.LoraConfig(init="xavier")
  with pytest.raises(ValueError, match=r"extra_trainable 'layernorm'.*ln_f/scale"):
    lora.labels(lora.add(params, BLOCKS, jax.random.PRNGKey(0)),
                lora.LoraConfig(rank=4, alpha=8, extra_trainable=("layernorm",)))
  with pytest.raises(ValueError, match="no adapters"):
    lora.labels(params, BLOCKS)
  tuned = lora.add(params, BLOCKS, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="h_0/attn/c_attn/lora_a has rank 4"):
    lora.merge(tuned, lora.LoraConfig(rank=2, alpha=8), config)
  with pytest.raises(ValueError, match="merge them first"):  # weights refuses unmerged adapters
    weights.save_pretrained(tuned, config, "/nonexistent")
