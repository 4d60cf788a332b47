"""The train step and loop: accumulation, sharding, end-to-end runs, exact resume after SIGTERM."""
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from conftest import REPO, TINY_CONFIG, make_hf_gpt2, run_main, train_losses
from gpt2_lora_jax import checkpoint, experiment, lora, sharding, train



def tiny_config(**overrides):
  import importlib.util
  spec = importlib.util.spec_from_file_location("tiny_config", TINY_CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  for key, value in overrides.items():
    section, name = key.split(".")
    c[section][name] = value
  return c


def random_batch(rng, B, T, vocab):
  """A packed-looking batch whose rows carry different numbers of loss tokens."""
  inputs = rng.randint(0, vocab, (B, T)).astype(np.int32)
  loss_mask = np.zeros((B, T), np.float32)
  for b in range(B):
    loss_mask[b, : 2 + 5 * b] = 1.0  # 2, 7, 12, ... loss tokens: unequal per micro-batch
  return {"inputs": inputs, "targets": np.roll(inputs, -1, axis=1), "loss_mask": loss_mask,
          "segment_ids": np.ones((B, T), np.int32), "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1))}


def _step_once(exp, batch, mesh, micro_batches=1, tx=None):
  """One update through the loop's own state placement and jitted step, on `mesh`.
  Returns (new trainable, metrics, the compiled step's HLO text)."""
  default_tx, schedule = experiment.optimizer(exp)
  tx = default_tx if tx is None else tx
  state, frozen, state_sh, frozen_sh = train.init_state(exp.params, exp.labels, 0, mesh, tx)
  step = train.jit_train_step(exp.model, exp.labels, micro_batches, tx, schedule, mesh, state_sh, frozen_sh)
  batch = sharding.global_batch(batch, mesh)
  compiled = step.lower(state, frozen, batch).compile()
  new_state, metrics = compiled(state, frozen, batch)
  return jax.device_get(new_state["trainable"]), jax.device_get(metrics), compiled.as_text()


@pytest.fixture(scope="module")
def tiny_exp():
  # No warmup: the first update must move the adapters, or the comparisons below prove nothing.
  return experiment.build(tiny_config(**{"lora.dropout": 0.0, "optim.warmup_steps": 0}))


def test_gradient_accumulation_on_four_devices_matches_one_big_batch(tiny_exp):
  """4 micro-batches on a 4-device mesh: every micro-batch is spread over all 4 devices (one row
  each, read from the compiled step), and loss and gradients equal one batch of 16 on one device."""
  B, T, M, n = 16, 16, 4, 4
  batch = random_batch(np.random.RandomState(0), B, T, tiny_exp.gpt2_config.vocab_size)
  # Plain SGD at lr 1 on the trainable leaves: the update is minus the gradient, read back exactly.
  sgd = optax.multi_transform({"trainable": optax.sgd(1.0), "frozen": optax.set_to_zero()}, tiny_exp.labels)
  start, _ = lora.split(tiny_exp.params, tiny_exp.labels)
  one, m1, _ = _step_once(tiny_exp, batch, sharding.make_mesh(1, 1, jax.devices()[:1]), 1, sgd)
  four, m4, hlo = _step_once(tiny_exp, batch, sharding.make_mesh(n, 1, jax.devices()[:n]), M, sgd)
  # Per-device activations (rows, T, n_embd) in the compiled step: B / (M n) rows, nowhere more.
  rows = {int(r) for r in re.findall(rf"f32\[(\d+),{T},{tiny_exp.gpt2_config.n_embd}\]", hlo)}
  assert rows == {B // (M * n)}, rows
  assert m1["loss_tokens"] == m4["loss_tokens"] == sum(min(2 + 5 * b, T) for b in range(B))
  np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-6)
  np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-5)
  grads = lambda new: jax.tree.map(lambda s, x: np.asarray(s, np.float32) - x, start, new)
  for (path, g1), g4 in zip(jax.tree_util.tree_leaves_with_path(grads(one)), jax.tree.leaves(grads(four))):
    np.testing.assert_allclose(g4, g1, rtol=1e-4, atol=1e-6 * np.abs(g1).max())
    if "lora_b" in jax.tree_util.keystr(path):  # real gradients (lora_a's are 0 while B = 0)
      assert np.abs(g1).max() > 0, path


def test_invalid_configs_fail_before_compiling():
  with pytest.raises(ValueError, match="lora.rank=-1"):
    experiment.validate(tiny_config(**{"lora.rank": -1}), 1)
  with pytest.raises(ValueError, match="not divisible by the 8 devices"):
    experiment.validate(tiny_config(**{"train.batch_size": 4}), 8)
  with pytest.raises(ValueError, match="micro_batches"):
    experiment.validate(tiny_config(**{"train.micro_batches": 3}), 1)
  with pytest.raises(ValueError, match="longer than the model's 64 positions"):
    experiment.build(tiny_config(**{"data.max_length": 128}))
  with pytest.raises(OSError, match="not writable"):
    experiment.check_workdir("/proc/not_a_dir/run")


def test_main_end_to_end_then_resume_and_mismatch(tiny_run):
  """configs/tiny.py through main (train_and_eval, 24 steps; conftest's tiny_run), then reruns."""
  workdir = tiny_run
  losses = train_losses(workdir)
  assert sorted(losses) == list(range(1, 25))
  assert np.mean([losses[s] for s in range(21, 25)]) < np.mean([losses[s] for s in range(1, 5)]) - 0.5
  for name in ("metrics.jsonl", "loss.png", "data_summary.json", "tensorboard"):
    assert os.path.exists(os.path.join(workdir, name)), name
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert steps == [16, 20, 24]  # ckpt_every=4, keep the last 3
  held_out = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl")) if '"eval"' in l]
  assert [r["step"] for r in held_out] == [0, 6, 12, 18, 24]
  assert held_out[-1]["loss"] < held_out[0]["loss"]

  # Another adapter layout or another base: a clear error, nothing trained.
  other = run_main(workdir, "--mode=train", "--config.train.steps=30", "--config.lora.rank=2")
  assert other.returncode == 1 and "does not belong to this run" in other.stderr
  assert "LoRA layout differs" in other.stderr
  other = run_main(workdir, "--mode=train", "--config.train.steps=30", "--config.model.overrides.n_embd=64")
  assert other.returncode == 1 and "does not belong to this run" in other.stderr
  assert "trained on base" in other.stderr


def test_mistyped_override_and_missing_base_fail_clearly(tmp_path):
  result = run_main(str(tmp_path / "a"), "--config.train.stepz=3")
  assert result.returncode != 0 and "stepz" in result.stderr
  result = run_main(str(tmp_path / "b"), "--config.model.init=pretrained", f"--config.model.name={tmp_path}/nope")
  assert result.returncode == 1 and "--config.model.name" in result.stderr


def test_sigterm_then_rerun_gives_the_uninterrupted_losses(tmp_path):
  flags = ["--mode=train", "--config.train.steps=24", "--config.train.ckpt_every=100",
           "--config.train.eval_every=0", "--config.lora.dropout=0.1"]
  straight = str(tmp_path / "straight")
  assert run_main(straight, *flags).returncode == 0
  reference = train_losses(straight)

  stopped = str(tmp_path / "stopped")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  proc = subprocess.Popen([sys.executable, "-m", "gpt2_lora_jax.main", f"--config={TINY_CONFIG}",
                           f"--workdir={stopped}", *flags], env=env, cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics_path = os.path.join(stopped, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and (not os.path.exists(metrics_path) or len(train_losses(stopped)) < 8):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
  assert "rerun the same command to resume" in err
  interrupted_at = max(int(d) for d in os.listdir(os.path.join(stopped, "checkpoints")) if d.isdigit())
  assert 8 <= interrupted_at < 24
  resumed = run_main(stopped, *flags)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from" in resumed.stdout
  assert train_losses(stopped) == reference  # every step, bitwise


def test_chunked_loss_matches_whole_batch_logits(tiny_exp):
  """The chunked head + cross-entropy gives the loss and gradients of the plain full-logits loss."""
  batch = {k: jnp.asarray(v) for k, v in
           random_batch(np.random.RandomState(2), 2, 32, tiny_exp.gpt2_config.vocab_size).items()}
  trainable, frozen = lora.split(tiny_exp.params, tiny_exp.labels)
  # Random non-zero adapters, so the head adapter's term is part of what is compared. (A constant
  # lora_b would make the head's lora_a gradient exactly zero: a position's logit gradients sum to 0
  # over the vocabulary. What would be left to compare is rounding noise.)
  leaves, treedef = jax.tree.flatten(trainable)
  keys = jax.random.split(jax.random.PRNGKey(5), len(leaves))
  trainable = treedef.unflatten([x + 0.01 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])

  def reference(tr):
    logits = tiny_exp.model.apply({"params": lora.combine(tr, frozen)}, batch["inputs"],
                                  position_ids=batch["positions"], segment_ids=batch["segment_ids"])
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
    return jnp.sum(nll * batch["loss_mask"])

  def chunked(tr, chunk):
    return train.token_loss_sums(tiny_exp.model, lora.combine(tr, frozen), batch, None, True, chunk)[0]

  want, want_grads = jax.value_and_grad(reference)(trainable)
  for chunk in (8, 32):  # four chunks, and one
    got, got_grads = jax.value_and_grad(chunked)(trainable, chunk)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
      # fp32 rounding scales with a leaf's largest gradient (measured: 1.4e-7 at a leaf max of 0.23).
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * np.abs(b).max())


def test_non_finite_loss_stops_with_the_step_and_saves_nothing_from_it(tmp_path):
  workdir = str(tmp_path / "nan")
  # A learning rate this large sends the adapters to ~1e30 in one update: the next loss is not finite.
  result = run_main(workdir, "--mode=train", "--config.optim.lr=1e30", "--config.optim.warmup_steps=0",
                    "--config.optim.clip_norm=0", "--config.train.steps=8", "--config.train.ckpt_every=1",
                    "--config.train.eval_every=0")
  assert result.returncode == 1, result.stderr[-3000:]
  match = re.search(r"non-finite update at step (\d+) \(loss (nan|inf|-inf),", result.stderr)
  assert match, result.stderr[-3000:]
  bad_step = int(match.group(1))
  saved = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
  assert all(s < bad_step for s in saved)  # every saved checkpoint precedes the bad update
  assert all(np.isfinite(v) for v in train_losses(workdir).values())


def test_pluggable_loss_is_normalised_by_the_whole_batch_and_nan_gradients_change_nothing(tiny_exp):
  """A loss_fn whose value and gradient are known in closed form: num = sum_rows w * s(trainable)
  with s the sum of every trainable value, den = sum_rows n. Over 4 micro-batches on 4 devices the
  step must report loss = W/N * s, aux w = W/N and grad norm = W/N * sqrt(#trainable values).
  With batch["poison"] set, the loss stays finite and its gradient is NaN: the state must not move."""
  @jax.custom_vjp
  def poison(x, flag):
    return x

  poison.defvjp(lambda x, flag: (x, flag), lambda flag, g: (jnp.where(flag, jnp.nan, g), jnp.zeros_like(flag)))
  rng = np.random.RandomState(3)
  batch = {"w": rng.uniform(0.5, 2.0, 8).astype(np.float32), "n": rng.randint(1, 9, 8).astype(np.float32)}
  total = lambda tree: sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(tree))

  def loss_fn(trainable, frozen, mbatch, rng):
    num = poison(jnp.sum(mbatch["w"]) * total(trainable), jnp.any(mbatch["poison"] > 0))
    return num, jnp.sum(mbatch["n"]), {"w": jnp.sum(mbatch["w"])}

  tx, schedule = experiment.optimizer(tiny_exp)
  mesh = sharding.make_mesh(4, 1, jax.devices()[:4])
  state, frozen, state_sh, frozen_sh = train.init_state(tiny_exp.params, tiny_exp.labels, 0, mesh, tx)
  before = jax.device_get(state)
  step = train.jit_train_step(tiny_exp.model, tiny_exp.labels, 4, tx, schedule, mesh, state_sh, frozen_sh,
                              loss_fn=loss_fn)
  state, m = step(state, frozen, sharding.global_batch({**batch, "poison": np.ones(8, np.int32)}, mesh))
  assert np.isfinite(m["loss"]) and not np.isfinite(m["grad_norm"]) and not m["finite"]
  for a, b in zip(jax.tree.leaves(jax.device_get(state["trainable"])), jax.tree.leaves(before["trainable"])):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(jax.device_get(state["opt_state"])), jax.tree.leaves(before["opt_state"])):
    np.testing.assert_array_equal(a, b)

  _, m = jax.device_get(step(state, frozen, sharding.global_batch({**batch, "poison": np.zeros(8, np.int32)}, mesh)))
  s = float(total(before["trainable"]))
  n_values = sum(x.size for x in jax.tree.leaves(before["trainable"]))
  ratio = batch["w"].sum(dtype=np.float64) / batch["n"].sum(dtype=np.float64)
  assert m["finite"]
  np.testing.assert_allclose(m["loss"], ratio * s, rtol=1e-5)
  np.testing.assert_allclose(m["w"], ratio, rtol=1e-6)
  np.testing.assert_allclose(m["grad_norm"], ratio * np.sqrt(n_values), rtol=1e-5)
  assert m["loss_tokens"] == batch["n"].sum()


def test_full_fine_tuning_on_a_bf16_base_trains_fp32_master_weights():
  """Rank 0 on a bf16 base: trainable leaves and Adam moments are fp32, and one step at lr 2e-4
  moves (nearly) every weight; bf16 leaves would round it away (layer-norm scales of 1.0 entirely)."""
  exp = experiment.build(tiny_config(**{"model.base_param_dtype": "bfloat16", "lora.rank": 0,
                                        "optim.lr": 2e-4, "optim.warmup_steps": 0}))
  assert {x.dtype for x in jax.tree.leaves(exp.params)} == {jnp.dtype(jnp.bfloat16)}
  batch = random_batch(np.random.RandomState(4), 8, 64, exp.gpt2_config.vocab_size)
  batch["loss_mask"][:] = 1.0  # every position feeds the loss, so every wpe row has a gradient
  tx, schedule = experiment.optimizer(exp)
  mesh = sharding.make_mesh(2, 1, jax.devices()[:2])
  state, frozen, state_sh, frozen_sh = train.init_state(exp.params, exp.labels, 0, mesh, tx)
  float_leaves = lambda tree: [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert {x.dtype for x in float_leaves(state)} == {jnp.dtype(jnp.float32)}
  assert len(float_leaves(state["opt_state"])) == 2 * len(jax.tree.leaves(state["trainable"]))  # mu, nu
  step = train.jit_train_step(exp.model, exp.labels, 1, tx, schedule, mesh, state_sh, frozen_sh)
  new_state, m = step(state, frozen, sharding.global_batch(batch, mesh))
  assert m["finite"] and {x.dtype for x in float_leaves(new_state)} == {jnp.dtype(jnp.float32)}
  before = traverse_util.flatten_dict(exp.params, sep="/")
  D = exp.gpt2_config.n_embd
  for path, new in traverse_util.flatten_dict(jax.device_get(new_state["trainable"]), sep="/").items():
    old = np.asarray(before[path], np.float32)
    if path.endswith("attn/c_attn/bias"):
      # The key bias adds q.b to every score of a row, which softmax ignores: its gradient is 0 in
      # exact arithmetic, rounding noise here, and Adam turns noise into a full step or none.
      new, old = np.delete(new, np.s_[D:2 * D]), np.delete(old, np.s_[D:2 * D])
    changed = np.mean(new != old)
    assert changed > 0.99, (path, changed)


def _with(exp, **train_settings):
  """exp with train settings changed (its run record too, as experiment.build would make it)."""
  config = exp.config.copy_and_resolve_references()
  config.train.update(**train_settings)
  return dataclasses.replace(exp, config=config, meta=exp.meta | {"run": experiment.run_settings(config)})


def test_nan_gradients_stop_the_run_and_resume_refuses_changed_settings_unless_allowed(tiny_exp, tmp_path, capsys):
  """The loss stays finite but its gradient is NaN from the second step on (once the adapters have
  moved off B = 0): the run stops at that step, whose update is neither applied nor saved. Then,
  in that workdir, a run with more steps is refused by name, and resumes when allowed to."""
  @jax.custom_vjp
  def poison(x, flag):
    return x

  poison.defvjp(lambda x, flag: (x, flag),
                lambda flag, g: (jnp.where(flag, jnp.nan, g), jnp.zeros_like(flag)))
  # tiny_exp has no warmup: step 1 moves B.
  exp = _with(tiny_exp, steps=4, ckpt_every=1, eval_every=0, plot_every=0)
  sft = train.sft_loss(exp.model)

  def loss_fn(trainable, frozen, mbatch, rng):
    num, den, aux = sft(trainable, frozen, mbatch, rng)
    moved = jnp.any(jnp.stack([jnp.any(x != 0) for x in jax.tree.leaves(trainable)
                               if x.shape[0] == exp.lora_config.rank]))  # some lora_b (r, out)
    return poison(num, moved), den, aux

  workdir = str(tmp_path / "nan_grads")
  with pytest.raises(train.NonFiniteLoss, match=r"non-finite update at step 2 \(loss [0-9.]+, gradient norm nan\)"):
    train.run(exp, workdir, objective=lambda e, cache: dataclasses.replace(
        train.sft_objective(e, cache), loss_fn=loss_fn))
  saved = lambda: sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert saved() == [1]  # the good step's checkpoint is the latest; nothing from step 2
  assert sorted(train_losses(workdir)) == [1]

  longer = _with(exp, steps=5)
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=r"train.steps: 4 -> 5\..*--config.train.allow_changed_config=True"):
    train.run(longer, workdir)
  assert saved() == [1]
  capsys.readouterr()
  result = train.run(_with(longer, allow_changed_config=True), workdir)
  assert "with changed settings (train.allow_changed_config): train.steps: 4 -> 5" in capsys.readouterr().out
  assert result["step"] == 5 and saved()[-1] == 5 and sorted(train_losses(workdir)) == [1, 2, 3, 4, 5]


def test_no_whole_copy_of_the_base_stays_on_a_device_after_placement(tmp_path):
  """A pretrained base through weights.load_pretrained and experiment.build, then train.init_state
  on an fsdp mesh: the base exists on the devices only as fsdp shards; no live array holds a whole
  split leaf on one device (a width no other test uses, so only this run's arrays can match)."""
  make_hf_gpt2(str(tmp_path / "base"), n_embd=48, n_positions=64)
  exp = experiment.build(tiny_config(**{"model.init": "pretrained", "model.name": str(tmp_path / "base")}))
  mesh = sharding.make_mesh(1, 8)
  tx, _ = experiment.optimizer(exp)
  state, frozen, _, _ = train.init_state(exp.params, exp.labels, 0, mesh, tx)
  specs = traverse_util.flatten_dict(sharding.param_specs(exp.params, mesh), sep="/")
  split = {np.shape(v) for k, v in traverse_util.flatten_dict(exp.params, sep="/").items()
           if specs[k] != jax.sharding.PartitionSpec()}
  assert (50257, 48) in split and (48, 144) in split
  whole = [a.shape for a in jax.live_arrays() if a.shape in split
           and any(s.data.shape == a.shape for s in a.addressable_shards)]
  assert whole == [], whole
